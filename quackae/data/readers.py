"""Reading corpus files into rows, and deciding which rows ``quackae prepare`` can use.

Each reader appends a file's records to ``Rows`` with the file and physical line each came from
(every input is opened through ``open_input``: a regular file, never a FIFO left blocking);
``validate`` then keeps a row once or rejects it with its reason (empty or non-text text, missing,
non-decimal, out-of-range or duplicate id). Nothing here writes: ``prepare`` turns the kept rows
into a dataset.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from quackae.core.errors import QuackError
from quackae.core.files import regular_file

log = logging.getLogger(__name__)


FORMATS = ("jsonl", "json", "csv", "parquet", "txt")


_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "txt",
    ".text": "txt",
}


_RESERVED = ("input_ids", "length")


MAX_ID = 2**63  # ids are int64


_DECIMAL = re.compile(r"-?[0-9]+")  # ASCII digits only: "²" or "٣٥" are not ids


@dataclass
class Rows:
    """Rows of all inputs as columns, with where each came from."""

    columns: dict[str, list[Any]] = field(default_factory=dict)
    where: list[tuple[int, int]] = field(default_factory=list)  # (file index, line number)
    count: int = 0
    rejected: list[tuple[int, int, str]] = field(default_factory=list)  # malformed rows: (file, line, reason)

    def add(self, records: dict[str, list[Any]], where: list[tuple[int, int]]) -> None:
        n = len(where)
        for name in set(self.columns) | set(records):
            column = self.columns.setdefault(name, [None] * self.count)
            column.extend(records.get(name, [None] * n))
        self.where.extend(where)
        self.count += n


def open_input(path: Path, mode: str = "r", **kwargs: Any) -> IO[Any]:
    """An input file opened for reading, which must be a regular file: opened without blocking first, so a FIFO
    or a device in its place is one ``QuackError`` naming it instead of a read that never ends."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        regular_file(path, "input file")  # says what it is: missing, a link loop ...
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            regular_file(path, "input file")
        os.set_blocking(fd, True)
        return open(fd, mode, closefd=True, **kwargs)  # noqa: SIM115 - the caller closes it
    except BaseException:
        os.close(fd)
        raise


def format_of(path: Path, forced: str | None) -> str:
    """The input format: ``forced``, else the extension's; a ``.json`` file holds one array, or JSON lines."""
    if forced:
        return forced
    fmt = _EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise QuackError(f"cannot tell the format of {path} from its extension; pass --format ({', '.join(FORMATS)})")
    if fmt == "json" and _first_character(path) != b"[":
        fmt = "jsonl"  # JSON lines in a .json file
    return fmt


def _first_character(path: Path) -> bytes:
    """The first byte after a byte-order mark and any whitespace (b"" for a file of none), however much
    whitespace comes first."""
    with open_input(path, "rb") as handle:
        head = handle.read(3)
        rest = head.removeprefix(b"\xef\xbb\xbf")
        while True:
            stripped = rest.lstrip()
            if stripped:
                return stripped[:1]
            rest = handle.read(1 << 16)
            if not rest:
                return b""


def read_jsonl(path: Path, file_index: int, rows: Rows) -> None:
    records: dict[str, list[Any]] = {}
    where = []
    n = 0
    with open_input(path, "r", encoding="utf-8-sig", errors="strict") as handle:
        try:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    rows.rejected.append((file_index, line_number, f"malformed JSON ({error.msg})"))
                    continue
                if not isinstance(record, dict):
                    rows.rejected.append((file_index, line_number, "malformed JSON (not an object)"))
                    continue
                for name, value in record.items():
                    column = records.get(name)
                    if column is None:
                        column = records[name] = [None] * n
                    column.append(value)
                n += 1
                for column in records.values():
                    if len(column) < n:
                        column.append(None)
                where.append((file_index, line_number))
        except UnicodeDecodeError as error:
            raise QuackError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    rows.add(records, where)


def _read_json_array(path: Path, file_index: int, rows: Rows) -> None:
    """A ``.json`` file holding one array of objects; row numbers are 1-based positions in the array."""
    try:
        with open_input(path, "r", encoding="utf-8-sig", errors="strict") as handle:
            records = json.loads(handle.read())
    except RecursionError:
        raise QuackError(f"cannot read {path} as json: it is nested too deeply") from None
    except UnicodeDecodeError as error:
        raise QuackError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise QuackError(f"cannot read {path} as json: {error.msg} at line {error.lineno}") from None
    if not isinstance(records, list):
        raise QuackError(f"cannot read {path} as json: expected an array of objects")
    columns: dict[str, list[Any]] = {}
    where = []
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            rows.rejected.append((file_index, number, "malformed JSON (not an object)"))
            continue
        n = len(where)
        for name, value in record.items():
            columns.setdefault(name, [None] * n).append(value)
        where.append((file_index, number))
        for column in columns.values():
            if len(column) < n + 1:
                column.append(None)
    rows.add(columns, where)


