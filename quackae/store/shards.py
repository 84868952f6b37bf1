"""The shards layout (``SHARDS``) on disk and its atomic commits.

``shards`` (the default): ``STORE/shards/*.arrow``, each one complete Arrow IPC file (Feather v2,
uncompressed) with ``id`` int64, ``encoding`` ``fixed_size_list<float32>[H]`` and the metadata
columns with their Arrow types; the store's provenance is in every shard's schema metadata.
``files``: one ``.npz`` per item at ``STORE/item_path(id, "npz")`` (``quackae.store.items``).

A unit (shard or item) is written under ``STORE/.staging/{job}-{rank}/``, flushed, and renamed into place;
a shard is fsynced and so is its folder after the rename. Nothing here pickles; reading never
executes code, never opens what is not a regular file and never trusts a size a file declares.
Glossary: N items, H encoding size.
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np

from quackae.core.atomic import TEMPORARY_SUFFIX, fsync_dir
from quackae.core.errors import QuackError
from quackae.store.layout import CorruptUnit, Layout, Unit, open_unit, register, unit_kind
from quackae.store.manifest import (  # manifest_path, read_manifest: read from here by older callers
    SHARD_FOLDER,
    STORE_FOLDERS,
    manifest_path,  # noqa: F401
    read_manifest,  # noqa: F401
)

DEFAULT_SHARD_SIZE = 16_384  # items per shard and rank
SHARD_SUFFIX = ".arrow"
PROVENANCE_KEY = b"quackae"


def check_store_folders(store: Path) -> None:
    """Refuse a store whose staging, shard or quarantine folder is a symbolic link or not a folder at all: units
    are renamed between them, and a rename across file systems is not atomic (nor is deleting through a link safe)."""
    for name in STORE_FOLDERS:
        kind = unit_kind(store / name)
        if kind == "a symbolic link":
            raise QuackError(
                f"{store / name} is a symbolic link; quackae keeps {name} inside the store itself, remove the link"
            )
        if kind not in ("missing", "a directory"):
            raise QuackError(
                f"{store / name} is {kind or 'a file'}, not a folder; quackae keeps its {name} folder there, remove it"
            )


# ---------------------------------------------------------------------------------------------- shards
def shard_table(ids: np.ndarray, matrix: np.ndarray, columns: Any, provenance: dict[str, Any] | None) -> Any:
    """An Arrow table ``id``, ``encoding`` (fixed_size_list<float32>[H]), then ``columns`` (a pyarrow table,
    without ``id``), with ``provenance`` as schema metadata. Built from numpy in bulk, no per-item work."""
    import pyarrow as pa

    ids = np.ascontiguousarray(ids, dtype=np.int64)  # (N,)
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)  # (N, H)
    encoding = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])  # (N*H,) -> N x H
    arrays, names = [pa.array(ids), encoding], ["id", "encoding"]
    if columns is not None:
        columns = columns.combine_chunks()  # one record batch per shard: readers map `encoding` without copying
        for name in columns.column_names:
            if name not in ("id", "encoding"):
                arrays.append(columns.column(name))
                names.append(name)
    table = pa.Table.from_arrays(arrays, names=names)
    if provenance is not None:
        table = table.replace_schema_metadata({PROVENANCE_KEY: json.dumps(provenance, sort_keys=True).encode()})
    return table


def column_names(metadata: Any) -> list[str]:
    """The metadata field names of a batch: a pyarrow table's columns, a dict's keys, the first dict's keys."""
    if hasattr(metadata, "column_names"):
        return list(metadata.column_names)
    if isinstance(metadata, dict):
        return list(metadata)
    return list(metadata[0]) if len(metadata) else []


def metadata_table(metadata: Any, schema: Any = None) -> Any:
    """A batch's metadata as a ``pyarrow.Table`` (one row per item), columns typed by ``schema`` where it names them.

    ``metadata``: a ``pyarrow.Table``/``RecordBatch`` (kept as is, cast to ``schema``'s types where they differ),
    a dict of columns, or a list of per-item dicts (one typed array per column: ``from_pylist`` with a schema is
    100x slower). Columns ``schema`` does not name keep inferred types.
    """
    import pyarrow as pa

    if isinstance(metadata, pa.RecordBatch):
        metadata = pa.Table.from_batches([metadata])
    types = {f.name: f.type for f in schema} if schema is not None else {}
    if isinstance(metadata, pa.Table):
        for position, name in enumerate(metadata.column_names):
            wanted = types.get(name)
            if wanted is not None and metadata.schema.field(name).type != wanted:
                metadata = metadata.set_column(position, name, metadata.column(name).cast(wanted))
        return metadata
    if isinstance(metadata, dict):
        columns = metadata
    else:
        names = list(dict.fromkeys([*types, *(k for m in metadata for k in m)]))
        columns = {name: [m.get(name) for m in metadata] for name in names}
    return pa.table({name: pa.array(values, type=types.get(name)) for name, values in columns.items()})


