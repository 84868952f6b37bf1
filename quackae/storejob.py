"""One writer job's hold on a store: the lock, the provenance header, staging and quarantine.

The job's leader (global rank 0) takes an exclusive ``fcntl.flock`` on ``STORE/.lock`` for the whole
job and writes its job id into it. Other ranks of the same job (children Lightning launched, which
inherit ``QUACKAE_ENCODE_JOB``, or ranks torchrun/SLURM started, which derive the same id from the
launcher's job id) join without locking once the manifest names their job. Before the lock, an
``--out`` that overlaps the inputs or holds what quackae does not write is refused (``quackae.ownership``).
Holding the lock, the leader checks the manifest is a valid one with the same provenance, empties the
store on ``--overwrite`` (only a store), deletes staging left by dead jobs (no live job can own it: they
would hold the lock) and writes the provenance header (``"complete": false``) before any item; which
units count and which are quarantined is ``quackae.sound``'s.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from quackae.atomic import write_atomic
from quackae.errors import QuackError
from quackae.items import unit_kind
from quackae.layout import (
    LOCK,
    MANIFEST,
    SHARDS,
    STAGING,
    check_store_folders,
    item_files,
    layout_of,
    read_manifest,
    shard_files,
)
from quackae.ownership import check_out_folder, overwrite_problem
from quackae.provenance import DESCRIPTIONS, differing, ids_digest, manifest_problem
from quackae.sound import quarantine, stored_ids_checked

log = logging.getLogger(__name__)

JOB_ENV = "QUACKAE_ENCODE_JOB"


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
            return hashlib.blake2b(f"{name}:{value}:{step}".encode(), digest_size=6).hexdigest()
    return None


def dataset_fingerprint(dataset: Any) -> str:
    """sha256 of the prepared dataset's ids, lengths, row count and column names (cheap, order sensitive)."""
    digest = hashlib.sha256(json.dumps([dataset.num_rows, sorted(dataset.column_names)]).encode())
    for name in ("id", "length"):
        if name in dataset.column_names:
            digest.update(np.ascontiguousarray(dataset.data.column(name).to_numpy(), dtype=np.int64).tobytes())
    return digest.hexdigest()


def fresh_job() -> str:
    return uuid.uuid4().hex[:12]


