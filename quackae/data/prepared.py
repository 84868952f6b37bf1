"""Reading a prepared directory (what ``quackae prepare --out`` writes) for every later stage.

A prepared directory holds ``dataset/`` (the rows: ``id``, ``input_ids``, ``length``, ``text``,
``truncated``, then the metadata columns, as Arrow stream files that ``datasets.load_from_disk``
also reads), ``tokenizer.json``, ``prepare.json`` and, written last, the ``COMPLETE`` marker with the
tokenizer's sha256, the row count and the dataset fingerprint. A folder without the marker is a
stopped prepare and is refused; so is one whose files do not agree with the marker.

``load_prepared`` memory-maps the Arrow files with pyarrow (no ``datasets`` import, no copy) and
checks every file it reads: anything damaged is one ``QuackError`` naming the file and saying to
prepare again. Folders prepared before the ``text`` column existed still load; their texts are
decoded from the tokens downstream and their ``truncated`` column is null (unknown).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from quackae.core.errors import QuackError
from quackae.core.files import folder_kind, kind_of, read_json, regular_file
from quackae.data.tokenizer import load_tokenizer, tokenizer_hash

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"  # written last into a prepared folder; readers require it
DATASET = "dataset"
# the columns quackae writes into a prepared dataset, in order, and the one it adds in a store
OWN_COLUMNS = ("id", "input_ids", "length", "text", "truncated")
STORE_COLUMNS = ("encoding",)
_WINDOW = 4096  # rows per piece the fingerprint hashes (bounded memory, whatever the table's chunking)


def _fix(directory: Path) -> str:
    return f"run quackae prepare --out {directory} again"


class PreparedDataset:
    """The rows of a prepared folder: a memory-mapped Arrow table, with the few ``datasets.Dataset`` calls the
    stages use (``num_rows``, ``column_names``, ``data``, ``ds["column"]``, ``ds[rows]``, ``select``,
    ``select_columns``, ``to_dict``).

    ``fingerprint`` is ``dataset_fingerprint`` of the rows as prepare wrote them; ``original_text`` is False
    for a folder prepared before the ``text`` column existed (its ``truncated`` column is then all null).
    """

    def __init__(self, table: Any, fingerprint: str | None = None, original_text: bool = True) -> None:
        self.table = table
        self.fingerprint = fingerprint
        self.original_text = original_text

    @property
    def data(self) -> Any:
        return self.table

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    @property
    def column_names(self) -> list[str]:
        return list(self.table.column_names)

    @property
    def schema(self) -> Any:
        return self.table.schema

    def __len__(self) -> int:
        return self.table.num_rows

    def column(self, name: str) -> Any:
        return self.table.column(name)

    def __getitem__(self, key: Any) -> Any:
        """A column's values (``ds["id"]``), one row as a dict (``ds[3]``) or rows as a dict of lists."""
        if isinstance(key, str):
            return self.table.column(key).to_pylist()
        if isinstance(key, (int, np.integer)):
            return {k: v[0] for k, v in self.select([int(key)]).to_dict().items()}
        return self.select(key).to_dict()

    def select(self, indices: Any) -> PreparedDataset:
        if isinstance(indices, slice):
            indices = range(*indices.indices(self.num_rows))
        rows = np.asarray(list(indices) if isinstance(indices, range) else indices, dtype=np.int64)
        return PreparedDataset(self.table.take(rows), None, self.original_text)

    def select_columns(self, names: list[str]) -> PreparedDataset:
        return PreparedDataset(self.table.select(list(names)), None, self.original_text)

    def to_dict(self) -> dict[str, list[Any]]:
        return self.table.to_pydict()


def dataset_fingerprint(dataset: Any) -> str:
    """sha256 of a prepared dataset's column names and types and of every column's values in row order.

    ``dataset``: a ``PreparedDataset``, a ``pyarrow.Table`` or a ``datasets.Dataset``. Rows are hashed a
    window at a time, each window copied into fresh buffers first (``take``), so the digest depends on the
    values alone, not on how the table happens to be chunked or sliced.
    """
    import pyarrow as pa

    table = dataset if isinstance(dataset, pa.Table) else dataset.data
    table = getattr(table, "table", table)  # datasets wraps its pyarrow table
    schema = [[field.name, str(field.type)] for field in table.schema]
    digest = hashlib.sha256(json.dumps([table.num_rows, schema]).encode())
    for start in range(0, table.num_rows, _WINDOW):
        part = table.slice(start, _WINDOW)
        part = part.take(np.arange(part.num_rows)).combine_chunks()
        for batch in part.replace_schema_metadata(None).to_batches():
            digest.update(batch.serialize())
    return digest.hexdigest()


def _check_directory(directory: Path) -> None:
    kind = folder_kind(directory)
    if kind not in (None, "missing"):
        raise QuackError(f"prepared data directory {directory} is {kind}, not a folder; pass what prepare --out wrote")
    if kind == "missing":
        raise QuackError(f"prepared data directory {directory} does not exist; run quackae prepare first")
    for name in (DATASET, "tokenizer.json"):
        if not (directory / name).exists():
            raise QuackError(
                f"{directory} is not a prepared directory (no {name}); run quackae prepare --out {directory}"
            )
    if kind_of(directory / COMPLETE) == "missing":
        raise QuackError(
            f"{directory} is not a complete prepared directory (no {COMPLETE} marker: a prepare into it was "
            f"stopped, or an older quackae wrote it); run quackae prepare --out {directory} again"
        )


