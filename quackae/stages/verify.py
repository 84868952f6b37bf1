"""``quackae verify``: check a store end to end and list every problem.

Every shard (or item) must parse, hold encodings of the manifest's size that are all finite, and
carry the manifest's provenance; ids must be unique; nothing may be left in staging; with
``--data`` every id the manifest's selection keeps from the prepared dataset must be stored once
and nothing else. Prints counts and returns, or prints each problem (file, id, what) and exits 1.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quackae.core.errors import QuackError
from quackae.core.results import StageResult
from quackae.stages.configs import VerifyConfig
from quackae.store.items import item_entries, unit_kind
from quackae.store.layout import CorruptUnit, layout_named, layout_of
from quackae.store.manifest import (
    MANIFEST,
    STAGING,
    STORE_FOLDERS,
    ids_digest,
    manifest_problem,
    read_manifest,
    store_folder_problem,
)
from quackae.store.ownership import foreign_entries
from quackae.store.sound import first_copies, unit_problems

log = logging.getLogger(__name__)

MAX_LISTED = 10_000  # problems printed one per line; beyond that, counted


def _manifest(store: Path, problems: list[str]) -> dict[str, Any] | None:
    """The store's manifest when it is a valid one; else None, with what is wrong added to ``problems``."""
    try:
        manifest = read_manifest(store)
    except QuackError as error:
        problems.append(str(error))
        return None
    if manifest is None:
        problems.append(f"{store / MANIFEST}: missing (provenance unknown)")
        return None
    problem = manifest_problem(manifest)
    if problem is not None:
        problems.append(f"{store / MANIFEST}: not a valid store manifest ({problem})")
        return None
    if not manifest["complete"]:
        problems.append(f"{store / MANIFEST}: not marked complete (an encode is running or was stopped)")
    return manifest


def check_store(store: Path, data: str | Path | None = None) -> tuple[dict[str, Any], list[str]]:
    """``(counts, problems)`` for ``store``; each problem names the file and, where it applies, the id."""
    if store_folder_problem(store) is not None:
        raise QuackError(store_folder_problem(store))
    problems: list[str] = []
    manifest = _manifest(store, problems)
    layout = layout_of(store, manifest)
    expected = _expected_ids(data, manifest) if data is not None else None
    foreign = foreign_entries(store, deep=True)
    problems.extend(f"{p}: not something quackae writes in a store" for p in foreign[:MAX_LISTED])
    held: list[tuple[Path, np.ndarray]] = []  # (unit, its ids) of every unit that parses
    paths = layout.units(store)
    for path in paths:
        try:
            unit = layout.read(path)
        except CorruptUnit as error:
            problems.append(f"{path}: does not parse ({error.reason})")
            continue
        problems.extend(f"{path}: {problem}" for problem in unit_problems(unit, manifest))
        held.append((path, unit.ids))
    problems.extend(
        f"{p}: stands where quackae writes an item folder or picture but is none (a rerun moves it aside)"
        for p in item_entries(store).blocking[:MAX_LISTED]
    )
    unique, _, _, later = first_copies([ids for _, ids in held])
    if len(later):
        problems.extend(_repeated_ids(store, held))
    for name in STORE_FOLDERS:
        kind = unit_kind(store / name)
        if kind not in ("missing", "a directory"):
            what = kind or "a file"
            problems.append(f"{store / name}: is {what}, not a folder (encode refuses the store until it is removed)")
    staging = store / STAGING
    left = sum(len(files) for _, _, files in os.walk(staging)) if unit_kind(staging) == "a directory" else 0
    if left:
        problems.append(f"{staging}: {left} files left in staging (a stopped encode; a rerun removes them)")
    if manifest is not None and manifest["complete"]:
        if manifest["items"] != len(unique):
            problems.append(f"{store / MANIFEST}: says {manifest['items']} items, the store holds {len(unique)}")
        elif manifest.get("ids_sha256") not in (None, ids_digest(unique)):
            problems.append(f"{store / MANIFEST}: the store holds other ids than it counted (a unit was replaced)")
    result: dict[str, Any] = {"store": str(store), "layout": layout.name, "units": len(paths), "items": len(unique)}
    if expected is not None:
        for path, ids in held:
            outside = int((~np.isin(ids, expected)).sum())
            if outside:
                problems.append(f"{path}: holds {outside} ids not in {data}'s selection (a rerun moves it aside)")
        missing = np.setdiff1d(expected, unique)
        extra = np.setdiff1d(unique, expected)
        problems.extend(f"{store}: id {i}: missing (in {data}, not stored)" for i in missing[:MAX_LISTED].tolist())
        problems.extend(f"{store}: id {i}: stored but not in {data}'s selection" for i in extra[:MAX_LISTED].tolist())
        if len(missing) > MAX_LISTED or len(extra) > MAX_LISTED:
            problems.append(f"{store}: {len(missing)} ids missing and {len(extra)} extra in all")
        result["expected"] = int(len(expected))
    return result, problems


