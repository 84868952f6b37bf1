"""Whether a stored unit is sound, and which copy of a repeated id wins: the one place for both rules.

``unit_problems`` says what is wrong with one unit read whole (encoding size, the id its metadata names,
provenance, finite values); a job's start, ``quackae verify`` and ``EncodingStore.check_usable`` all ask it.
``first_copies`` says which copy of each id counts: the first, in the order the layout lists its units.
A unit counts when it parses, has no problem, holds only ids the dataset's selection keeps and holds no
later copy of an id; the rest are set aside: the job's leader moves them to ``STORE/.quarantine/`` and
their ids are encoded again. Checks that read every unit run only at a job's start, never per batch.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from quackae.store.items import item_entries
from quackae.store.layout import CorruptUnit, Layout, Unit
from quackae.store.manifest import QUARANTINE, differing

log = logging.getLogger(__name__)

QUARANTINE_LINES = 10  # quarantined units named one per line; beyond that, counted
MAX_LISTED = 10_000  # per-id problems of one unit listed one by one; beyond that, left out


def unit_problems(unit: Unit, manifest: dict[str, Any] | None, whole: bool = True) -> list[str]:
    """What is wrong with ``unit`` against the store's ``manifest`` (None: nothing to compare with): an encoding
    size other than the manifest's; with ``whole``, also an id its metadata names differently, a provenance other
    than the manifest's (or none), and each encoding that is not finite (by id). Empty when it is sound."""
    ids, matrix = unit.ids, unit.matrix  # (n,), (n, H)
    size = (manifest or {}).get("encoding_size")
    problems = []
    if size is not None and matrix.shape[1] != size:
        problems.append(f"encodings of size {matrix.shape[1]}, the manifest says {size}")
    if not whole:
        return problems
    if unit.named is not None:
        other = np.flatnonzero(unit.named != ids)
        problems.extend(f"id {ids[r]}: its metadata says id {unit.named[r]!r}" for r in other[:MAX_LISTED])
    if manifest is not None:
        keys = differing(unit.provenance, manifest)
        if keys and unit.provenance is None:
            problems.append("carries no provenance, so what made it is unknown")
        elif keys:
            problems.append(f"provenance differs from the manifest ({', '.join(keys)})")
    bad = np.flatnonzero(~np.isfinite(matrix).all(axis=1))
    problems.extend(f"id {ids[r]}: encoding not finite" for r in bad[:MAX_LISTED])
    return problems


def first_copies(id_lists: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Which copy of each id counts: the first, in unit order. ``(ids (N,) sorted unique, unit (N,) and row (N,)
    of each id's first copy, later (M,) the unit of every later copy)`` of the units' ids ``id_lists``."""
    every = np.concatenate(id_lists) if id_lists else np.empty(0, dtype=np.int64)  # (T,)
    unit = np.repeat(np.arange(len(id_lists), dtype=np.int64), [len(ids) for ids in id_lists])  # (T,)
    row = np.concatenate([np.arange(len(ids), dtype=np.int64) for ids in id_lists]) if id_lists else every
    ids, first = np.unique(every, return_index=True)  # the first index of each id: the lowest unit, then row
    later = np.ones(len(every), dtype=bool)
    later[first] = False
    return ids, unit[first], row[first], unit[later]


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


def _outside(sorted_ids: np.ndarray, expected: np.ndarray | None) -> bool:
    """Whether some id is not among the sorted ``expected`` ids (None: every id belongs)."""
    if expected is None or not len(sorted_ids):
        return False
    if not len(expected):
        return True
    found = np.searchsorted(expected, sorted_ids).clip(max=len(expected) - 1)
    return not bool((expected[found] == sorted_ids).all())


def _sound_units(
    store: Path, layout: Layout, header: dict[str, Any] | None, whole: bool, expected: np.ndarray | None
) -> tuple[list[tuple[Path, np.ndarray]], list[tuple[Path, str]]]:
    """``((unit, ids) of the units that parse and have no problem, (unit, reason) of the others)``; ``whole``:
    every problem ``unit_problems`` knows, else only the encoding size."""
    candidates, bad = [], []
    for path in layout.units(store):
        try:
            unit = layout.read(path)
        except CorruptUnit as error:
            bad.append((path, error.reason))
            continue
        ids = unit.ids
        problems = unit_problems(unit, header, whole)
        if not problems and _outside(np.sort(ids), expected):
            problems = ["it holds ids that are not in the dataset's selection"]
        if problems:
            bad.append((path, problems[0]))
        else:
            candidates.append((path, ids))
    return candidates, bad


def stored_ids_checked(
    store: Path,
    layout: Layout,
    encoding_size: int | None,
    provenance: dict[str, Any] | None,
    move: bool,
    expected: np.ndarray | None = None,
    skipped: list[tuple[Path, str]] | None = None,
) -> np.ndarray:
    """Sorted unique ids of the sound units in ``store``.

    A unit that is not a regular file or does not parse is skipped, and so is one of another encoding size
    (``encoding_size``). With ``provenance`` (the store's header, at the start of a job) every unit is read
    whole and one with a problem (``unit_problems``) is skipped too; with ``expected`` (the sorted ids the
    dataset's selection keeps) so is one holding any other id; a unit holding a later copy of an id
    (``first_copies``) is skipped. With ``move`` (the job's leader) each skipped unit is quarantined, and so
    is anything that stands where an item's folder or picture goes but is not one (a rerun's write there
    would fail). ``skipped`` gets each skipped unit and why.
    """
    header = dict(provenance or {})
    if encoding_size is not None:
        header["encoding_size"] = encoding_size
    candidates, bad = _sound_units(store, layout, header or None, provenance is not None, expected)
    ids, _, _, later = first_copies([unit_ids for _, unit_ids in candidates])
    if len(later):
        repeating = set(later.tolist())
        bad.extend((path, "it repeats ids") for k, (path, _) in enumerate(candidates) if k in repeating)
        kept = [unit_ids for k, (_, unit_ids) in enumerate(candidates) if k not in repeating]
        ids = first_copies(kept)[0]
    if move:
        if provenance is not None:
            bad.extend((path, "it stands where quackae writes") for path in item_entries(store).blocking)
        _quarantine_all(store, bad)
    if skipped is not None:
        skipped.extend(bad)
    return ids
