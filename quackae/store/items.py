"""The files layout: one ``.npz`` per item at ``item_path(id, "npz")``, written and read back.

An item holds ``encoding`` (float32, (H,)), ``metadata`` (a 0-d unicode array with a JSON object) and
``provenance`` (a 0-d byte-string array with the JSON of the store's provenance, ``quackae.store.manifest``),
uncompressed as ``numpy.savez`` stores them; ``numpy.load(path, allow_pickle=False)`` reads it. Reading
here is stricter than ``numpy.load``: a unit (item or shard) that is not a regular file is never opened
(a FIFO would block), no member is read past what its header declares or past ``MAX_UNIT`` bytes, and
every way an item can be wrong is a ``CorruptUnit`` naming it, which a rerun quarantines.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import zipfile
import zlib
from numbers import Integral
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from quackae.core.atomic import write_atomic
from quackae.store.layout import MAX_UNIT, CorruptUnit, Layout, Unit, open_unit, register, unit_kind
from quackae.store.manifest import ITEM_PATH, ITEMS_PER_FOLDER, ITEMS_PER_TOP, provenance_of

__all__ = ["FILES", "CorruptUnit", "item_path", "load_item", "npz_bytes", "read_item", "unit_kind"]
_MEMBERS = ("encoding.npy", "metadata.npy", "provenance.npy")


def item_path(index: int, suffix: str = "png", dir_only: bool = False, is_collection: bool = False) -> str:
    """Relative path of item ``index``: ``manifest.ITEM_PATH`` with ``suffix`` (at most 1000 items a folder).

    With ``is_collection`` the item gets a folder of its own
    (``.../{index}/{index}.{suffix}``); ``dir_only`` returns only the enclosing folder. Raises
    ``ValueError`` for a negative or non-integer index.
    """
    if isinstance(index, bool) or not isinstance(index, Integral) or index < 0:
        raise ValueError(f"item index must be a non-negative integer, got {index!r}")
    index = int(index)
    folder = f"{index // ITEMS_PER_TOP}/{index % ITEMS_PER_TOP // ITEMS_PER_FOLDER}"
    if is_collection:
        folder = f"{folder}/{index}"
    if dir_only:
        return folder
    return f"{folder}/{index}.{suffix}"


# ---------------------------------------------------------------------------------------------- writing
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


def provenance_member(header: dict[str, Any] | None) -> bytes | None:
    """The ``provenance`` member's value: the provenance keys of ``header`` as canonical ASCII JSON (None: none)."""
    provenance = provenance_of(header or {})
    return json.dumps(provenance, sort_keys=True).encode("ascii") if provenance else None


_PROVENANCE: dict[bytes, tuple[bytes, bytes, int]] = {}


def _provenance_npy(provenance: bytes) -> tuple[bytes, bytes, int]:
    """The ``provenance`` member (name, data, crc): the same for every item of a job, so built once."""
    member = _PROVENANCE.get(provenance)
    if member is None:
        data = _cached_header(np.dtype(f"S{len(provenance)}"), ()) + provenance
        if len(_PROVENANCE) > 16:
            _PROVENANCE.clear()
        member = _PROVENANCE[provenance] = (b"provenance.npy", data, zlib.crc32(data))
    return member


def npz_bytes(encoding: np.ndarray, metadata_json: str, provenance: bytes | None = None) -> bytes:
    """The bytes of an uncompressed ``.npz`` with ``encoding``, ``metadata`` and (when given) ``provenance``
    (``provenance_member``'s bytes), as ``numpy.savez`` would store them.

    Built directly (zip local headers, data, central directory) instead of through ``zipfile``:
    the files layout's hot path. ``tests/store/test_writer.py`` checks it against ``numpy.savez``.
    """
    encoding = np.ascontiguousarray(encoding, dtype=np.float32)
    text = metadata_json.encode("utf-32-le")
    members = [
        (b"encoding.npy", _cached_header(encoding.dtype, encoding.shape) + encoding.tobytes()),
        (
            b"metadata.npy",
            _cached_header(np.dtype(f"<U{max(len(text) // 4, 1)}"), ()) + (text if text else b"\0\0\0\0"),
        ),
    ]
    if provenance is not None:
        members.append(_provenance_npy(provenance))
    local, central, offset = [], [], 0
    for name, data, *known in members:
        crc = known[0] if known else zlib.crc32(data)
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
    store: Path, ids: np.ndarray, matrix: np.ndarray, columns: Any, staging: Path, header: dict[str, Any] | None
) -> int:
    """Write one ``.npz`` per row at ``item_path(id, "npz")``, each atomically through ``staging``, with the row's
    metadata (``columns``: a pyarrow table, or None) and ``header``'s provenance. Returns how many it wrote."""
    metadata = columns.to_pylist() if columns is not None else [{"id": int(i)} for i in ids]
    member = provenance_member(header)
    made: set[str] = set()  # the folders made for this batch
    for row, meta in enumerate(metadata):
        index = int(ids[row])
        folder = f"{store}/{item_path(index, dir_only=True)}"
        if folder not in made:
            os.makedirs(folder, exist_ok=True)
            made.add(folder)
        payload = npz_bytes(matrix[row], json.dumps(meta, ensure_ascii=False, default=str), member)
        write_atomic(f"{folder}/{index}.npz", payload, staging, durable=False)
    return len(metadata)


