"""``EncodingStore``: read a store that ``quackae encode`` wrote (any layout), for every reader.

The store's layout (``quackae.store.layout``) lists and reads its units; memory-mapped ones (shards) are
opened at once, others (items) when read. Reading a store never executes code. Glossary: N items, H
encoding size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from quackae.core.atomic import atomic_file
from quackae.core.errors import QuackError
from quackae.store.items import item_path, read_item
from quackae.store.layout import Unit, layout_of
from quackae.store.manifest import (
    MANIFEST,
    ids_digest,
    manifest_problem,
    read_manifest,
    store_folder_problem,
)
from quackae.store.ownership import foreign_entries
from quackae.store.sound import first_copies, unit_problems
from quackae.store.tables import TorchView, empty_matrix, read_parquet

log = logging.getLogger(__name__)

__all__ = ["EncodingStore", "read_encodings", "read_item"]


class EncodingStore:
    """A store folder: ``manifest.json`` plus its layout's units (``shards/`` by default, or one ``.npz`` per item).

    ``len``, ``store[id] -> (encoding, metadata)`` (``KeyError`` for an unknown id), iteration over
    ``(id, encoding, metadata)`` in id order, ``ids()``, ``to_numpy() -> (ids, matrix)``,
    ``to_arrow()``, ``to_dataset()`` (HF ``datasets``), ``torch_dataset()`` and ``export(file.parquet)``.
    A corrupt unit raises a one-line ``QuackError`` naming the file. Where an id is stored more than once
    the first copy counts (``quackae.store.sound.first_copies``).
    """

    def __init__(self, path: str | Path, warn: bool = True) -> None:
        """``warn``: log that the store is partial or unsound and is read anyway (a whole-store reader that then
        refuses it with ``check_usable`` passes False, so that one mistake is one line)."""
        self.path = Path(path)
        self._warn = warn
        if store_folder_problem(self.path) is not None:
            raise QuackError(store_folder_problem(self.path))
        self.manifest: dict[str, Any] = read_manifest(self.path) or {}
        self._layout = layout_of(self.path, self.manifest)
        self.layout = self._layout.name
        self._paths = self._layout.units(self.path)
        self._read: dict[int, Unit] = {}  # units read so far (memory-mapped layouts: every one, kept)
        if self._layout.mapped:
            self._read = {number: self._layout.read(path) for number, path in enumerate(self._paths)}
            id_lists = [self._read[number].ids for number in range(len(self._paths))]
        else:
            id_lists = [self._layout.ids(path) for path in self._paths]
        self._ids, self._unit, self._row, later = first_copies(id_lists)  # (N,) sorted; each id's first copy
        self._repeated = len(later)
        if self._repeated and warn:
            log.warning(
                "%s stores %d ids more than once; reading the first copy (quackae verify lists them)",
                self.path,
                self._repeated,
            )
        self._all_read = False
        if warn and not os.path.lexists(self.path / MANIFEST):
            log.warning(
                "%s has no %s (a stopped encode?); reading the %d items it holds", self.path, MANIFEST, len(self._ids)
            )
        elif warn and manifest_problem(self.manifest) is not None:
            log.warning(
                "%s: %s is not a valid store manifest (%s); reading the %d items it holds",
                self.path,
                MANIFEST,
                manifest_problem(self.manifest),
                len(self._ids),
            )
        elif warn and self.manifest.get("complete") is False:
            log.warning("%s is incomplete (an encode is running or stopped); it holds %d items", self.path, len(self))

    def __len__(self) -> int:
        return len(self._ids)

    def _position(self, index: object) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            return -1
        position = int(np.searchsorted(self._ids, index))
        return position if position < len(self._ids) and self._ids[position] == index else -1

    def __contains__(self, index: object) -> bool:
        return self._position(index) >= 0

    def ids(self) -> list[int]:
        return self._ids.tolist()

    def _get(self, number: int, keep: bool = False) -> Unit:
        """Unit ``number`` read whole; kept when the layout maps it or ``keep`` (a whole-store read)."""
        unit = self._read.get(number)
        if unit is None:
            unit = self._layout.read(self._paths[number])
            if keep:
                self._read[number] = unit
        return unit

    def _units(self) -> list[Unit]:
        """Every unit read whole, in the layout's order (each file read once: kept for later whole-store reads)."""
        if not self._all_read:
            for number in range(len(self._paths)):
                self._get(number, keep=True)
            self._all_read = True
        return [self._read[number] for number in range(len(self._paths))]

    def __getitem__(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"store ids are integers, and {index!r} is a {type(index).__name__}; use store[int(id)]")
        position = self._position(index)
        if position < 0:
            raise KeyError(f"id {index} is not in the store {self.path}")
        unit = self._get(int(self._unit[position]))
        row = int(self._row[position])
        return np.array(unit.matrix[row], dtype=np.float32), self._layout.row(unit, row)

    def item_path(self, index: int, suffix: str = "npz") -> Path:
        """Where item ``index``'s own file lives (its ``.npz`` in the files layout, its ``--png`` picture in both)."""
        return self.path / item_path(index, suffix)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, dict[str, Any]]]:
        for index in self._ids.tolist():
            encoding, metadata = self[index]
            yield index, encoding, metadata

    @property
    def encoding_size(self) -> int | None:
        size = self.manifest.get("encoding_size")
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            return size
        if self._read:
            return int(next(iter(self._read.values())).matrix.shape[1])
        return int(self[int(self._ids[0])][0].shape[0]) if len(self._ids) else None

    def to_numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids (N,) int64, encodings (N, H) float32)`` in id order, with bulk column reads."""
        size = self.encoding_size or 0
        matrix = empty_matrix(len(self._ids), size)  # (N, H)
        grouped = np.argsort(self._unit, kind="stable")  # output positions grouped by unit, in id order
        bounds = np.searchsorted(self._unit[grouped], np.arange(len(self._paths) + 1))
        for number, unit in enumerate(self._units()):
            positions = grouped[bounds[number] : bounds[number + 1]]  # rows of the output this unit fills
            if not len(positions):
                continue
            source = unit.matrix  # (n, H)
            if source.shape[1] != size:
                raise QuackError(f"{unit.path} has {source.shape[1]}-d encodings, not {size}")
            rows = self._row[positions]
            start = int(positions[0])
            if len(rows) == len(source) and positions[-1] - start == len(rows) - 1 and (np.diff(rows) == 1).all():
                matrix[start : start + len(rows)] = source  # ids in order within and across units: one copy
            elif len(rows) == len(source):
                target = np.empty(len(source), dtype=np.int64)
                target[rows] = positions
                matrix[target] = source  # (n, H) scattered into id order, one pass
            else:
                matrix[positions] = source[rows]  # a unit with repeated ids: only the first copies count
        return self._ids.copy(), matrix

    def check_usable(self) -> None:
        """Refuse, in one line naming the store and the fix, a store that a reader of the whole store for a
        downstream result (``quackae export``, ``quackae classify``) must not use: one that is not complete (no
        valid manifest marked complete whose count is what the store holds) or not sound (an id stored twice, a
        unit with a problem: ``quackae.store.sound.unit_problems``). This is the one rule; ``EncodingStore(path)``
        alone still opens partial stores (with a warning), as reading while an encode runs is legitimate. Reads
        every encoding (once: what it read is kept)."""
        where = f"store {self.path}"
        again = f"encode it again with quackae encode --out {self.path} --overwrite"
        redo = f"rerun quackae encode --out {self.path} to quarantine and redo it"
        if not os.path.lexists(self.path / MANIFEST):
            if not len(self):
                raise QuackError(f"{where} holds no items; nothing to export or classify (run quackae encode first)")
            raise QuackError(f"{where} has no {MANIFEST}, so what made its items is unknown; {again}")
        problem = manifest_problem(self.manifest)
        if problem is not None:
            raise QuackError(f"{where} is not usable: its {MANIFEST} is not a valid manifest ({problem}); {again}")
        if not self.manifest["complete"]:
            raise QuackError(
                f"{where} is incomplete (an encode is running or was stopped; {len(self)} items so far); "
                f"rerun quackae encode --out {self.path} to finish it"
            )
        if self._repeated:
            raise QuackError(f"{where} is not sound: {self._repeated} ids are stored more than once; {redo}")
        foreign = foreign_entries(self.path, deep=True)
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise QuackError(
                f"{where} is not usable: it holds {foreign[0]}{more}, which quackae does not write; "
                "move it out of the store"
            )
        if self.manifest["items"] != len(self):
            raise QuackError(
                f"{where} is incomplete: its manifest counts {self.manifest['items']} items and it holds {len(self)} "
                f"(quackae verify {self.path} lists what is wrong); rerun quackae encode --out {self.path} to repair it"
            )
        if "ids_sha256" in self.manifest and ids_digest(self._ids) != self.manifest["ids_sha256"]:
            raise QuackError(
                f"{where} is not sound: the ids it holds are not those its manifest counted (a unit was replaced); "
                f"rerun quackae encode --out {self.path} to set aside what does not belong and redo it"
            )
        for unit in self._units():
            problems = unit_problems(unit, self.manifest)
            if problems:
                raise QuackError(f"{where} is not sound: {unit.path}: {problems[0]}; {redo}")

    def to_arrow(self) -> Any:
        """One Arrow table in id order: ``id``, ``encoding`` (fixed_size_list<float32>[H]), the metadata columns
        with the types the units hold (items: inferred over all items, never from one row)."""
        import pyarrow as pa

        units = self._units()
        table = self._layout.table(units)
        if not units:
            return table
        offsets = np.cumsum([0] + [len(unit.ids) for unit in units[:-1]])
        return table.take(pa.array(offsets[self._unit] + self._row))

    def load_all(self) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """``(ids (N,) int64, encodings (N, H) float32, metadata list)`` in id order."""
        ids, matrix = self.to_numpy()
        table = self.to_arrow()
        metadata = table.drop_columns(["encoding"]).to_pylist() if "encoding" in table.column_names else []
        return ids, matrix, metadata

    def records(self) -> dict[str, list[Any]]:
        """Columns ``id``, ``encoding`` and one per metadata field (None where an item lacks it), in id order."""
        return self.to_arrow().to_pydict()

    def to_dataset(self) -> Any:
        """A HF ``datasets.Dataset`` with the store's columns; types come from the shards' schema."""
        import datasets

        return datasets.Dataset(self.to_arrow())

    def export(self, file: str | Path) -> int:
        """Write one Parquet table (id, encoding, metadata columns) atomically; returns its row count."""
        import pyarrow.parquet as pq

        out = Path(file)
        if out.is_dir():
            raise QuackError(f"--out {out} is a directory; name a .parquet file to write")
        if not len(self):
            raise QuackError(f"store {self.path} holds no items; nothing to export (run quackae encode first)")
        table = self.to_arrow()
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(out, "wb") as handle:
            pq.write_table(table, handle)
        return table.num_rows

    def torch_dataset(self, label_field: str | None = None, classes: list[Any] | None = None) -> Any:
        """A torch ``Dataset`` of ``(encoding tensor (H,), metadata)`` or, with ``label_field``, only the
        labelled items as ``(encoding, class index)`` (``classes`` fixes the order; default sorted labels)."""
        return TorchView(self, label_field, classes)


def read_encodings(source: str | Path) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """``(ids (N,), encodings (N, H), metadata list)`` of a store that passes ``check_usable`` or of a Parquet file
    ``quackae export`` wrote; anything else is refused in one line naming it (what ``quackae classify`` reads)."""
    path = Path(source)
    if path.suffix == ".parquet":
        return read_parquet(path)
    store = EncodingStore(path, warn=False)
    store.check_usable()
    if not len(store):
        raise QuackError(f"store {path} holds no items")
    return store.load_all()
