"""One live ``quackae train`` per RUN folder: an exclusive lock held for the whole training.

The job's leader (global rank 0) takes an exclusive ``fcntl.flock`` on ``RUN/.lock`` and writes who
holds it (job id, pid, host, start time) into it. Ranks of the same DDP job join without locking:
ranks Lightning launches inherit ``QUACKAE_TRAIN_JOB`` from the leader, ranks torchrun or SLURM
start derive the same job id from the launcher's. A second train or resume into a RUN whose lock is
held is refused in one line naming the live one. The kernel drops the lock when its process dies,
so a killed train never leaves a RUN locked.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path

from quackae.atomic import TEMPORARY_SUFFIX
from quackae.errors import QuackError
from quackae.files import folder_kind, kind_of

log = logging.getLogger(__name__)

JOB_ENV = "QUACKAE_TRAIN_JOB"
LOCK = ".lock"
# What quackae train writes in a RUN (hparams.yaml: RUNs of an older quackae), besides hidden temporaries.
RUN_NAMES = {LOCK, "run.json", "tokenizer.json", "checkpoints", "logs", "tensorboard", "config.yaml"}
RUN_NAMES |= {"summary.json", "metrics.csv", "curves.png", "hparams.yaml"}
_RUN_FOLDERS = {"checkpoints", "logs", "tensorboard"}


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


def _global_rank() -> int:
    for name in ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def _launcher_job() -> str | None:
    """A job id every rank of a torchrun or SLURM launch derives alike, None when there is none."""
    for name in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        value = os.environ.get(name)
        if value and value != "none":
            step = os.environ.get("SLURM_STEP_ID", "")
            return hashlib.blake2b(f"train:{name}:{value}:{step}".encode(), digest_size=6).hexdigest()
    return None


def _holder(text: str) -> dict[str, object]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _describe(holder: dict[str, object]) -> str:
    if not holder:
        return "another live quackae train"
    return (
        f"quackae train job {holder.get('job')} (pid {holder.get('pid')} on {holder.get('host')}, "
        f"since {holder.get('started')})"
    )


class RunLock:
    """This process's part in the one live training of ``run``; ``release()`` ends it."""

    def __init__(self, run: Path, job: str, fd: int | None, created: bool) -> None:
        self.run = run
        self.job = job
        self._fd = fd
        self._created = created

    @property
    def leader(self) -> bool:
        return self._fd is not None

    @classmethod
    def take(cls, run: Path, wait_s: float = 600.0) -> RunLock:
        """Lead the training of ``run`` (global rank 0) or join the job this process belongs to."""
        inherited = os.environ.get(JOB_ENV)
        if inherited or _global_rank() > 0:
            job = inherited or _launcher_job()
            if job is None:
                raise QuackError(
                    f"rank {_global_rank()} cannot tell which train job it belongs to; launch with torchrun, "
                    "SLURM or Lightning's own launcher"
                )
            _wait_for_leader(run, job, wait_s)
            return cls(run, job, None, created=False)
        if run.exists() and not run.is_dir():
            raise QuackError(f"--out {run} is a file; give the run a directory")
        created = not run.exists()
        run.mkdir(parents=True, exist_ok=True)
        lock = run / LOCK
        if lock.is_symlink() or (lock.exists() and not lock.is_file()):
            raise QuackError(f"{lock} is not a regular file; remove it (quackae train keeps its lock there)")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
            os.close(fd)
            raise QuackError(
                f"{run} is being trained by {_describe(holder)}; wait for it to end or choose another --out"
            ) from None
        job = _launcher_job() or uuid.uuid4().hex[:12]
        record = {
            "job": job,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.environ[JOB_ENV] = job  # ranks Lightning launches from here inherit it
        return cls(run, job, fd, created)

    def release(self) -> None:
        """End this process's part; the leader unlocks, and removes the RUN folder it created when a failed
        start left nothing in it but the lock."""
        if self._fd is None:
            return
        if os.environ.get(JOB_ENV) == self.job:
            del os.environ[JOB_ENV]
        try:
            if self._created and {p.name for p in self.run.iterdir()} == {LOCK}:
                (self.run / LOCK).unlink()
                self.run.rmdir()
        except OSError:
            pass  # something else appeared in it meanwhile: it stays
        os.close(self._fd)  # releases the flock
        self._fd = None


def _wait_for_leader(run: Path, job: str, wait_s: float) -> None:
    """Return once the live leader of ``job`` holds ``run``'s lock; refuse when it is gone, or when another
    live job holds it."""
    deadline = time.monotonic() + wait_s
    lock = run / LOCK
    other_since: float | None = None  # when another job was first seen holding the lock
    while True:
        try:
            holder = _holder(lock.read_text(errors="replace"))
        except OSError:
            holder = {}
        held = _held(lock)
        if holder.get("job") == job:
            if held:
                return
            raise QuackError(f"the leader of train job {job} no longer holds {lock}; start the training again")
        if held and holder:
            # a leader writes its job id just after it locks: another job for two seconds is really another
            other_since = other_since or time.monotonic()
            if time.monotonic() - other_since > 2.0:
                raise QuackError(f"{run} is being trained by {_describe(holder)}, not by this job ({job})")
        else:
            other_since = None
        if time.monotonic() > deadline:
            raise QuackError(f"rank {_global_rank()} waited {wait_s:.0f} s for rank 0 to lock {run} for job {job}")
        time.sleep(0.1)


def _held(lock: Path) -> bool:
    """Whether a live process holds ``lock`` (tested with a shared lock that is let go at once)."""
    try:
        fd = os.open(lock, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