# ---------------------------------------------------------------------------------------------- reading
class Item(NamedTuple):
    encoding: np.ndarray  # (H,) float32
    metadata: dict[str, Any]
    provenance: dict[str, Any] | None  # None: the item carries none (written before items carried it)


_NPY_HEADERS: dict[bytes, tuple[tuple[int, ...], bool, np.dtype]] = {}


def _npy_header(raw: bytes, name: str, path: Path) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran order, dtype, where the data starts)`` of a ``.npy`` member's bytes. Every item of a store
    repeats a few headers, so each distinct one is parsed once (numpy parses it with ``ast``: 60 us a member)."""
    size = {b"\x01\x00": 2, b"\x02\x00": 4}.get(raw[6:8])
    if not raw.startswith(b"\x93NUMPY") or size is None or len(raw) < 8 + size:
        raise CorruptUnit(path, f"its {name} is not a .npy array of version 1 or 2", "stored item")
    start = 8 + size + int.from_bytes(raw[8 : 8 + size], "little")
    header = raw[:start]
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        buffer = io.BytesIO(header)
        version = np.lib.format.read_magic(buffer)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        parsed = reader(buffer)
        if len(_NPY_HEADERS) > 4096:
            _NPY_HEADERS.clear()
        _NPY_HEADERS[header] = parsed
    return (*parsed, start)


def _member(archive: zipfile.ZipFile, name: str, path: Path) -> np.ndarray:
    """One ``.npy`` member, read only as far as its header declares and refused if it declares more than it holds."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise CorruptUnit(path, f"no {name} member", "stored item") from None
    if info.file_size > MAX_UNIT:
        raise CorruptUnit(path, f"its {name} declares {info.file_size:,} bytes", "stored item")
    with archive.open(info) as handle:
        raw = handle.read(MAX_UNIT + 1)
    shape, fortran, dtype, start = _npy_header(raw, name, path)
    if dtype.hasobject:
        raise CorruptUnit(path, f"its {name} holds Python objects, which are never loaded", "stored item")
    count = math.prod(shape)  # Python integers: a crafted shape cannot wrap around
    if count * dtype.itemsize != len(raw) - start:
        raise CorruptUnit(path, f"its {name} declares {shape} values but holds another amount", "stored item")
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=start)
    return array.reshape(shape, order="F" if fortran else "C")


def _json_object(array: np.ndarray, name: str, path: Path) -> dict[str, Any]:
    if array.shape != () or array.dtype.kind not in "SU":
        raise CorruptUnit(path, f"its {name} is not a JSON string", "stored item")
    value = array[()]
    try:
        parsed = json.loads(value.decode("ascii") if isinstance(value, bytes) else str(value))
    except (ValueError, RecursionError):
        raise CorruptUnit(path, f"its {name} is not JSON", "stored item") from None
    if not isinstance(parsed, dict):
        raise CorruptUnit(path, f"its {name} is not a JSON object", "stored item")
    return parsed


def load_item(path: str | Path) -> Item:
    """One ``.npz`` item: its encoding, metadata and provenance; ``CorruptUnit`` naming the file if it is not
    a regular file, does not parse or holds anything but a 1-d float encoding and JSON objects."""
    path = Path(path)
    fd, _ = open_unit(path, "stored item")
    try:
        with os.fdopen(fd, "rb") as handle:
            data = handle.read(MAX_UNIT + 1)
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            encoding = _member(archive, "encoding.npy", path)
            metadata = _json_object(_member(archive, "metadata.npy", path), "metadata", path)
            provenance = None
            if "provenance.npy" in archive.namelist():
                provenance = _json_object(_member(archive, "provenance.npy", path), "provenance", path)
    except CorruptUnit:
        raise
    except Exception as error:  # BadZipFile, zlib.error, struct.error, a bad .npy header: a damaged file
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise CorruptUnit(path, reason, "stored item") from None
    if encoding.ndim != 1 or encoding.dtype.kind != "f" or not len(encoding):
        raise CorruptUnit(path, f"its encoding is {encoding.dtype} of shape {encoding.shape}", "stored item")
    return Item(encoding.astype(np.float32), metadata, provenance)


