"""One writer job's hold on a store: the lock, the provenance header, staging and quarantine.

The job's leader (global rank 0) takes an exclusive ``fcntl.flock`` on ``STORE/.lock`` for the whole
job and writes its job id into it. Other ranks of the same job (children Lightning launched, which
inherit ``QUACKAE_ENCODE_JOB``, or ranks torchrun/SLURM started, which derive the same id from the
launcher's job id) join without locking once the manifest names their job. Holding the lock, the
leader checks provenance against ``manifest.json``, empties the store on ``--overwrite``, deletes
staging left by dead jobs (no live job can own it: they would hold the lock), moves corrupt units
to ``STORE/.quarantine/`` and writes the provenance header (``"complete": false``) before any item.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from quackae.atomic import write_atomic
from quackae.errors import QuackError
from quackae.layout import (
    LOCK,
    MANIFEST,
    QUARANTINE,
    SHARDS,
    STAGING,
    check_no_symlinks,
    item_files,
    layout_of,
    open_shard,
    read_item,
    read_manifest,
    shard_files,
    shard_provenance,
)

log = logging.getLogger(__name__)

JOB_ENV = "QUACKAE_ENCODE_JOB"
# What must match for a rerun to add to a store: anything else would mix encodings.
PROVENANCE_KEYS = (
    "checkpoint_sha256",
    "tokenizer_sha256",
    "dataset_fingerprint",
    "layout",
    "encoding_size",
    "text",
    "selection",
)
_WHAT = {
    "checkpoint_sha256": "another model",
    "tokenizer_sha256": "another tokenizer",
    "dataset_fingerprint": "another dataset",
    "layout": "another layout",
    "encoding_size": "another encoding size",
    "text": "another --text setting",
    "selection": "another selection (--filtered/--evaluate/--label-field/--reduction-threshold)",
}


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
        store.mkdir(parents=True, exist_ok=True)
        check_no_symlinks(store)
        fd = os.open(store / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise QuackError(
                f"{store} is being written by another live encode (job {holder}); wait for it to finish "
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
        previous = read_manifest(store) if not overwrite else None
        if overwrite:
            removed = empty_store(store)
            if removed:
                log.info("--overwrite: emptied %s (%d entries)", store, removed)
        elif previous is not None:
            held = "shards" if shard_files(store) else "files" if item_files(store) else None
            if held is not None and held != header.get("layout"):
                raise QuackError(
                    f"{store} holds a {held} store, not {header.get('layout')}; pass --layout {held}, "
                    "--overwrite to replace it, or choose another --out"
                )
            for key in PROVENANCE_KEYS:
                if key in previous and previous.get(key) != header.get(key):
                    raise QuackError(
                        f"{store} holds encodings made with {_WHAT[key]} ({key} {previous.get(key)!r}, now "
                        f"{header.get(key)!r}); pass --overwrite to replace them or choose another --out"
                    )
        elif shard_files(store) or item_files(store):
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
    """Mark ``store`` complete: ``manifest.json`` with the item count, the encoding size (``size``, else what the
    manifest or ``fields`` say), ``fields`` (provenance) over what it held, and ``selection`` unless one of those
    names it; returns it."""
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


def quarantine(store: Path, path: Path, reason: str) -> Path:
    """Move a corrupt unit to ``STORE/.quarantine/`` (same file system, one rename) and say so in one line."""
    folder = store / QUARANTINE
    folder.mkdir(exist_ok=True)
    target = folder / f"{int(time.time())}-{path.name}"
    os.replace(path, target)
    log.warning("%s is corrupt (%s): moved to %s, its items will be encoded again", path, reason, target)
    return target


def _repeats(sorted_ids: np.ndarray) -> bool:
    """Whether a sorted id array holds some id twice."""
    return len(sorted_ids) > 1 and bool((sorted_ids[1:] == sorted_ids[:-1]).any())


def _overlaps(sorted_a: np.ndarray, sorted_b: np.ndarray) -> bool:
    """Whether two sorted id arrays share an id (a binary search per id of the smaller one)."""
    if not len(sorted_a) or not len(sorted_b):
        return False
    small, large = (sorted_a, sorted_b) if len(sorted_a) <= len(sorted_b) else (sorted_b, sorted_a)
    found = np.searchsorted(large, small).clip(max=len(large) - 1)
    return bool((large[found] == small).any())


def _merge_sorted(sorted_a: np.ndarray, sorted_b: np.ndarray) -> np.ndarray:
    """The sorted union of two sorted, disjoint id arrays."""
    merged = np.concatenate([sorted_a, sorted_b])
    merged.sort(kind="stable")  # two sorted runs: timsort merges them in one pass
    return merged


def stored_ids_checked(
    store: Path, layout: str, encoding_size: int | None, provenance: dict[str, Any] | None, move: bool
) -> np.ndarray:
    """Sorted unique ids of the sound units in ``store``; a unit that does not parse, has another encoding
    size or provenance is skipped and, with ``move`` (the job's leader), quarantined."""
    chunks = []
    if layout == "shards":
        candidates = []  # (path, sorted ids) of the shards that parse and match, in file order
        for path in shard_files(store):
            try:
                table = open_shard(path)
                size = table.schema.field("encoding").type.list_size
                if encoding_size is not None and size != encoding_size:
                    raise QuackError(f"encoding size {size}, the store's is {encoding_size}")
                stored = shard_provenance(table) or {}
                if provenance is not None and any(stored.get(k) != provenance.get(k) for k in PROVENANCE_KEYS):
                    raise QuackError("its provenance differs from the store's")
                candidates.append((path, np.sort(table.column("id").to_numpy())))  # (n,)
            except QuackError as error:
                if move:
                    quarantine(store, path, getattr(error, "reason", str(error)))
        every = np.sort(np.concatenate([ids for _, ids in candidates])) if candidates else np.empty(0, np.int64)
        if not _repeats(every):
            return every  # no id twice anywhere: every shard counts
        # the first shard (in file order) to hold an id keeps it; a later one repeating it is set aside
        seen = np.empty(0, dtype=np.int64)  # sorted ids of the shards accepted so far
        for path, ids in candidates:
            if _repeats(ids) or _overlaps(seen, ids):
                if move:
                    quarantine(store, path, "it repeats ids")
                continue
            seen = _merge_sorted(seen, ids)
            chunks.append(ids)
    else:
        for index, path in item_files(store):
            try:
                encoding, _ = read_item(path)
                if encoding_size is not None and encoding.shape != (encoding_size,):
                    raise QuackError(f"encoding shape {encoding.shape}, the store's is ({encoding_size},)")
            except QuackError as error:
                if move:
                    quarantine(store, path, str(error))
                continue
            chunks.append(np.asarray([index], dtype=np.int64))
    if not chunks:
        return np.empty(0, dtype=np.int64)
    return np.unique(np.concatenate(chunks))


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
