"""One live job per folder: an exclusive lock its leader holds for the whole job, and the ranks of that job joining.

The leader (global rank 0, ``quackae.core.ranks``) takes an exclusive ``fcntl.flock`` on ``FOLDER/.lock`` and
writes who holds it into it (job id, pid, host, start time). The other ranks of the same job join without
locking: the processes Lightning launches inherit the job id through ``QUACKAE_{KIND}_JOB``, which the leader
sets for them and takes back when it lets go; ranks that torchrun or SLURM start derive the same id from the
launcher's. A joining rank waits until the lock names its job and a live process holds it (and until whatever
else the caller waits for: a store's manifest naming the job), and is refused when the leader is gone or
another job holds the folder. A second job is refused in one line naming the live one. The kernel drops the
lock when its process dies, so a killed job never leaves a folder locked.

``quackae train`` locks a RUN folder with it (kind ``train``), ``quackae encode`` a store (kind ``encode``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import stat
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quackae.core.errors import QuackError
from quackae.core.files import entry_kind
from quackae.core.ranks import global_rank, launcher_job

LOCK = ".lock"
OTHER_JOB_S = 2.0  # a leader writes its job id just after it locks: another job for this long is really another


def job_variable(kind: str) -> str:
    """The environment variable that hands a ``kind`` job's id to the ranks its leader launches."""
    return f"QUACKAE_{kind.upper()}_JOB"


def _holder(raw: bytes) -> dict[str, Any]:
    """Who a lock file names: its JSON record, or (an older lock) the job id alone."""
    text = raw.decode(errors="replace").strip()
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if isinstance(value, dict):
        return value
    job = re.sub(r"[^0-9A-Za-z_.-]", "?", text[:64])
    return {"job": job} if job else {}


def lock_record(lock: Path) -> dict[str, Any]:
    """Who ``lock`` names as its (last) holder (``_holder``); empty when it is missing, unreadable or not a regular
    file (a FIFO in its place is never read: reading one would block)."""
    try:
        return _holder(lock.read_bytes()) if entry_kind(lock) is None else {}
    except OSError:
        return {}


def _describe(holder: dict[str, Any], kind: str) -> str:
    if not holder.get("job"):
        return f"another live quackae {kind}"
    if "pid" not in holder:
        return f"quackae {kind} job {holder['job']}"
    since = f"since {holder.get('started')}"
    return f"quackae {kind} job {holder['job']} (pid {holder['pid']} on {holder.get('host')}, {since})"


def open_lock(path: Path) -> int:
    """The lock file, opened for the lock and its holder's record: created if missing, never followed through a
    link (truncating it would empty the link's target) and refused, in one line, when it is not a regular file."""
    kind = entry_kind(path)
    if kind not in (None, "missing"):
        raise QuackError(f"lock file {path} is {kind}, not a file; remove it")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as error:
        reason = "it is a symbolic link" if error.errno == errno.ELOOP else error.strerror
        raise QuackError(f"lock file {path} cannot be opened ({reason}); remove it") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise QuackError(f"lock file {path} is not a regular file; remove it")
    return fd


def held(lock: Path) -> bool:
    """Whether a live process holds ``lock`` (tested with a shared lock that is let go at once)."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def joins(kind: str) -> bool:
    """Whether this process joins a ``kind`` job another process leads (it inherited the job, or is not rank 0)."""
    return bool(os.environ.get(job_variable(kind))) or global_rank() > 0


class JobLock:
    """This process's part in the one live ``kind`` job on ``folder``; ``release()`` ends it."""

    def __init__(self, folder: Path, kind: str, job: str, fd: int | None, created: bool = False) -> None:
        self.folder = folder
        self.kind = kind
        self.job = job
        self._fd = fd
        self._created = created

    @property
    def leader(self) -> bool:
        return self._fd is not None

    @classmethod
    def take(
        cls,
        folder: Path,
        kind: str,
        doing: str,
        ready: Callable[[str], bool] | None = None,
        wait_s: float = 600.0,
        created: bool = False,
    ) -> JobLock:
        """Lead the ``kind`` job on the existing ``folder`` (global rank 0) or join the job this process belongs
        to, once its leader holds the lock and ``ready(job)`` says so. ``doing`` words the refusal ("{folder} is
        being {doing} by ..."); ``created``: the caller made ``folder`` for this job (``release`` removes it when
        nothing but the lock is left in it)."""
        if joins(kind):
            job = os.environ.get(job_variable(kind)) or launcher_job(kind)
            if job is None:
                raise QuackError(
                    f"rank {global_rank()} cannot tell which {kind} job it belongs to; launch with torchrun, SLURM or "
                    "Lightning's own launcher"
                )
            _wait_for_leader(folder, kind, job, doing, ready, wait_s)
            return cls(folder, kind, job, None)
        fd = open_lock(folder / LOCK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.pread(fd, 4096, 0))
            os.close(fd)
            raise QuackError(
                f"{folder} is being {doing} by {_describe(holder, kind)}; wait for it to end or choose another --out"
            ) from None
        job = launcher_job(kind) or uuid.uuid4().hex[:12]
        record = {
            "job": job,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        os.environ[job_variable(kind)] = job  # the ranks Lightning launches from here inherit it
        return cls(folder, kind, job, fd, created)

    def release(self) -> None:
        """End this process's part: the leader takes back the job variable it set, removes the folder it was
        given as created when nothing but the lock is in it, and unlocks."""
        if self._fd is None:
            return
        if os.environ.get(job_variable(self.kind)) == self.job:
            del os.environ[job_variable(self.kind)]
        try:
            if self._created and {p.name for p in self.folder.iterdir()} == {LOCK}:
                (self.folder / LOCK).unlink()
                self.folder.rmdir()
        except OSError:
            pass  # something else appeared in it meanwhile: it stays
        os.close(self._fd)  # releases the flock
        self._fd = None


def _wait_for_leader(
    folder: Path, kind: str, job: str, doing: str, ready: Callable[[str], bool] | None, wait_s: float
) -> None:
    """Return once the live leader of ``job`` holds ``folder``'s lock and ``ready(job)``; refuse when it is gone, or
    when another live job holds the folder."""
    deadline = time.monotonic() + wait_s
    lock = folder / LOCK
    other_since: float | None = None  # when another job was first seen holding the lock
    while True:
        holder = lock_record(lock)
        alive = held(lock)
        if holder.get("job") == job:
            if not alive:
                raise QuackError(f"the leader of {kind} job {job} no longer holds {lock}; start the {kind} again")
            if ready is None or ready(job):
                return
        elif alive and holder:
            other_since = other_since or time.monotonic()
            if time.monotonic() - other_since > OTHER_JOB_S:
                raise QuackError(f"{folder} is being {doing} by {_describe(holder, kind)}, not by this job ({job})")
        else:
            other_since = None
        if time.monotonic() > deadline:
            raise QuackError(f"rank {global_rank()} waited {wait_s:.0f} s for rank 0 to lock {folder} for job {job}")
        time.sleep(0.1)
