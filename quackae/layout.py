"""The two store layouts on disk and their atomic commits.

``shards`` (the default): ``STORE/shards/*.arrow``, each one complete Arrow IPC file (Feather v2,
uncompressed) with ``id`` int64, ``encoding`` ``fixed_size_list<float32>[H]`` and the metadata
columns with their Arrow types; the store's provenance is in every shard's schema metadata.
``files``: one ``.npz`` per item at ``STORE/item_path(id, "npz")`` holding ``encoding`` (float32,
(H,)) and ``metadata`` (a 0-d unicode array with a JSON string).

A unit (shard or item) is written under ``STORE/.staging/{job}/``, flushed, and renamed into place;
a shard is fsynced and so is its folder after the rename. Nothing here pickles; reading never
executes code. Glossary: N items, H encoding size.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np

from quackae.atomic import TEMPORARY_SUFFIX, fsync_dir, write_atomic
from quackae.errors import QuackError

MANIFEST = "manifest.json"
SHARDS = "shards"
STAGING = ".staging"  # STORE/.staging/{job}/ holds one writer job's unfinished units
QUARANTINE = ".quarantine"  # corrupt shards or items an encode moved aside
LOCK = ".lock"
SHARD_SUFFIX = ".arrow"
PROVENANCE_KEY = b"quackae"
LAYOUTS = ("shards", "files")


def item_path(index: int, suffix: str = "png", dir_only: bool = False, is_collection: bool = False) -> str:
    """Relative path of item ``index``: ``f"{index // 100000}/{index % 100000 // 1000}/{index}.{suffix}"``.

    At most 1000 items share a folder. With ``is_collection`` the item gets a folder of its own
    (``.../{index}/{index}.{suffix}``); ``dir_only`` returns only the enclosing folder. Raises
    ``ValueError`` for a negative or non-integer index.
    """
    if isinstance(index, bool) or not isinstance(index, Integral) or index < 0:
        raise ValueError(f"item index must be a non-negative integer, got {index!r}")
    index = int(index)
    folder = f"{index // 100000}/{index % 100000 // 1000}"
    if is_collection:
        folder = f"{folder}/{index}"
    if dir_only:
        return folder
    return f"{folder}/{index}.{suffix}"


def check_no_symlinks(store: Path) -> None:
    """Refuse a store whose staging, shard or quarantine folder is a symbolic link: units are renamed
    between them, and a rename across file systems is not atomic (nor is deleting through a link safe)."""
    for name in (STAGING, SHARDS, QUARANTINE):
        if (store / name).is_symlink():
            raise QuackError(
                f"{store / name} is a symbolic link; quackae keeps {name} inside the store itself, remove the link"
            )


# ---------------------------------------------------------------------------------------------- npz items
_DOS_DATE = (1 << 5) | 1  # 1980-01-01, a fixed timestamp keeps identical items byte-identical
_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}


def _cached_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    key = (dtype.str, shape)
    header = _HEADERS.get(key)
    if header is None:
        buffer = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            buffer, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        )
        header = _HEADERS[key] = buffer.getvalue()
    return header


def npz_bytes(encoding: np.ndarray, metadata_json: str) -> bytes:
    """The bytes of an uncompressed ``.npz`` with ``encoding`` and ``metadata`` (as ``numpy.savez`` would store).

    Built directly (zip local headers, data, central directory) instead of through ``zipfile``:
    the files layout's hot path. ``tests/test_writer.py`` checks it against ``numpy.savez``.
    """
    encoding = np.ascontiguousarray(encoding, dtype=np.float32)
    text = metadata_json.encode("utf-32-le")
    members = (
        (b"encoding.npy", _cached_header(encoding.dtype, encoding.shape) + encoding.tobytes()),
        (
            b"metadata.npy",
            _cached_header(np.dtype(f"<U{max(len(text) // 4, 1)}"), ()) + (text if text else b"\0\0\0\0"),
        ),
    )
    local, central, offset = [], [], 0
    for name, data in members:
        crc = zlib.crc32(data)
        size = len(data)
        header = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, _DOS_DATE, crc, size, size, len(name), 0)
        local.append(header + name + data)
        fields = (0x02014B50, 20, 20, 0, 0, 0, _DOS_DATE, crc, size, size, len(name), 0, 0, 0, 0, 0o600 << 16, offset)
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", *fields) + name)
        offset += len(header) + len(name) + size
    directory = b"".join(central)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(directory), offset, 0)
    return b"".join(local) + directory + end


def write_items(
    store: Path,
    ids: np.ndarray,
    matrix: np.ndarray,
    metadata: list[dict[str, Any]],
    texts: Any,
    text: bool,
    staging: Path,
    folders: set[str],
) -> int:
    """Write one ``.npz`` per row at ``item_path(id, "npz")`` (files layout), each atomically through ``staging``;
    ``texts`` (a string array) adds each row's text, ``text=False`` drops any; ``folders`` remembers the folders
    made so far. Returns how many items were written."""
    rows = texts.to_pylist() if texts is not None else None
    for row, meta in enumerate(metadata):
        index = int(ids[row])
        folder = f"{store}/{item_path(index, dir_only=True)}"
        if folder not in folders:
            os.makedirs(folder, exist_ok=True)
            folders.add(folder)
        if rows is not None:
            meta = {**meta, "text": rows[row]}
        elif not text and "text" in meta:
            meta = {k: v for k, v in meta.items() if k != "text"}
        payload = npz_bytes(matrix[row], json.dumps(meta, ensure_ascii=False, default=str))
        write_atomic(f"{folder}/{index}.npz", payload, staging, durable=False)
    return len(metadata)


def read_item(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """``(encoding float32 (H,), metadata dict)`` of one ``.npz`` item; ``QuackError`` naming the file if corrupt."""
    if not os.path.isfile(path):
        raise QuackError(f"stored item {path} is missing; rerun quackae encode to write it")
    try:
        with np.load(path, allow_pickle=False) as item:
            encoding = item["encoding"].astype(np.float32, copy=False)
            metadata = json.loads(str(item["metadata"]))
    except (OSError, ValueError, KeyError, EOFError, zlib.error) as error:
        raise QuackError(f"stored item {path} is corrupt ({error}); rerun quackae encode to replace it") from None
    except Exception as error:  # zipfile.BadZipFile and other parse errors of a damaged file
        raise QuackError(f"stored item {path} is corrupt ({error}); rerun quackae encode to replace it") from None
    if encoding.ndim != 1 or not isinstance(metadata, dict):
        raise QuackError(f"stored item {path} is corrupt (unexpected contents); rerun quackae encode to replace it")
    return encoding, metadata


def item_files(store: Path, suffix: str = "npz") -> list[tuple[int, Path]]:
    """``(id, path)`` of every item file at its canonical ``item_path`` in id order.

    A name that is not the id's own address (``01.npz``, ``1.npz`` in the wrong folder) never
    counts, so each id maps to one file.
    """
    found = []
    if not store.is_dir():
        return found
    end = f".{suffix}"
    for top in sorted(store.iterdir()):
        if not top.is_dir() or top.name.startswith(".") or top.name == SHARDS or not top.name.isdigit():
            continue
        for folder, _, files in os.walk(top):
            relative = Path(folder).relative_to(store).as_posix()
            for name in files:
                if not name.endswith(end) or name.startswith("."):
                    continue
                stem = name[: -len(end)]
                if not (stem.isascii() and stem.isdigit()) or str(int(stem)) != stem:
                    continue
                index = int(stem)
                if item_path(index, dir_only=True) == relative:
                    found.append((index, Path(folder) / name))
    found.sort()
    return found


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


def _corrupt(path: Path, reason: str, what: str = "shard") -> QuackError:
    """The one-line error for a damaged unit; ``reason`` alone is kept for the quarantine message."""
    error = QuackError(f"{what} {path} is corrupt ({reason}); rerun quackae encode to quarantine and redo it")
    error.reason = reason  # type: ignore[attr-defined]
    return error


def open_shard(path: Path) -> Any:
    """The memory-mapped Arrow table of one shard; ``QuackError`` naming the file if it does not parse."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError, ValueError) as error:
        raise _corrupt(path, str(error)) from None
    names = table.column_names
    if "id" not in names or "encoding" not in names:
        raise _corrupt(path, "no id/encoding column")
    if not pa.types.is_int64(table.schema.field("id").type) or not pa.types.is_fixed_size_list(
        table.schema.field("encoding").type
    ):
        raise _corrupt(path, "unexpected column types")
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


def shard_provenance(table: Any) -> dict[str, Any] | None:
    metadata = table.schema.metadata or {}
    raw = metadata.get(PROVENANCE_KEY)
    return json.loads(raw) if raw else None


def shard_files(store: Path) -> list[Path]:
    folder = store / SHARDS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.endswith(SHARD_SUFFIX) and not p.name.startswith("."))


def read_manifest(store: Path) -> dict[str, Any] | None:
    """``STORE/manifest.json`` as a dict, None when absent; ``QuackError`` when it is not a quackae manifest."""
    path = store / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise QuackError(f"{path} is not a quackae manifest ({error}); use --overwrite or another store") from None
    if not isinstance(manifest, dict):
        raise QuackError(
            f"{path} is not a quackae manifest (a JSON {type(manifest).__name__}, not an object); "
            "use --overwrite or another store"
        )
    return manifest


def layout_of(store: Path, manifest: dict[str, Any] | None) -> str:
    """``shards`` or ``files``: the manifest's word, else what is on disk."""
    if manifest and manifest.get("layout") in LAYOUTS:
        return str(manifest["layout"])
    if (store / SHARDS).is_dir():
        return "shards"
    return "files" if item_files(store) else "shards"


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
