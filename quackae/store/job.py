"""One writer job's hold on a store: the lock, the provenance header, staging and quarantine.

The store's ``JobLock`` (kind ``encode``, ``quackae.core.joblock``) is held by the job's leader (global
rank 0) for the whole job; the other ranks of the job join once the manifest names their job. Before the lock, an
``--out`` that overlaps the inputs or holds what quackae does not write is refused (``quackae.store.ownership``).
Holding the lock, the leader checks the manifest is a valid one with the same provenance, empties the
store on ``--overwrite`` (only a store), deletes staging left by dead jobs (no live job can own it: they
would hold the lock) and writes the provenance header (``"complete": false``) before any item; which
units count and which are quarantined is ``quackae.store.sound``'s.

A rerun under torchrun's or SLURM's same launcher id gets the same job id, so a store may still hold the lock
record and manifest of an earlier run of that job. The header therefore names its leader too (the pid, host and
start time its lock record gives), and a joining rank waits for the live lock and for a header whose leader is
the one holding it, never an earlier run's. Units and staging carry the run's name (``run_name``: the job id and
its leader), so that no unit of an earlier run of the same job is ever named again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from quackae.core.errors import QuackError
from quackae.core.joblock import JobLock, held, job_variable, joins, lock_record
from quackae.core.ranks import global_rank
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
    provenance_of,
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

    def __init__(self, store: Path, lock: JobLock, holder: dict[str, Any] | None = None) -> None:
        """``holder``: who leads the job (``_lock_holder``); the leader reads its own lock record when None."""
        self.store = store
        self.lock = lock
        self.leader = lock.leader
        self.holder = holder if holder is not None else _lock_holder(store) or {}
        self.job = run_name(lock.job, self.holder)  # what this run's units and staging are named by
        # the sorted ids the finished store must hold, each once (``complete_manifest`` checks it); None: unknown
        self.expected: np.ndarray | None = None

    @classmethod
    def start(cls, store: Path, header: dict[str, Any], overwrite: bool, wait_s: float = 600.0) -> StoreJob:
        """Join the job this process belongs to, or (global rank 0) lead a new one; see the module docstring."""
        if not joins("encode"):
            if store.exists() and not store.is_dir():
                raise QuackError(f"--out {store} is an existing file, not a store folder; choose another --out")
            check_out_folder(store, header)
            store.mkdir(parents=True, exist_ok=True)
            check_store_folders(store)
        elif not os.environ.get(JOB_ENV):
            _wait_for_a_holder(store, wait_s)
        leading = _Leading(store)
        lock = JobLock.take(store, "encode", "written", ready=leading.ready, wait_s=wait_s)
        this = cls(store, lock, None if lock.leader else leading.holder)
        try:
            if lock.leader:
                this._claim(header, overwrite)
            else:
                _check_joined(store, header)
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
            "job": self.lock.job,
            "leader": self.holder,  # which run of the job this header is (see the module docstring)
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


SAY_WAITING_S = 30.0  # a rank waiting this long for its leader says so (a warning: every rank shows it)
HOLDER_KEYS = ("pid", "host", "started")  # what tells one leader (one run of a job) from another


def _lock_holder(store: Path) -> dict[str, Any] | None:
    """Who the store's lock record names as its (last) leader: its pid, host and start time; None if unreadable."""
    record = lock_record(store / LOCK)
    if not all(key in record for key in HOLDER_KEYS):
        return None
    return {key: record[key] for key in HOLDER_KEYS}