def read_marker(directory: Path) -> dict[str, Any]:
    """The ``COMPLETE`` marker: a JSON object with the tokenizer's sha256 (and, since the fingerprint, the
    row count and fingerprint); ``QuackError`` naming the file otherwise."""
    path = directory / COMPLETE
    marker = read_json(path, "prepared folder marker", _fix(directory))
    digest = marker.get("tokenizer_sha256")
    if not isinstance(digest, str) or len(digest) != 64:
        raise QuackError(f"prepared folder marker {path} records no tokenizer sha256; {_fix(directory)}")
    for key, kind in (("dataset_fingerprint", str), ("rows", int)):
        if key in marker and (not isinstance(marker[key], kind) or isinstance(marker[key], bool)):
            raise QuackError(f"prepared folder marker {path} has a malformed {key!r}; {_fix(directory)}")
    return marker


def open_rows(folder: Path, fix: str) -> Any:
    """The rows of a saved dataset folder (``state.json``, ``dataset_info.json``, Arrow stream files) as one
    memory-mapped ``pyarrow.Table``; each damaged file is a ``QuackError`` naming it."""
    import pyarrow as pa

    state_file = folder / "state.json"
    state = read_json(state_file, "prepared dataset state", fix)
    files = state.get("_data_files")
    names = [f.get("filename") if isinstance(f, dict) else None for f in files] if isinstance(files, list) else []
    if not names or not all(isinstance(n, str) and n and "/" not in n and n not in (".", "..") for n in names):
        raise QuackError(f"prepared dataset state {state_file} lists no data files (_data_files); {fix}")
    info = read_json(folder / "dataset_info.json", "prepared dataset info", fix)
    if not isinstance(info.get("features", {}), dict):
        raise QuackError(f"prepared dataset info {folder / 'dataset_info.json'} has malformed features; {fix}")
    tables = []
    for name in names:
        path = regular_file(folder / name, "prepared data file", fix)
        if path.stat().st_size == 0:
            raise QuackError(f"prepared data file {path} is empty; {fix}")
        try:
            with pa.memory_map(str(path)) as source:
                table = pa.ipc.open_stream(source).read_all()
            table.validate()
        except (pa.ArrowException, OSError, ValueError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise QuackError(f"prepared data file {path} is damaged ({reason}); {fix}") from None
        if tables and not table.schema.equals(tables[0].schema):
            raise QuackError(f"prepared data file {path} has other columns than {folder / names[0]}; {fix}")
        tables.append(table)
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    _check_schema(table.schema, folder, fix)
    return table


def _check_schema(schema: Any, folder: Path, fix: str) -> None:
    import pyarrow as pa

    def integer_list(kind: Any) -> bool:
        return (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_integer(kind.value_type)

    wanted = {"id": pa.types.is_int64, "input_ids": integer_list, "length": pa.types.is_integer}
    for name, ok in wanted.items():
        if name not in schema.names or not ok(schema.field(name).type):
            raise QuackError(f"prepared dataset {folder} has no {name!r} column of the expected type; {fix}")


def load_prepared(path: str | Path) -> tuple[PreparedDataset, Any, dict[str, Any]]:
    """Open a prepared directory: ``(rows, tokenizer, prepare.json)``; ``QuackError`` when it is not a whole one.

    Refuses, in one line naming the file: no ``COMPLETE`` marker, a marker that is not one, a tokenizer that is
    not the one the marker records, a damaged ``prepare.json``, ``state.json``, ``dataset_info.json`` or Arrow
    file, and rows other than the count prepare wrote. The fingerprint comes from the marker (computed here
    only for folders prepared before the marker recorded it).
    """
    import pyarrow as pa

    directory = Path(path)
    _check_directory(directory)
    fix = _fix(directory)
    marker = read_marker(directory)
    tokenizer = load_tokenizer(directory / "tokenizer.json")
    if tokenizer_hash(tokenizer) != marker["tokenizer_sha256"]:
        raise QuackError(
            f"{directory / 'tokenizer.json'} is not the tokenizer the data was prepared with (its sha256 differs "
            f"from the one {directory / COMPLETE} records); {fix}"
        )
    info: dict[str, Any] = {}
    if kind_of(directory / "prepare.json") != "missing":
        info = read_json(directory / "prepare.json", "prepare summary", fix)
    table = open_rows(directory / DATASET, fix)
    expected = marker.get("rows", info.get("rows_kept"))
    if isinstance(expected, int) and expected != table.num_rows:
        raise QuackError(
            f"prepared dataset {directory / DATASET} holds {table.num_rows:,} rows where prepare wrote "
            f"{expected:,} (a data file is cut short or was replaced); {fix}"
        )
    fingerprint = marker.get("dataset_fingerprint") or dataset_fingerprint(table)
    original_text = "text" in table.column_names
    if "truncated" not in table.column_names:  # prepared before the flag existed: unknown
        table = table.append_column("truncated", pa.nulls(table.num_rows, pa.bool_()))
    return PreparedDataset(table, fingerprint, original_text), tokenizer, info


def verify_fingerprint(path: str | Path) -> str:
    """Recompute the fingerprint of a prepared folder's rows and compare it with its marker's (a folder prepared
    before the marker recorded one has nothing to compare); returns it, or raises a ``QuackError`` when the rows
    were changed after prepare."""
    directory = Path(path)
    dataset, _, _ = load_prepared(directory)
    recorded = read_marker(directory).get("dataset_fingerprint")
    actual = dataset_fingerprint(open_rows(directory / DATASET, _fix(directory)))
    if recorded is not None and actual != recorded:
        raise QuackError(
            f"the rows in {directory / DATASET} differ from what prepare wrote (fingerprint {actual[:12]} against "
            f"{recorded[:12]} in {directory / COMPLETE}); {_fix(directory)}"
        )
    return actual