def write_shard(table: Any, staging: Path, shards: Path, name: str) -> Path:
    """Commit ``table`` as ``shards/name``: staging file, flush, fsync, rename, fsync the folder.

    An existing shard of that name is never replaced (``QuackError``): committed shards are final.
    """
    import pyarrow as pa

    final = shards / name
    tmp = staging / f"{name}{TEMPORARY_SUFFIX}"
    with open(tmp, "wb") as handle:
        with pa.ipc.new_file(handle, table.schema) as writer:
            writer.write_table(table)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(tmp, final)  # fails if the name exists: never overwrite a committed shard
    except FileExistsError:
        os.unlink(tmp)
        raise QuackError(f"shard {final} already exists; committed shards are never rewritten") from None
    os.unlink(tmp)
    fsync_dir(shards)
    return final


def open_shard(path: Path) -> Any:
    """The memory-mapped Arrow table of one shard; ``CorruptUnit`` naming the file if it is not a regular file,
    does not parse, declares more rows than its buffers hold, or lacks a non-null ``id`` int64 and ``encoding``
    ``fixed_size_list<float32>`` column. What is not a regular file is never opened for reading."""
    import pyarrow as pa

    fd, _ = open_unit(path)
    try:
        mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as error:
        raise CorruptUnit(path, str(error)) from None
    finally:
        os.close(fd)
    try:
        table = pa.ipc.open_file(pa.py_buffer(mapped)).read_all()
        table.validate(full=True)  # buffers hold what the rows declare, offsets stay in bounds (~0.3 ms a shard)
    except (pa.ArrowException, OSError, ValueError) as error:
        raise CorruptUnit(path, (str(error).splitlines() or ["unreadable"])[0]) from None
    names = table.column_names
    if "id" not in names or "encoding" not in names or len(set(names)) != len(names):
        raise CorruptUnit(path, "no id/encoding column, or a column name twice")
    encoding = table.schema.field("encoding").type
    if (
        not pa.types.is_int64(table.schema.field("id").type)
        or not pa.types.is_fixed_size_list(encoding)
        or not pa.types.is_float32(encoding.value_type)
        or encoding.list_size < 1
    ):
        raise CorruptUnit(path, "unexpected column types")
    if table.column("id").null_count or table.column("encoding").null_count:
        raise CorruptUnit(path, "null ids or encodings")
    return table


def shard_matrix(table: Any) -> np.ndarray:
    """The ``encoding`` column as a (N, H) float32 array, zero-copy where the shard has one chunk."""
    column = table.column("encoding")
    size = column.type.list_size
    parts = []
    for chunk in column.chunks:
        values = chunk.flatten().to_numpy(zero_copy_only=False)  # (n*H,)
        parts.append(values.reshape(-1, size))  # (n, H)
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.empty((0, size), dtype=np.float32)


def shard_provenance(table: Any, path: Path) -> dict[str, Any] | None:
    """The provenance in a shard's schema metadata, None when it carries none; ``CorruptUnit`` when it is not
    a JSON object."""
    raw = (table.schema.metadata or {}).get(PROVENANCE_KEY)
    if raw is None:
        return None
    try:
        provenance = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise CorruptUnit(path, "its provenance is not JSON") from None
    if not isinstance(provenance, dict):
        raise CorruptUnit(path, "its provenance is not a JSON object")
    return provenance


def all_finite(matrix: np.ndarray) -> bool:
    """Whether every value of ``matrix`` is finite (no NaN, no infinity)."""
    return bool(np.isfinite(matrix).all())


def shard_files(store: Path) -> list[Path]:
    """Every entry of ``STORE/shards/`` named like a shard, whatever it is (a reader refuses what is not a file)."""
    folder = store / SHARD_FOLDER
    if not folder.is_dir() or folder.is_symlink():
        return []
    return sorted(p for p in folder.iterdir() if p.name.endswith(SHARD_SUFFIX) and not p.name.startswith("."))


