"""One writer job's hold on a store: the lock, the provenance header, staging and quarantine.

The store's ``JobLock`` (kind ``encode``, ``quackae.core.joblock``) is held by the job's leader (global
rank 0) for the whole job; the other ranks of the job join once the manifest names their job. Before the lock, an
``--out`` that overlaps the inputs or holds what quackae does not write is refused (``quackae.store.ownership``).
Holding the lock, the leader checks the manifest is a valid one with the same provenance, empties the
store on ``--overwrite`` (only a store), deletes staging left by dead jobs (no live job can own it: they
would hold the lock) and writes the provenance header (``"complete": false``) before any item; which
units count and which are quarantined is ``quackae.store.sound``'s.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from quackae.core.errors import QuackError
from quackae.core.joblock import JobLock, job_variable, joins
from quackae.store.layout import LAYOUTS, Layout, known, layout_of
from quackae.store.manifest import (
    DESCRIPTIONS,
    FORMAT,
    LOCK,
    MANIFEST,
    STAGING,
    completed,
    differing,
    manifest_problem,
    read_manifest,
    staging_folder,
    write_manifest,
)
from quackae.store.ownership import check_out_folder, overwrite_problem
from quackae.store.shards import check_store_folders
from quackae.store.sound import quarantine, stored_ids_checked

log = logging.getLogger(__name__)

JOB_ENV = job_variable("encode")


class StoreJob:
    """The current process's part in one writer job on ``store``; ``close()`` releases it."""

    def __init__(self, store: Path, lock: JobLock) -> None:
        self.store = store
        self.lock = lock
        self.job = lock.job
        self.leader = lock.leader

    @classmethod
    def start(cls, store: Path, header: dict[str, Any], overwrite: bool, wait_s: float = 600.0) -> StoreJob:
        """Join the job this process belongs to, or (global rank 0) lead a new one; see the module docstring."""
        if not joins("encode"):
            if store.exists() and not store.is_dir():
                raise QuackError(f"--out {store} is an existing file, not a store folder; choose another --out")
            check_out_folder(store, header)
            store.mkdir(parents=True, exist_ok=True)
            check_store_folders(store)
        lock = JobLock.take(store, "encode", "written", ready=lambda job: _names_job(store, job), wait_s=wait_s)
        this = cls(store, lock)
        if lock.leader:
            try:
                this._claim(header, overwrite)
            except BaseException:
                lock.release()
                raise
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
        held = next((name for name in known() if LAYOUTS[name].holds(store)), None)
        if previous is not None:
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
        elif not overwrite and held is not None:
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
            "format": FORMAT,
            "complete": False,
            "job": self.job,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        manifest.pop("items", None)
        manifest.pop("ids_sha256", None)
        write_manifest(store, manifest, self.staging(0))

    def staging(self, rank: int) -> Path:
        """This job's staging folder for ``rank`` (created on first use)."""
        folder = staging_folder(self.store, self.job, rank)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def drop_staging(self, rank: int) -> None:
        folder = staging_folder(self.store, self.job, rank)
        shutil.rmtree(folder, ignore_errors=True)
        try:
            (self.store / STAGING).rmdir()
        except OSError:
            pass  # another rank still writes there, or it is already gone

    def close(self) -> None:
        """End the job: the leader removes its own staging folder (the header's, when nothing was left to
        encode) and releases the lock."""
        if self.lock.leader:
            self.drop_staging(0)
        self.lock.release()


def _names_job(store: Path, job: str) -> bool:
    """Whether the store's manifest (its header, written by the leader before any item) names ``job``."""
    try:
        manifest = read_manifest(store)
    except QuackError:
        return False  # being replaced right now
    return manifest is not None and manifest.get("job") == job


def complete_manifest(
    store: Path, layout: Layout, size: int | None, fields: dict[str, Any], selection: dict[str, Any], job: str
) -> dict[str, Any]:
    """Mark ``store`` complete: ``manifest.json`` with the item count and digest of the ids (``ids_sha256``), the
    encoding size (``size``, else what the manifest or ``fields`` say), ``fields`` (provenance) over what it held,
    and ``selection`` unless one of those names it; returns it."""
    ids = stored_ids_checked(store, layout, None, None, move=False)
    counted = {"layout": layout.name, "encoding_size": size, "ids": ids, "selection": selection}
    manifest = completed(read_manifest(store) or {}, fields, layout.manifest_fields, counted)
    staging = staging_folder(store, job, "manifest")
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
    return stored_ids_checked(store, layout_of(store, read_manifest(store)), None, None, move=False).tolist()


__all__ = ["JOB_ENV", "StoreJob", "quarantine", "stored_ids_checked"]
