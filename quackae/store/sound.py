"""Which units of a store count: a shard or item counts when it is a regular file that parses, matches the
store (encoding size; at a job's start also provenance and finite values, and, for an item, the id its
metadata names) and holds only ids the dataset's selection keeps; the first unit to hold an id keeps it.
The rest are set aside: the job's leader moves them to ``STORE/.quarantine/`` and their ids are encoded
again. Checks that read every unit run only at a job's start, never per batch.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from quackae.core.errors import QuackError
from quackae.store.items import item_entries, item_files, load_item
from quackae.store.manifest import differing
from quackae.store.shards import QUARANTINE, all_finite, open_shard, shard_files, shard_matrix, shard_provenance

log = logging.getLogger(__name__)

QUARANTINE_LINES = 10  # quarantined units named one per line; beyond that, counted


def quarantine(store: Path, path: Path, reason: str, quiet: bool = False) -> Path | None:
    """Move a corrupt unit to ``STORE/.quarantine/`` (same file system, one rename, under a name no other unit
    gets) and say so in one line unless ``quiet``; None when it is already gone."""
    folder = store / QUARANTINE
    folder.mkdir(exist_ok=True)
    target = folder / f"{int(time.time())}-{uuid.uuid4().hex[:8]}-{path.name}"
    try:
        os.replace(path, target)
    except FileNotFoundError:
        return None
    if not quiet:
        log.warning("%s is corrupt (%s): moved to %s, its items will be encoded again", path, reason, target)
    return target


def _quarantine_all(store: Path, bad: list[tuple[Path, str]]) -> None:
    """Quarantine every ``(unit, reason)``, naming the first ``QUARANTINE_LINES`` and counting the rest."""
    for number, (path, reason) in enumerate(bad):
        quarantine(store, path, reason, quiet=number >= QUARANTINE_LINES)
    if len(bad) > QUARANTINE_LINES:
        log.warning(
            "%d more corrupt units moved to %s; their items will be encoded again",
            len(bad) - QUARANTINE_LINES,
            QUARANTINE,
        )


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


def _outside(sorted_ids: np.ndarray, expected: np.ndarray | None) -> bool:
    """Whether some id is not among the sorted ``expected`` ids (None: every id belongs)."""
    if expected is None or not len(sorted_ids):
        return False
    if not len(expected):
        return True
    found = np.searchsorted(expected, sorted_ids).clip(max=len(expected) - 1)
    return not bool((expected[found] == sorted_ids).all())


def _sound_shards(
    store: Path, encoding_size: int | None, provenance: dict[str, Any] | None, expected: np.ndarray | None
) -> tuple[list[np.ndarray], list[tuple[Path, str]]]:
    """``(sorted ids of each sound shard, (shard, reason) of the others)``; see ``stored_ids_checked``."""
    candidates, bad = [], []  # (path, sorted ids) of the shards that parse and match, in file order
    for path in shard_files(store):
        try:
            table = open_shard(path)
            size = table.schema.field("encoding").type.list_size
            if encoding_size is not None and size != encoding_size:
                raise QuackError(f"encoding size {size}, the store's is {encoding_size}")
            stored = shard_provenance(table, path)
            if provenance is not None:
                keys = differing(stored, provenance)
                if keys:
                    raise QuackError(f"its provenance differs from the store's ({', '.join(keys)})")
                if not all_finite(shard_matrix(table)):
                    raise QuackError("it holds encodings that are not finite")
            ids = np.sort(table.column("id").to_numpy())  # (n,)
            if _outside(ids, expected):
                raise QuackError("it holds ids that are not in the dataset's selection")
            candidates.append((path, ids))
        except QuackError as error:
            bad.append((path, getattr(error, "reason", str(error))))
    every = np.sort(np.concatenate([ids for _, ids in candidates])) if candidates else np.empty(0, np.int64)
    if not _repeats(every):
        return [every], bad  # no id twice anywhere: every shard counts
    # the first shard (in file order) to hold an id keeps it; a later one repeating it is set aside
    chunks, seen = [], np.empty(0, dtype=np.int64)  # sorted ids of the shards accepted so far
    for path, ids in candidates:
        if _repeats(ids) or _overlaps(seen, ids):
            bad.append((path, "it repeats ids"))
            continue
        seen = _merge_sorted(seen, ids)
        chunks.append(ids)
    return chunks, bad


def _sound_items(
    store: Path, encoding_size: int | None, provenance: dict[str, Any] | None, expected: np.ndarray | None
) -> tuple[list[np.ndarray], list[tuple[Path, str]]]:
    """``(ids of the sound items, (item, reason) of the others)``; see ``stored_ids_checked``."""
    kept, bad = [], []
    for index, path in item_files(store):
        try:
            item = load_item(path)
            if encoding_size is not None and item.encoding.shape != (encoding_size,):
                raise QuackError(f"encoding shape {item.encoding.shape}, the store's is ({encoding_size},)")
            if provenance is not None:
                keys = differing(item.provenance, provenance)
                if keys:
                    raise QuackError(f"its provenance differs from the store's ({', '.join(keys)})")
                if not all_finite(item.encoding):
                    raise QuackError("its encoding is not finite")
                if item.metadata.get("id") != index:
                    raise QuackError(f"its metadata names id {item.metadata.get('id')!r}")
        except QuackError as error:
            bad.append((path, getattr(error, "reason", str(error))))
            continue
        kept.append((index, path))
    ids = np.asarray([index for index, _ in kept], dtype=np.int64)  # (n,) sorted
    if expected is not None and _outside(ids, expected):
        inside = np.isin(ids, expected)
        bad.extend(
            (path, "its id is not in the dataset's selection") for k, (_, path) in enumerate(kept) if not inside[k]
        )
        ids = ids[inside]
    return [ids], bad


def stored_ids_checked(
    store: Path,
    layout: str,
    encoding_size: int | None,
    provenance: dict[str, Any] | None,
    move: bool,
    expected: np.ndarray | None = None,
) -> np.ndarray:
    """Sorted unique ids of the sound units in ``store``.

    A unit that is not a regular file, does not parse or has another encoding size is skipped. With
    ``provenance`` (the store's header, at the start of a job) every unit is read whole and one whose
    provenance differs, that holds a non-finite encoding, or (an item) whose metadata names another id is
    skipped too; with ``expected`` (the sorted ids the dataset's selection keeps) so is one holding any other
    id. With ``move`` (the job's leader) each skipped unit is quarantined, and so is anything that stands
    where an item's folder or picture goes but is not one (a rerun's write there would fail).
    """
    finder = _sound_shards if layout == "shards" else _sound_items
    chunks, bad = finder(store, encoding_size, provenance, expected)
    if move:
        if provenance is not None:
            bad.extend((path, "it stands where quackae writes") for path in item_entries(store).blocking)
        _quarantine_all(store, bad)
    chunks = [c for c in chunks if len(c)]
    if len(chunks) < 2:
        return chunks[0] if chunks else np.empty(0, dtype=np.int64)
    return np.sort(np.concatenate(chunks))  # sorted, disjoint runs (a unit repeating an id was set aside)