class ShardBuffer:
    """One shard's rows as they arrive: each batch's ids (n,), encodings (n, H) and metadata table, kept as given
    (not copied); ``rows()`` gathers them in id order into an (S, H) array allocated once and reused, the one
    copy of the encodings before the file is written. A shard is stored sorted by id, so that a store whose
    shards cover id ranges reads back with one copy per shard. ``pending`` is the commit still reading it.
    """

    def __init__(self, capacity: int, size: int) -> None:
        self.capacity = capacity
        self.size = size
        self.matrix: np.ndarray | None = None  # (S, H) the id-ordered rows, allocated on first need
        self.pieces: list[tuple[np.ndarray, np.ndarray, Any]] = []
        self.fill = 0
        self.pending: Any = None

    def detach(self) -> list[tuple[np.ndarray, np.ndarray, Any]]:
        """The rows added so far (for ``rows``); the buffer is empty again, its (S, H) array kept for them."""
        pieces = self.pieces
        self.pieces, self.fill = [], 0
        return pieces

    def rows(self, pieces: list[tuple[np.ndarray, np.ndarray, Any]]) -> tuple[np.ndarray, np.ndarray, Any]:
        """``(ids (n,), encodings (n, H), metadata table or None)`` of ``pieces`` (from ``detach``) in id order;
        the encodings are a view of this buffer's memory, valid until it is refilled."""
        import pyarrow as pa

        count = sum(len(p[0]) for p in pieces)
        ids = np.concatenate([p[0] for p in pieces]) if pieces else np.empty(0, dtype=np.int64)
        if self.matrix is None:
            self.matrix = np.empty((self.capacity, self.size), dtype=np.float32)
        matrix = self.matrix[:count]  # (n, H)
        tables = [p[2] for p in pieces if p[2] is not None]
        columns = pa.concat_tables(tables, promote_options="permissive") if tables else None
        order = np.argsort(ids, kind="stable") if count > 1 and not bool((ids[1:] > ids[:-1]).all()) else None
        place = np.empty(count, dtype=np.int64)
        if order is not None:
            place[order] = np.arange(count)  # (n,) each arriving row's position in id order
            ids = ids[order]
            columns = None if columns is None else columns.take(pa.array(order))
        start = 0
        for _, piece, _ in pieces:
            end = start + len(piece)
            if order is None:
                matrix[start:end] = piece  # (n_i, H), already in place
            else:
                matrix[place[start:end]] = piece  # (n_i, H) scattered to their id-ordered rows
            start = end
        return ids, matrix, columns

    def add(self, ids: np.ndarray, matrix: np.ndarray, columns: Any, start: int) -> int:
        """Keep rows ``start:`` of a batch (as many as fit); returns how many it took. The arrays are referenced,
        not copied: they must not change until the shard is written."""
        take = min(self.capacity - self.fill, len(ids) - start)
        piece = None if columns is None else columns.slice(start, take)
        self.pieces.append((ids[start : start + take], matrix[start : start + take], piece))
        self.fill += take
        return take

    def wait(self) -> None:
        """Block until the shard last committed from this buffer is on disk; raises its error."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()


class ShardsLayout(Layout):
    """``shards``: Arrow IPC files under ``STORE/shards/``, in name order; each memory-mapped when read."""

    name = "shards"
    buffered = True
    mapped = True
    rank = 0
    unit_word = "shards"
    folder = SHARD_FOLDER
    suffix = SHARD_SUFFIX

    def units(self, store: Path) -> list[Path]:
        return shard_files(store)

    def read(self, path: Path) -> Unit:
        table = open_shard(path)
        ids = table.column("id").to_numpy()  # (n,)
        return Unit(Path(path), ids, shard_matrix(table), shard_provenance(table, path), table)

    def row(self, unit: Unit, row: int) -> dict[str, Any]:
        return unit.metadata.drop_columns(["encoding"]).slice(row, 1).to_pylist()[0]

    def prepare(self, store: Path) -> None:
        (store / SHARD_FOLDER).mkdir(exist_ok=True)

    def commit(
        self, store: Path, staging: Path, name: str, ids: np.ndarray, matrix: np.ndarray, columns: Any, header: Any
    ) -> int:
        write_shard(shard_table(ids, matrix, columns, header or None), staging, store / SHARD_FOLDER, name)
        return len(ids)

    def table(self, units: list[Unit]) -> Any:
        import pyarrow as pa

        if not units:
            return pa.table({"id": pa.array([], pa.int64())})
        tables = [unit.metadata.replace_schema_metadata(None) for unit in units]
        return pa.concat_tables(tables, promote_options="permissive")


SHARDS = register(ShardsLayout())
