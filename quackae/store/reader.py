"""``EncodingStore``: read a store that ``quackae encode`` wrote (either layout), for every reader.

Shards are memory-mapped Arrow IPC files; items are read with ``numpy.load(..., allow_pickle=False)``.
Reading a store never executes code. Glossary: N items, H encoding size.
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
from quackae.store.items import item_files, item_path, load_item, read_item
from quackae.store.manifest import DESCRIPTIONS, differing, ids_digest, manifest_problem
from quackae.store.ownership import foreign_entries
from quackae.store.shards import (
    MANIFEST,
    layout_of,
    open_shard,
    read_manifest,
    shard_files,
    shard_matrix,
    shard_provenance,
    store_folder_problem,
)
from quackae.store.tables import TorchView, arrow_column, empty_matrix, read_parquet

log = logging.getLogger(__name__)

__all__ = ["EncodingStore", "read_encodings", "read_item"]


class EncodingStore:
    """A store folder: ``manifest.json`` plus ``shards/`` (default) or one ``.npz`` per item.

    ``len``, ``store[id] -> (encoding, metadata)`` (``KeyError`` for an unknown id), iteration over
    ``(id, encoding, metadata)`` in id order, ``ids()``, ``to_numpy() -> (ids, matrix)``,
    ``to_arrow()``, ``to_dataset()`` (HF ``datasets``), ``torch_dataset()`` and ``export(file.parquet)``.
    A corrupt shard or item raises a one-line ``QuackError`` naming the file.
    """

    def __init__(self, path: str | Path, warn: bool = True) -> None:
        """``warn``: log that the store is partial or unsound and is read anyway (a whole-store reader that then
        refuses it with ``check_usable`` passes False, so that one mistake is one line)."""
        self.path = Path(path)
        self._warn = warn
        if store_folder_problem(self.path) is not None:
            raise QuackError(store_folder_problem(self.path))
        self.manifest: dict[str, Any] = read_manifest(self.path) or {}
        self.layout = layout_of(self.path, self.manifest)
        self._tables: list[Any] = []
        self._repeated = 0
        self._loaded: tuple[np.ndarray, list[dict[str, Any]], list[Any]] | None = None  # files layout, read once
        if self.layout == "shards":
            self._open_shards()
        else:
            found = item_files(self.path)
            self._ids = np.asarray([i for i, _ in found], dtype=np.int64)
            self._files = {i: p for i, p in found}
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

    def _open_shards(self) -> None:
        ids, shard, row = [], [], []
        for number, path in enumerate(shard_files(self.path)):
            table = open_shard(path)
            self._tables.append((path, table))
            column = table.column("id").to_numpy()  # (n,)
            ids.append(column)
            shard.append(np.full(len(column), number, dtype=np.int32))
            row.append(np.arange(len(column), dtype=np.int64))
        all_ids = np.concatenate(ids) if ids else np.empty(0, dtype=np.int64)
        unique, first = np.unique(all_ids, return_index=True)
        self._repeated = len(all_ids) - len(unique)
        if self._repeated and self._warn:
            log.warning(
                "%s stores %d ids more than once; reading the first copy (quackae verify lists them)",
                self.path,
                len(all_ids) - len(unique),
            )
        self._ids = unique  # (N,) sorted
        self._shard = np.concatenate(shard)[first] if ids else np.empty(0, dtype=np.int32)
        self._row = np.concatenate(row)[first] if ids else np.empty(0, dtype=np.int64)
        self._matrices: dict[int, np.ndarray] = {}
        self._metadata_tables: dict[int, Any] = {}

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

    def _matrix(self, shard: int) -> np.ndarray:
        matrix = self._matrices.get(shard)
        if matrix is None:
            matrix = self._matrices[shard] = shard_matrix(self._tables[shard][1])  # (n, H), memory-mapped
        return matrix

    def _metadata(self, shard: int) -> Any:
        table = self._metadata_tables.get(shard)
        if table is None:
            table = self._metadata_tables[shard] = self._tables[shard][1].drop_columns(["encoding"])
        return table

    def __getitem__(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"store ids are integers, and {index!r} is a {type(index).__name__}; use store[int(id)]")
        position = self._position(index)
        if position < 0:
            raise KeyError(f"id {index} is not in the store {self.path}")
        if self.layout == "files":
            return read_item(self._files[int(index)])
        shard, row = int(self._shard[position]), int(self._row[position])
        metadata = self._metadata(shard).slice(row, 1).to_pylist()[0]
        return np.array(self._matrix(shard)[row], dtype=np.float32), metadata

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
        if self._tables:
            return int(self._tables[0][1].schema.field("encoding").type.list_size)
        return int(self[int(self._ids[0])][0].shape[0]) if len(self._ids) else None

    def to_numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids (N,) int64, encodings (N, H) float32)`` in id order, with bulk column reads."""
        if self.layout == "files":
            if self._loaded is not None:
                return self._ids.copy(), self._loaded[0].copy()
            matrix = empty_matrix(len(self._ids), self.encoding_size or 0)  # (N, H)
            for position, index in enumerate(self._ids.tolist()):
                matrix[position] = self._encoding(index, matrix.shape[1])
            return self._ids.copy(), matrix
        size = self.encoding_size or 0
        matrix = empty_matrix(len(self._ids), size)  # (N, H)
        grouped = np.argsort(self._shard, kind="stable")  # output positions grouped by shard, in id order
        bounds = np.searchsorted(self._shard[grouped], np.arange(len(self._tables) + 1))
        for shard in range(len(self._tables)):
            positions = grouped[bounds[shard] : bounds[shard + 1]]  # rows of the output this shard fills
            if not len(positions):
                continue
            source = self._matrix(shard)  # (n, H)
            if source.shape[1] != size:
                raise QuackError(f"shard {self._tables[shard][0]} has {source.shape[1]}-d encodings, not {size}")
            rows = self._row[positions]
            start = int(positions[0])
            if len(rows) == len(source) and positions[-1] - start == len(rows) - 1 and (np.diff(rows) == 1).all():
                matrix[start : start + len(rows)] = source  # ids in order within and across shards: one copy
            elif len(rows) == len(source):
                target = np.empty(len(source), dtype=np.int64)
                target[rows] = positions
                matrix[target] = source  # (n, H) scattered into id order, one pass
            else:
                matrix[positions] = source[rows]  # a shard with repeated ids: only the first copies count
        return self._ids.copy(), matrix

    def _items(self) -> tuple[np.ndarray, list[dict[str, Any]], list[Any]]:
        """Files layout: ``(encodings (N, H), metadata, provenance)`` of every item in id order, each file read once."""
        if self._loaded is None:
            size = self.encoding_size or 0
            matrix = empty_matrix(len(self._ids), size)  # (N, H)
            metadata, provenance = [], []
            for position, index in enumerate(self._ids.tolist()):
                item = load_item(self._files[index])
                matrix[position] = self._encoding(index, size, item)
                metadata.append(item.metadata)
                provenance.append(item.provenance)
            self._loaded = (matrix, metadata, provenance)
        return self._loaded

    def _encoding(self, index: int, size: int, item: Any = None) -> np.ndarray:
        """Files layout: item ``index``'s encoding, refused in one line unless it has ``size`` values."""
        encoding = (item or load_item(self._files[index])).encoding
        if encoding.shape != (size,):
            raise QuackError(f"stored item {self._files[index]} has {encoding.shape[0]} values, not {size}")
        return encoding

    def _units(self) -> Iterator[tuple[Path, Any, np.ndarray, np.ndarray, Any]]:
        """``(file, provenance, ids (n,), encodings (n, H), the id an item's metadata names)`` of every shard (the
        last is None), or of every item (n = 1)."""
        if self.layout == "shards":
            for number, (path, table) in enumerate(self._tables):
                yield path, shard_provenance(table, path), table.column("id").to_numpy(), self._matrix(number), None
            return
        matrix, metadata, provenance = self._items()
        for position, index in enumerate(self._ids.tolist()):
            rows = slice(position, position + 1)
            named = metadata[position].get("id")
            yield self._files[index], provenance[position], self._ids[rows], matrix[rows], named

    def check_usable(self) -> None:
        """Refuse, in one line naming the store and the fix, a store that a reader of the whole store for a
        downstream result (``quackae export``, ``quackae classify``) must not use: one that is not complete (no
        valid manifest marked complete whose count is what the store holds) or not sound (an id stored twice, a
        unit of other provenance than the manifest's or with an encoding that is not finite, an item at another
        id's path). This is the one rule; ``EncodingStore(path)`` alone still opens partial stores (with a
        warning), as reading while an encode runs is legitimate. Reads every encoding (once: the files layout
        keeps what it read)."""
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
        for path, provenance, ids, matrix, named in self._units():
            if named is not None and named != ids[0]:
                raise QuackError(f"{where} is not sound: {path} holds the item of id {named!r}, not {ids[0]}; {redo}")
            keys = differing(provenance, self.manifest)
            if keys:
                made = f"was made with {DESCRIPTIONS[keys[0]]}" if provenance else "carries no provenance"
                raise QuackError(f"{where} is not sound: {path} {made} ({keys[0]}), not what its manifest says; {redo}")
            bad = np.flatnonzero(~np.isfinite(matrix).all(axis=1))
            if len(bad):
                raise QuackError(
                    f"{where} is not sound: {path} holds {len(bad)} encodings that are not finite (id {ids[bad[0]]}); "
                    f"{redo}"
                )

    def to_arrow(self) -> Any:
        """One Arrow table in id order: ``id``, ``encoding`` (fixed_size_list<float32>[H]), the metadata columns
        with the types the shards hold (files layout: inferred over all items, never from one row)."""
        import pyarrow as pa

        if self.layout == "shards":
            if not self._tables:
                return pa.table({"id": pa.array([], pa.int64())})
            tables = [t for _, t in self._tables]
            table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables], promote_options="permissive")
            offsets = np.cumsum([0] + [t.num_rows for t in tables[:-1]])
            return table.take(pa.array(offsets[self._shard] + self._row))
        from quackae.store.shards import shard_table

        ids, (matrix, metadata, _) = self._ids, self._items()
        names = list(dict.fromkeys(k for meta in metadata for k in meta if k not in ("id", "encoding")))
        columns = pa.table({name: arrow_column(name, [m.get(name) for m in metadata]) for name in names})
        return shard_table(ids, matrix, columns if names else None, None)

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
