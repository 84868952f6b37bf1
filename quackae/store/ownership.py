"""Whether ``quackae encode`` may write into a folder, or empty it: a store folder holds only what quackae writes.

What quackae writes in a store: ``manifest.json``, ``.lock``, ``.staging/``, ``.quarantine/``, ``shards/*.arrow``
and the item folders (``{id // 100000}/{id % 100000 // 1000}/{id}.npz`` and ``.png``). Any other entry is
foreign: encode refuses to write beside it and ``--overwrite`` refuses to empty its folder. ``--overwrite``
also needs proof that the folder is a store: a valid manifest (``quackae.store.manifest.manifest_problem``), or a
shard or item carrying quackae's provenance; a hand-made ``manifest.json`` of ``{}`` is no such proof. A store
never overlaps the prepared data or the model it is made from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from quackae.core.errors import QuackError
from quackae.store.items import item_entries
from quackae.store.layout import LAYOUTS, known
from quackae.store.manifest import (
    LOCK,
    MANIFEST,
    QUARANTINE,
    STAGING,
    manifest_problem,
    provenance_problem,
    read_manifest,
)

_OURS = (MANIFEST, LOCK, STAGING, QUARANTINE)
_PROOF_UNITS = 16  # units opened at most when looking for one that carries quackae's provenance


def _is_number(name: str) -> bool:
    return name.isascii() and name.isdigit() and str(int(name)) == name


def foreign_entries(store: Path, deep: bool) -> list[Path]:
    """The entries of ``store`` that quackae does not write; ``deep`` also walks the item folders."""
    if not store.is_dir():
        return []
    foreign = []
    suffixes = {LAYOUTS[name].folder: LAYOUTS[name].suffix for name in known() if LAYOUTS[name].folder}
    with os.scandir(store) as entries:
        for entry in entries:
            if entry.name in _OURS or (_is_number(entry.name) and entry.is_dir(follow_symlinks=False)):
                continue
            if entry.name in suffixes:  # a layout's folder; of another kind than a folder: check_store_folders refuses
                if entry.is_dir(follow_symlinks=False):
                    suffix = suffixes[entry.name]
                    with os.scandir(entry.path) as units:
                        foreign.extend(
                            Path(u.path) for u in units if not u.name.endswith(suffix) or u.name.startswith(".")
                        )
                continue
            foreign.append(Path(entry.path))
    if deep:
        foreign.extend(item_entries(store).foreign)
    return sorted(foreign)


def _foreign_line(foreign: list[Path]) -> str:
    more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
    return f"it holds {foreign[0]}{more}, which quackae does not write"


def overlap_problem(store: Path, header: dict[str, Any]) -> str | None:
    """Why ``store`` may not be a store of data and a model the header names (it is, is inside or contains the
    prepared folder, the model's RUN or its checkpoint), else None."""
    out = Path(os.path.realpath(store))
    guarded = [("the prepared data", header.get("dataset")), ("the checkpoint", header.get("checkpoint"))]
    if header.get("tokenizer"):
        guarded.append(("the model's RUN", str(Path(header["tokenizer"]).parent)))
    for what, value in guarded:
        if not value:
            continue
        other = Path(os.path.realpath(value))
        if out == other:
            return f"is {what}"
        if other in out.parents:
            return f"is inside {what} {other}"
        if out in other.parents:
            return f"contains {what} {other}"
    return None


def check_out_folder(store: Path, header: dict[str, Any]) -> None:
    """Refuse, before anything is written there, an ``--out`` that overlaps the inputs or holds foreign entries."""
    overlap = overlap_problem(store, header)
    if overlap is not None:
        raise QuackError(f"--out {store} {overlap}; a store needs a folder of its own, choose another --out")
    foreign = foreign_entries(store, deep=True)
    if foreign:
        raise QuackError(
            f"--out {store} is not a store folder: {_foreign_line(foreign)}; choose a new or empty folder for --out"
        )


def _holds_nothing(store: Path) -> bool:
    """Whether ``store`` holds no file but the lock and staging (what a start that wrote nothing leaves)."""
    for folder, folders, files in os.walk(store):
        if Path(folder) == store:
            folders[:] = [f for f in folders if f != STAGING]
            files = [f for f in files if f != LOCK]
        if files:
            return False
    return True


def _carries_provenance(store: Path) -> bool:
    """Whether one of the first shards or items of ``store`` carries a complete quackae provenance."""
    for name in known():
        layout = LAYOUTS[name]
        for path in layout.units(store)[:_PROOF_UNITS]:
            try:
                provenance = layout.read(path).provenance
            except QuackError:
                continue
            if provenance is not None and provenance_problem(provenance) is None:
                return True
    return False


def overwrite_problem(store: Path) -> str | None:
    """Why ``--overwrite`` may not empty ``store`` (it is no quackae store), else None."""
    foreign = foreign_entries(store, deep=True)
    if foreign:
        return _foreign_line(foreign)
    try:
        manifest = read_manifest(store)
        why = f"it has no {MANIFEST}" if manifest is None else manifest_problem(manifest)
        why = why and (why if manifest is None else f"its {MANIFEST} is not a store manifest: {why}")
    except QuackError as error:
        why = str(error).split(";")[0]  # what is wrong with it, without the fix read_manifest suggests
    if why is None or _holds_nothing(store) or _carries_provenance(store):
        return None
    return f"{why}, and none of its shards or items carries quackae's provenance"