class StoreJob:
    """The current process's part in one writer job on ``store``; ``close()`` releases it."""

    def __init__(self, store: Path, job: str, leader: bool, lock_fd: int | None) -> None:
        self.store = store
        self.job = job
        self.leader = leader
        self._lock_fd = lock_fd

    @classmethod
    def start(cls, store: Path, header: dict[str, Any], overwrite: bool, wait_s: float = 600.0) -> StoreJob:
        """Join the job this process belongs to, or (global rank 0) lead a new one; see the module docstring."""
        inherited = os.environ.get(JOB_ENV)
        if inherited or _global_rank() > 0:
            job = inherited or _launcher_job()
            if job is None:
                raise QuackError(
                    f"rank {_global_rank()} cannot tell which encode job it belongs to; launch with torchrun, "
                    "SLURM or Lightning's own launcher"
                )
            _wait_for_header(store, job, wait_s)
            return cls(store, job, leader=False, lock_fd=None)
        job = _launcher_job() or fresh_job()
        if store.exists() and not store.is_dir():
            raise QuackError(f"--out {store} is an existing file, not a store folder; choose another --out")
        check_out_folder(store, header)
        store.mkdir(parents=True, exist_ok=True)
        check_store_folders(store)
        fd = _open_lock(store / LOCK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = re.sub(r"[^0-9A-Za-z_.-]", "?", os.pread(fd, 64, 0).decode(errors="replace").strip())
            os.close(fd)
            raise QuackError(
                f"{store} is being written by another live encode (job {holder or 'unknown'}); wait for it to finish "
                "or choose another --out"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{job}\n".encode(), 0)
            this = cls(store, job, leader=True, lock_fd=fd)
            this._claim(header, overwrite)
        except BaseException:
            os.close(fd)
            raise
        os.environ[JOB_ENV] = job  # ranks Lightning launches from here inherit it
        return this

    def _claim(self, header: dict[str, Any], overwrite: bool) -> None:
        store = self.store
        previous = None
        if overwrite:
            problem = overwrite_problem(store)
            if problem is not None:
                raise QuackError(
                    f"--overwrite empties only a store quackae encode wrote, and {store} is none: {problem}; "
                    "choose another --out"
                )
            removed = empty_store(store)
            if removed:
                log.info("--overwrite: emptied %s (%d entries)", store, removed)
        else:
            previous = read_manifest(store)
        if previous is not None:
            held = "shards" if shard_files(store) else "files" if item_files(store) else None
            if held is not None and held != header.get("layout"):
                raise QuackError(
                    f"{store} holds a {held} store, not {header.get('layout')}; pass --layout {held}, "
                    "--overwrite to replace it, or choose another --out"
                )
            problem = manifest_problem(previous)
            if problem is not None:
                raise QuackError(
                    f"{store / MANIFEST} is not a valid store manifest ({problem}), so what made the store is "
                    "unknown; pass --overwrite to replace it or choose another --out"
                )
            for key in differing(previous, header):
                raise QuackError(
                    f"{store} holds encodings made with {DESCRIPTIONS[key]} ({key} {previous.get(key)!r}, now "
                    f"{header.get(key)!r}); pass --overwrite to replace them or choose another --out"
                )
        elif not overwrite and (shard_files(store) or item_files(store)):
            raise QuackError(
                f"{store} holds items but no {MANIFEST}, so what made them is unknown; pass --overwrite to "
                "replace them or choose another --out"
            )
        stale = remove_staging(store)
        if stale:
            log.info("removed %d staging files that stopped encode jobs left in %s", stale, store)
        manifest = {
            **(previous or {}),
            **header,
            "format": "quackae-store-2",
            "complete": False,
            "job": self.job,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        manifest.pop("items", None)
        manifest.pop("ids_sha256", None)
        write_manifest(store, manifest, self.staging(0))

    def staging(self, rank: int) -> Path:
        """This job's staging folder for ``rank`` (created on first use)."""
        folder = self.store / STAGING / f"{self.job}-{rank}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def drop_staging(self, rank: int) -> None:
        folder = self.store / STAGING / f"{self.job}-{rank}"
        shutil.rmtree(folder, ignore_errors=True)
        try:
            (self.store / STAGING).rmdir()
        except OSError:
            pass  # another rank still writes there, or it is already gone

    def close(self) -> None:
        """End the job: the leader removes its own staging folder (the header's, when nothing was left to
        encode) and releases the lock."""
        if self._lock_fd is not None:
            self.drop_staging(0)
            if os.environ.get(JOB_ENV) == self.job:
                del os.environ[JOB_ENV]
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


def _open_lock(path: Path) -> int:
    """The lock file, opened for the lock and the holder's job id: created if missing, never followed through a
    link (truncating it would empty the link's target) and refused, in one line, when it is not a regular file."""
    kind = unit_kind(path)
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


def _wait_for_header(store: Path, job: str, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            manifest = read_manifest(store)
        except QuackError:
            manifest = None  # being replaced right now
        if manifest is not None and manifest.get("job") == job:
            return
        if time.monotonic() > deadline:
            raise QuackError(f"rank {_global_rank()} waited {wait_s:.0f} s for rank 0 to open {store} for job {job}")
        time.sleep(0.1)


def write_manifest(store: Path, manifest: dict[str, Any], staging: Path) -> None:
    write_atomic(store / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode(), staging, durable=True)


def complete_manifest(
    store: Path, layout: str, size: int | None, fields: dict[str, Any], selection: dict[str, Any], job: str
) -> dict[str, Any]:
    """Mark ``store`` complete: ``manifest.json`` with the item count and digest of the ids (``ids_sha256``), the
    encoding size (``size``, else what the manifest or ``fields`` say), ``fields`` (provenance) over what it held,
    and ``selection`` unless one of those names it; returns it."""
    previous = read_manifest(store) or {}
    ids = stored_ids_checked(store, layout, None, None, move=False)
    manifest = {
        **previous,
        "format": "quackae-store-2",
        "layout": layout,
        "dtype": "float32",
        "encoding_size": size or previous.get("encoding_size") or fields.get("encoding_size"),
        **fields,
        "items": int(len(ids)),
        "ids_sha256": ids_digest(ids),
        "complete": True,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    manifest.setdefault("selection", selection)
    if layout == "files":
        manifest["item_path"] = "{id // 100000}/{id % 100000 // 1000}/{id}.npz"
    staging = store / STAGING / f"{job}-manifest"
    staging.mkdir(parents=True, exist_ok=True)
    try:
        write_manifest(store, manifest, staging)
    finally:
        staging.rmdir()
        try:
            staging.parent.rmdir()
        except OSError:
            pass
    return manifest


def remove_staging(store: Path) -> int:
    """Delete every staging folder in ``store``; only call holding the lock. Returns how many files went."""
    staging = store / STAGING
    if staging.is_symlink():
        raise QuackError(f"{staging} is a symbolic link; remove it")
    if not staging.is_dir():
        return 0
    removed = sum(len(files) for _, _, files in os.walk(staging))
    shutil.rmtree(staging)
    return removed


def empty_store(store: Path) -> int:
    """Remove everything in ``store`` but the lock file; returns how many top-level entries went."""
    removed = 0
    for entry in store.iterdir():
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed += 1
    return removed


def clean_temporary(store: Path) -> int:
    """Delete the staging files stopped jobs left in ``store`` (only when no encode is live); returns how many."""
    return remove_staging(Path(store))


def stored_ids(store: str | Path) -> list[int]:
    """Ids of the sound items in ``store``, either layout, in id order (staging never counts)."""
    store = Path(store)
    if not store.is_dir():
        return []
    layout = layout_of(store, read_manifest(store))
    return stored_ids_checked(store, layout, None, None, move=False).tolist()


__all__ = ["JOB_ENV", "SHARDS", "StoreJob", "dataset_fingerprint", "quarantine", "stored_ids_checked"]
