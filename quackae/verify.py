"""``quackae verify``: check a store end to end and list every problem.

Every shard (or item) must parse, hold encodings of the manifest's size that are all finite, and
carry the manifest's provenance; ids must be unique; nothing may be left in staging; with
``--data`` every id the manifest's selection keeps from the prepared dataset must be stored once
and nothing else. Prints counts and returns, or prints each problem (file, id, what) and exits 1.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quackae.errors import QuackError
from quackae.layout import (
    MANIFEST,
    STAGING,
    item_files,
    layout_of,
    open_shard,
    read_item,
    read_manifest,
    shard_files,
    shard_matrix,
    shard_provenance,
)

log = logging.getLogger(__name__)

MAX_LISTED = 10_000  # problems printed one per line; beyond that, counted


@dataclass(frozen=True)
class VerifyConfig:
    store: str = field(
        default="storage/store",
        metadata={"positional": True, "path": True, "help": "store directory (quackae encode --out)"},
    )
    data: str | None = field(
        default=None, metadata={"path": True, "help": "prepared directory: check every selected id is stored once"}
    )


def check_store(store: Path, data: str | Path | None = None) -> tuple[dict[str, Any], list[str]]:
    """``(counts, problems)`` for ``store``; each problem names the file and, where it applies, the id."""
    from quackae.storejob import PROVENANCE_KEYS

    if not store.is_dir():
        raise QuackError(f"encoding store {store} does not exist; run quackae encode --out {store}")
    problems: list[str] = []
    try:
        manifest = read_manifest(store)
    except QuackError as error:
        manifest = None
        problems.append(str(error))
    if manifest is None and not problems:
        problems.append(f"{store / MANIFEST}: missing (provenance unknown)")
    manifest = manifest or {}
    if manifest and manifest.get("complete") is not True:
        problems.append(f"{store / MANIFEST}: not marked complete (an encode is running or was stopped)")
    layout = layout_of(store, manifest)
    size = manifest.get("encoding_size")
    ids: list[np.ndarray] = []
    where: list[str] = []
    units = 0
    if layout == "shards":
        for path in shard_files(store):
            units += 1
            try:
                table = open_shard(path)
                matrix = shard_matrix(table)  # (n, H)
            except QuackError as error:
                problems.append(f"{path}: does not parse ({error})")
                continue
            if size is not None and matrix.shape[1] != size:
                problems.append(f"{path}: encodings of size {matrix.shape[1]}, the manifest says {size}")
            bad = np.flatnonzero(~np.isfinite(matrix).all(axis=1))
            column = table.column("id").to_numpy()
            problems.extend(f"{path}: id {column[r]}: encoding not finite" for r in bad[:MAX_LISTED])
            stored = shard_provenance(table) or {}
            differs = [k for k in PROVENANCE_KEYS if k in manifest and stored.get(k) != manifest.get(k)]
            if differs:
                problems.append(f"{path}: provenance differs from the manifest ({', '.join(differs)})")
            ids.append(column)
            where.extend([path.name] * len(column))
    else:
        for index, path in item_files(store):
            units += 1
            try:
                encoding, metadata = read_item(path)
            except QuackError as error:
                problems.append(f"{path}: id {index}: does not parse ({error})")
                continue
            if size is not None and encoding.shape != (size,):
                problems.append(f"{path}: id {index}: encoding of shape {encoding.shape}, the manifest says ({size},)")
            if not np.isfinite(encoding).all():
                problems.append(f"{path}: id {index}: encoding not finite")
            if metadata.get("id") != index:
                problems.append(f"{path}: id {index}: its metadata says id {metadata.get('id')!r}")
            ids.append(np.asarray([index], dtype=np.int64))
            where.append(path.name)
    all_ids = np.concatenate(ids) if ids else np.empty(0, dtype=np.int64)
    counts = Counter(all_ids.tolist())
    repeated = {i: c for i, c in counts.items() if c > 1}
    for index, count in sorted(repeated.items())[:MAX_LISTED]:
        files = sorted({where[k] for k in np.flatnonzero(all_ids == index)})
        problems.append(f"{store}: id {index}: stored {count} times ({', '.join(files)})")
    staging = store / STAGING
    if staging.exists():
        left = [p for p in staging.rglob("*") if p.is_file()]
        if left:
            problems.append(f"{staging}: {len(left)} files left in staging (a stopped encode; a rerun removes them)")
    if manifest.get("complete") and manifest.get("items") not in (None, len(counts)):
        problems.append(f"{store / MANIFEST}: says {manifest.get('items')} items, the store holds {len(counts)}")
    result: dict[str, Any] = {"store": str(store), "layout": layout, "units": units, "items": len(counts)}
    if data is not None:
        expected = _expected_ids(data, manifest)
        missing = np.setdiff1d(expected, all_ids)
        extra = np.setdiff1d(all_ids, expected)
        problems.extend(f"{store}: id {i}: missing (in {data}, not stored)" for i in missing[:MAX_LISTED].tolist())
        problems.extend(f"{store}: id {i}: stored but not in {data}'s selection" for i in extra[:MAX_LISTED].tolist())
        if len(missing) > MAX_LISTED or len(extra) > MAX_LISTED:
            problems.append(f"{store}: {len(missing)} ids missing and {len(extra)} extra in all")
        result["expected"] = int(len(expected))
    return result, problems


def _expected_ids(data: str | Path, manifest: dict[str, Any]) -> np.ndarray:
    from quackae.prepared import load_prepared, verify_fingerprint
    from quackae.selection import selected_rows

    dataset, _, _ = load_prepared(data)
    fingerprint = manifest.get("dataset_fingerprint")
    if fingerprint and fingerprint != verify_fingerprint(data):
        raise QuackError(f"{data} is not the dataset this store was encoded from (its fingerprint differs)")
    ids = np.asarray(dataset.data.column("id").to_numpy(), dtype=np.int64)
    return np.unique(ids[selected_rows(dataset, manifest.get("selection") or {})])


def verify(config: VerifyConfig) -> dict[str, Any]:
    """Run ``quackae verify``: the counts, or every problem under ``lines`` with ``exit_code`` 1."""
    store = Path(config.store)
    result, problems = check_store(store, config.data)
    counts = f"{result['items']} items in {result['units']} {'shards' if result['layout'] == 'shards' else 'files'}"
    if "expected" in result:
        counts += f", {result['expected']} expected from {config.data}"
    if problems:
        return {
            **result,
            "problems": len(problems),
            "exit_code": 1,
            "lines": [*problems, f"{store}: {len(problems)} problems ({counts})"],
        }
    return {**result, "problems": 0, "lines": [f"{store}: ok, {counts}"]}
