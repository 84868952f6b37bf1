"""One live ``quackae train`` per RUN folder: the RUN's ``JobLock`` (kind ``train``), held for the whole training."""

from __future__ import annotations

from pathlib import Path

from quackae.core.errors import QuackError
from quackae.core.joblock import LOCK, JobLock, job_variable

JOB_ENV = job_variable("train")

__all__ = ["JOB_ENV", "LOCK", "lock_run"]


def lock_run(run: Path, wait_s: float = 600.0) -> JobLock:
    """Lead the training of ``run`` (global rank 0), making the folder, or join the job this process belongs to."""
    if run.exists() and not run.is_dir():
        raise QuackError(f"--out {run} is a file; give the run a directory")
    created = not run.exists()
    run.mkdir(parents=True, exist_ok=True)
    return JobLock.take(run, "train", "trained", wait_s=wait_s, created=created)
