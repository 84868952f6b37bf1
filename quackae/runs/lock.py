"""One live ``quackae train`` per RUN folder: the RUN's ``JobLock`` (kind ``train``), held for the whole training."""

from __future__ import annotations

import os
from pathlib import Path

from quackae.core.atomic import TEMPORARY_SUFFIX
from quackae.core.errors import QuackError
from quackae.core.files import folder_kind, kind_of
from quackae.core.joblock import LOCK, JobLock, job_variable

JOB_ENV = job_variable("train")
# What quackae train writes in a RUN (hparams.yaml: RUNs of an older quackae), besides hidden temporaries.
RUN_NAMES = {LOCK, "run.json", "tokenizer.json", "checkpoints", "logs", "tensorboard", "config.yaml"}
RUN_NAMES |= {"summary.json", "metrics.csv", "curves.png", "hparams.yaml"}
_RUN_FOLDERS = {"checkpoints", "logs", "tensorboard"}

__all__ = ["JOB_ENV", "LOCK", "RUN_NAMES", "check_run_folder", "lock_run"]


def check_run_folder(run: Path, data: str | Path) -> None:
    """Refuse, before anything is written there, an ``--out`` that is a file, is or is inside the prepared
    folder ``data``, or holds entries a RUN does not (a prepared folder, a store, a classifier, anything else)."""
    if os.path.lexists(run) and not run.is_dir():
        raise QuackError(f"--out {run} is a file; give the run a directory")
    out, prepared = Path(os.path.realpath(run)), Path(os.path.realpath(data))
    if out == prepared or prepared in out.parents:
        where = "is" if out == prepared else "is inside"
        raise QuackError(f"--out {run} {where} the prepared data {data}; give the run a folder of its own")
    if not run.is_dir():
        return
    with os.scandir(run) as entries:
        names = [e.name for e in entries]
    foreign = sorted(n for n in names if n not in RUN_NAMES and not (n[0] == "." and n.endswith(TEMPORARY_SUFFIX)))
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise QuackError(
            f"--out {run} is not a run folder: it holds {', '.join(foreign[:3])}{more}, which quackae train does "
            "not write; choose a new or empty folder for --out"
        )
    for name in sorted((RUN_NAMES - {LOCK, "run.json"}) & set(names)):  # those two are read by lines of their own
        kind = folder_kind(run / name) if name in _RUN_FOLDERS else kind_of(run / name)
        if kind not in (None, "missing"):  # a dangling link is replaced like a missing file
            wanted = "a folder" if name in _RUN_FOLDERS else "a file"
            raise QuackError(f"{run / name} is {kind}, not {wanted}; remove it (quackae train writes it again)")


def lock_run(run: Path, wait_s: float = 600.0) -> JobLock:
    """Lead the training of ``run`` (global rank 0), making the folder, or join the job this process belongs to."""
    if run.exists() and not run.is_dir():
        raise QuackError(f"--out {run} is a file; give the run a directory")
    created = not run.exists()
    run.mkdir(parents=True, exist_ok=True)
    return JobLock.take(run, "train", "trained", wait_s=wait_s, created=created)