def read_item(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """``(encoding float32 (H,), metadata dict)`` of one ``.npz`` item; ``QuackError`` naming the file if corrupt."""
    item = load_item(path)
    return item.encoding, item.metadata


# ---------------------------------------------------------------------------------------------- finding
def _canonical(name: str) -> int | None:
    """The integer a folder or file stem names when written as ``str(int)`` would write it, else None."""
    return int(name) if name.isascii() and name.isdigit() and str(int(name)) == name else None


class ItemEntries(NamedTuple):
    items: list[tuple[int, Path]]  # every entry at an item's own .npz path, whatever it is, in id order
    blocking: list[Path]  # what stands where an item folder or picture goes but is none (a write there fails)
    foreign: list[Path]  # entries under the item folders that quackae does not write


def item_entries(store: Path) -> ItemEntries:
    """Walk the item folders (``item_path``'s) of ``store`` without following links.

    A name that is not the id's own address (``01.npz``, ``1.npz`` in the wrong folder) never counts as an
    item, so each id maps to one entry; it is listed as foreign instead.
    """
    items: list[tuple[int, Path]] = []
    blocking: list[Path] = []
    foreign: list[Path] = []
    if not store.is_dir():
        return ItemEntries(items, blocking, foreign)
    with os.scandir(store) as top_entries:
        tops = [e for e in top_entries if _canonical(e.name) is not None and e.is_dir(follow_symlinks=False)]
    for top in tops:
        with os.scandir(top.path) as middles:
            middles = list(middles)
        for middle in middles:
            number = _canonical(middle.name)
            if number is None or number >= ITEMS_PER_TOP // ITEMS_PER_FOLDER:
                foreign.append(Path(middle.path))
                continue
            if not middle.is_dir(follow_symlinks=False):
                blocking.append(Path(middle.path))
                continue
            with os.scandir(middle.path) as leaves:
                for leaf in leaves:
                    stem, _, suffix = leaf.name.rpartition(".")
                    index = _canonical(stem)
                    if (
                        index is None
                        or suffix not in ("npz", "png")
                        or item_path(index, dir_only=True) != (f"{top.name}/{middle.name}")
                    ):
                        foreign.append(Path(leaf.path))
                    elif suffix == "npz":
                        items.append((index, Path(leaf.path)))
                    elif not leaf.is_file(follow_symlinks=False):
                        blocking.append(Path(leaf.path))
    items.sort()
    return ItemEntries(items, sorted(blocking), sorted(foreign))


def item_files(store: Path) -> list[tuple[int, Path]]:
    """``(id, path)`` of every entry at an item's canonical ``item_path`` in id order (see ``item_entries``)."""
    return item_entries(store).items


def write_pngs(
    store: Path, staging: Path, ids: np.ndarray, matrix: np.ndarray, extra: Any, png: str, tokenizer: Any
) -> None:
    """A PNG per id of ``ids`` beside its item (``item_path``'s folder): its ``attention`` (from ``extra``, the
    batch's attention, tokens and inputs) or its ``encoding`` (row of ``matrix`` (B, H))."""
    from quackae.viz.render import item_png

    for row in range(len(ids)):
        index = int(ids[row])
        attention = tuple(e[row] for e in extra) if png == "attention" and extra is not None else None
        payload = item_png(matrix[row], attention, tokenizer)
        folder = store / item_path(index, dir_only=True)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / f"{index}.png", payload, staging, durable=False)


# ---------------------------------------------------------------------------------------------- the layout
class ItemsLayout(Layout):
    """``files``: one ``.npz`` per item at its ``item_path``; a unit is one item, its address names its id."""

    name = "files"
    rank = 1
    unit_word = "files"
    manifest_fields = {"item_path": ITEM_PATH}

    def units(self, store: Path) -> list[Path]:
        return [path for _, path in item_files(store)]

    def ids(self, path: Path) -> np.ndarray:
        return np.asarray([int(Path(path).name[: -len(".npz")])], dtype=np.int64)

    def read(self, path: Path) -> Unit:
        item = load_item(path)
        named = item.metadata.get("id")
        named_ids = np.asarray([named if isinstance(named, int) and not isinstance(named, bool) else -1])
        return Unit(Path(path), self.ids(path), item.encoding[None, :], item.provenance, [item.metadata], named_ids)

    def row(self, unit: Unit, row: int) -> dict[str, Any]:
        return unit.metadata[row]

    def holds(self, store: Path) -> bool:
        return bool(item_files(store))

    def commit(
        self, store: Path, staging: Path, name: str, ids: np.ndarray, matrix: np.ndarray, columns: Any, header: Any
    ) -> int:
        return write_items(store, ids, matrix, columns, staging, header)

    def table(self, units: list[Unit]) -> Any:
        import pyarrow as pa

        from quackae.store.shards import shard_table
        from quackae.store.tables import arrow_column

        metadata = [meta for unit in units for meta in unit.metadata]
        ids = np.concatenate([u.ids for u in units]) if units else np.empty(0, dtype=np.int64)
        size = units[0].matrix.shape[1] if units else 0
        matrix = np.concatenate([u.matrix for u in units]) if units else np.empty((0, size), np.float32)
        names = list(dict.fromkeys(k for meta in metadata for k in meta if k not in ("id", "encoding")))
        columns = pa.table({name: arrow_column(name, [m.get(name) for m in metadata]) for name in names})
        return shard_table(ids, matrix, columns if names else None, None)


FILES = register(ItemsLayout())