def _repeated_ids(store: Path, held: list[tuple[Path, np.ndarray]]) -> list[str]:
    """One problem per id stored more than once, naming the units that hold its copies."""
    all_ids = np.concatenate([ids for _, ids in held])  # (T,) every copy
    unit_of = np.repeat(np.arange(len(held)), [len(ids) for _, ids in held])  # (T,) which unit holds each
    order = np.argsort(all_ids, kind="stable")
    repeated, first, counts = np.unique(all_ids[order], return_index=True, return_counts=True)
    problems = []
    for k in np.flatnonzero(counts > 1)[:MAX_LISTED].tolist():
        units = sorted({held[u][0].name for u in unit_of[order[first[k] : first[k] + counts[k]]].tolist()})
        problems.append(f"{store}: id {repeated[k]}: stored {counts[k]} times ({', '.join(units)})")
    return problems


def _expected_ids(data: str | Path, manifest: dict[str, Any] | None) -> np.ndarray:
    """The sorted ids of ``data`` that the store's selection keeps (every id when the manifest is not valid)."""
    from quackae.data.prepared import load_prepared, verify_fingerprint
    from quackae.data.selection import selected_rows

    dataset, _, _ = load_prepared(data)
    manifest = manifest or {}
    fingerprint = manifest.get("dataset_fingerprint")
    if fingerprint and fingerprint != verify_fingerprint(data):
        raise QuackError(f"{data} is not the dataset this store was encoded from (its fingerprint differs)")
    ids = np.asarray(dataset.data.column("id").to_numpy(), dtype=np.int64)
    return np.unique(ids[selected_rows(dataset, manifest.get("selection") or {})])


@dataclass(frozen=True)
class VerifyResult(StageResult):
    """What ``quackae verify`` counted, and every problem it found (the command exits 1 when there is one)."""

    store: str
    layout: str
    units: int
    items: int
    data: str | None  # --data: the prepared dataset the store was checked against
    expected: int | None  # the ids its selection keeps; None without --data
    problems: int
    details: tuple[str, ...]  # one line per problem: the file, the id where it applies, what is wrong

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 0

    def lines(self) -> list[str]:
        counts = f"{self.items} items in {self.units} {layout_named(self.layout).unit_word}"
        if self.expected is not None:
            counts += f", {self.expected} expected from {self.data}"
        if self.problems:
            return [*self.details, f"{self.store}: {self.problems} problems ({counts})"]
        return [f"{self.store}: ok, {counts}"]


def verify(config: VerifyConfig) -> VerifyResult:
    """Run ``quackae verify``: the counts, and every problem (``exit_code`` 1 when there is one)."""
    counts, problems = check_store(Path(config.store), config.data)
    return VerifyResult(
        store=str(config.store),
        layout=counts["layout"],
        units=counts["units"],
        items=counts["items"],
        data=None if config.data is None else str(config.data),
        expected=counts.get("expected"),
        problems=len(problems),
        details=tuple(problems),
    )