def _read_txt(path: Path, file_index: int, rows: Rows) -> None:
    """One text per line (line breaks dropped), a UTF-8 byte-order mark allowed."""
    try:
        with open_input(path, "r", encoding="utf-8-sig", errors="strict", newline=None) as handle:
            texts = [line.rstrip("\n") for line in handle]
    except UnicodeDecodeError as error:
        raise QuackError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    rows.add({"text": texts}, [(file_index, number) for number in range(1, len(texts) + 1)])


def _csv_record_lines(path: Path) -> list[int] | None:
    """The physical line each CSV record after the header starts on (quoted fields may span lines)."""
    try:
        with open_input(path, "r", encoding="utf-8-sig", errors="strict", newline="") as handle:
            reader = csv.reader(handle)
            lines, previous = [], 0
            for record in reader:
                if record:
                    lines.append(previous + 1)
                previous = reader.line_num
    except (UnicodeDecodeError, csv.Error):
        return None
    return lines[1:]


def read_with_datasets(path: Path, fmt: str, file_index: int, rows: Rows, cache_dir: str) -> None:
    import datasets

    if fmt == "json":
        return _read_json_array(path, file_index, rows)
    if fmt == "txt":
        return _read_txt(path, file_index, rows)
    builder = {"csv": "csv", "parquet": "parquet"}[fmt]
    regular_file(path, "input file")  # datasets opens it itself: a FIFO would block it
    # A value is what the file says: only an empty CSV field is missing, not the texts NA, null, None or nan.
    kwargs: dict[str, Any] = {"keep_default_na": False, "na_values": [""]} if builder == "csv" else {}
    try:
        table = datasets.load_dataset(
            builder, data_files=str(path), split="train", cache_dir=cache_dir, keep_in_memory=True, **kwargs
        )
    except Exception as error:  # noqa: BLE001 - datasets raises many types for unreadable files
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise QuackError(f"cannot read {path} as {fmt}: {message}") from None
    records = table.to_dict()
    numbers = list(range(1, table.num_rows + 1))  # parquet: row numbers from 1
    if fmt == "csv":
        lines = _csv_record_lines(path)
        numbers = lines if lines is not None and len(lines) == table.num_rows else [n + 1 for n in numbers]
    rows.add(records, [(file_index, number) for number in numbers])


def _check_id(value: Any) -> tuple[int | None, str | None]:
    """(id, None) for a usable id, else (None, reason)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, "missing id"
    if isinstance(value, bool):
        return None, "non-integer id"
    if isinstance(value, (int, np.integer)):
        number = int(value)
    elif isinstance(value, (float, np.floating)) and float(value).is_integer():
        if abs(value) >= 2**53:  # beyond this a float no longer holds every integer exactly
            return None, "id out of range"
        number = int(value)
    elif isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        number = int(value.strip())
    else:
        return None, "non-integer id"
    if number < 0:
        return None, "negative id"
    if number >= MAX_ID:
        return None, "id out of range"
    return number, None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def validate(
    rows: Rows, text_field: str, id_field: str | None
) -> tuple[list[int], list[int], list[tuple[int, int, str]]]:
    """Indices of the rows kept, their ids, and (file, line, reason) for each row rejected."""
    texts = rows.columns[text_field]
    ids = rows.columns[id_field] if id_field else None
    kept, kept_ids, rejected = [], [], list(rows.rejected)
    seen: set[int] = set()
    for i in range(rows.count):
        text = texts[i]
        reason = None
        if text is None:
            reason = "null text"
        elif not isinstance(text, str):
            reason = "non-string text"
        elif not text.strip():
            reason = "empty text"
        elif not _encodable(text):
            reason = "invalid text (lone surrogate)"
        number = i
        if reason is None and ids is not None:
            number, reason = _check_id(ids[i])
            if reason is None and number in seen:
                reason = "duplicate id"
        if reason is not None:
            rejected.append((*rows.where[i], reason))
            continue
        seen.add(number)
        kept.append(i)
        kept_ids.append(number)
    return kept, kept_ids, rejected


def metadata_columns(rows: Rows, kept: list[int], exclude: set[str]) -> dict[str, list[Any]]:
    import pyarrow as pa

    columns = {}
    for name, values in rows.columns.items():
        if name in exclude:
            continue
        if "\x00" in name:
            raise QuackError(
                f"input column {name!r} has a NUL character in its name, which a dataset column cannot hold; rename it"
            )
        if name in _RESERVED or name == "id":
            hint = " or pass --id-field id" if name == "id" else ""
            raise QuackError(f"input column {name!r} clashes with the {name!r} column quackae writes; rename it{hint}")
        column = [values[i] for i in kept]
        try:
            pa.array(column)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError, UnicodeEncodeError):
            log.warning("metadata column %r mixes value types; storing it as JSON strings", name)
            column = [None if v is None else json.dumps(v, ensure_ascii=False) for v in column]
            if not all(v is None or _encodable(v) for v in column):
                column = [None if v is None else json.dumps(json.loads(v)) for v in column]  # escape lone surrogates
        columns[name] = column
    return columns