def run_name(job: str, holder: dict[str, Any]) -> str:
    """The name of one run of ``job`` led by ``holder``: every rank derives it alike, and a rerun of the job
    (another leader) gets another, so its units never take the name of a unit an earlier run committed."""
    text = json.dumps([job, holder], sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


class _Leading:
    """A joining rank's test that the store's header is its own run's: it names the job and, as the lock record
    does on two looks in a row (a new leader writes its record just after it locks), the live leader."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.holder: dict[str, Any] | None = None
        self._seen: dict[str, Any] | None = None

    def ready(self, job: str) -> bool:
        try:
            manifest = read_manifest(self.store)
        except QuackError:
            return False  # being replaced right now
        holder = _lock_holder(self.store)
        if manifest is None or manifest.get("job") != job or holder is None or manifest.get("leader") != holder:
            self._seen = None
            return False
        if self._seen != holder:
            self._seen = holder
            return False
        self.holder = holder
        return True


def _wait_for_a_holder(store: Path, wait_s: float) -> None:
    """Wait (at most ``wait_s``) until a live process holds the store's lock: a rank of a torchrun or SLURM job
    may start before its leader has locked, while the lock record still names the same job (an earlier run of
    it, under the same launcher id), which ``JobLock.take`` would take for a leader that has gone."""
    started = time.monotonic()
    said = False
    while not held(store / LOCK):
        waited = time.monotonic() - started
        if waited > wait_s:
            raise QuackError(
                f"rank {global_rank()} waited {wait_s:.0f} s for rank 0 to lock {store}; start every rank of the "
                "job with the same command (the same --out), rank 0 included"
            )
        if waited > SAY_WAITING_S and not said:
            log.warning(
                "rank %d has waited %.0f s for rank 0 to lock %s (every rank needs the same --out); waits %.0f s",
                global_rank(),
                waited,
                store,
                wait_s,
            )
            said = True
        time.sleep(0.1)


def every_rank_done(trainer: Any) -> None:
    """Wait until every rank of the job has written its last unit; a rank that is gone (killed, crashed) is one
    ``QuackError`` here, not the process group's traceback: what the others committed stays, a rerun finishes."""
    try:
        trainer.strategy.barrier("quackae-writer-done")
    except RuntimeError as error:  # gloo's or NCCL's "connection closed by peer" and the like
        reason = " ".join(str(error).split())[:160]
        raise QuackError(
            f"another rank of this encode job stopped before it finished its items ({reason}); the units committed "
            "so far stay, run the same command on every rank again to encode the rest"
        ) from None


def complete_manifest(
    store: Path,
    layout: Layout,
    size: int | None,
    fields: dict[str, Any],
    selection: dict[str, Any],
    job: str,
    expected: np.ndarray | None = None,
) -> dict[str, Any]:
    """Mark ``store`` complete: ``manifest.json`` with the item count and digest of the ids (``ids_sha256``), the
    encoding size (``size``, else what the manifest or ``fields`` say), ``fields`` (provenance) over what it held,
    and ``selection`` unless one of those names it; returns it. With ``expected`` (the sorted ids the selection
    keeps) a store that does not hold each of them exactly once, and nothing else, is left incomplete: a
    ``QuackError`` says what is missing or repeated (ranks that did not share the items alike)."""
    skipped: list[tuple[Path, str]] = []
    ids = stored_ids_checked(store, layout, None, None, move=False, expected=expected, skipped=skipped)
    if expected is not None and (skipped or not np.array_equal(ids, expected)):
        missing = len(np.setdiff1d(expected, ids))
        raise QuackError(
            f"{store} is not marked complete: it holds {len(ids)} of the {len(expected)} items its selection keeps "
            f"({missing} missing, {len(skipped)} units repeating ids or holding others, e.g. "
            f"{skipped[0][0].name if skipped else 'none'}): the ranks of this job did not share the items alike "
            "(started with other flags?); run the same command on every rank again to finish the store"
        )
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


def _check_joined(store: Path, header: dict[str, Any]) -> None:
    """A rank that joins a job must encode what its leader does: the same model, data, layout, text and
    selection (the leader's header); else the store would mix them, so the rank refuses in one line."""
    leader = read_manifest(store) or {}
    for key in differing(provenance_of(header), leader):
        raise QuackError(
            f"rank {global_rank()} was started with {DESCRIPTIONS[key]} than the rank leading this encode job "
            f"({key} {leader.get(key)!r} there, {header.get(key)!r} here); start every rank with the same command"
        )


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
