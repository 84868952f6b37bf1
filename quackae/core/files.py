"""Reading the files a stage reads: every way such a file can be wrong is one ``QuackError`` naming it.

A path that should hold a file may be missing, a directory, a FIFO or device (whose open would block
or never end), a symbolic-link loop, unreadable, empty, cut short, not UTF-8, not JSON, or JSON of the
wrong shape. ``regular_file`` opens without blocking and checks the kind of file; ``read_bytes``,
``read_text`` and ``read_json`` build on it. Each message names the file, what it should be and the fix
the caller passes (``fix``: "run quackae prepare again", ...).
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

from quackae.core.errors import QuackError

# The largest metadata file (manifest, marker, summary, config) read whole: anything bigger is not one of ours.
MAX_SMALL_FILE = 64 << 20

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _refuse(path: str | Path, what: str, reason: str, fix: str) -> QuackError:
    return QuackError(f"{what} {path} {reason}; {fix}" if fix else f"{what} {path} {reason}")


def kind_of(path: str | Path) -> str | None:
    """None for a regular file (or a link to one), else what ``path`` is instead ("missing", "a FIFO", ...)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as error:
        return "a symbolic-link loop" if error.errno == errno.ELOOP else f"unreadable ({error.strerror})"
    if stat.S_ISREG(mode):
        return None
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def folder_kind(path: str | Path) -> str | None:
    """None for a directory (or a link to one), else what ``path`` is instead ("missing", "a file", "a FIFO", ...)."""
    kind = kind_of(path)
    return None if kind == "a directory" else kind or "a file"


def entry_kind(path: str | Path) -> str | None:
    """None for a regular file, else what ``path`` itself is, a link not followed ("missing", "a symbolic link",
    "a FIFO", ...)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as error:
        return f"unreadable ({error.strerror})"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return None if stat.S_ISREG(mode) else kind_of(path)


def regular_file(path: str | Path, what: str = "file", fix: str = "") -> Path:
    """``path`` when it is a regular file (through links); else a ``QuackError`` saying what it is instead."""
    kind = kind_of(path)
    if kind == "missing":
        raise _refuse(path, what, "does not exist", fix)
    if kind is not None:
        raise _refuse(path, what, f"is {kind}, not a file", fix)
    return Path(path)


def read_bytes(path: str | Path, what: str = "file", fix: str = "", limit: int = MAX_SMALL_FILE) -> bytes:
    """The whole of a regular file of at most ``limit`` bytes, opened without blocking (a FIFO never hangs)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise _refuse(path, what, "does not exist", fix) from None
    except OSError as error:
        kind = kind_of(path)
        raise _refuse(path, what, f"cannot be read ({kind or error.strerror})", fix) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _refuse(
                path, what, f"is {_KINDS.get(stat.S_IFMT(info.st_mode), 'not a regular file')}, not a file", fix
            )
        if info.st_size > limit:
            raise _refuse(path, what, f"is {info.st_size:,} bytes, more than such a file ever holds", fix)
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            if sum(map(len, chunks)) > limit:
                raise _refuse(path, what, f"is more than {limit:,} bytes", fix)
        return b"".join(chunks)
    except OSError as error:
        raise _refuse(path, what, f"cannot be read ({error.strerror or error})", fix) from None
    finally:
        os.close(fd)


def read_text(path: str | Path, what: str = "file", fix: str = "", limit: int = MAX_SMALL_FILE) -> str:
    """A regular file's text, which must be UTF-8 (a byte-order mark is allowed)."""
    data = read_bytes(path, what, fix, limit)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise _refuse(path, what, f"is not UTF-8 text (byte {error.start})", fix) from None


def read_json(
    path: str | Path,
    what: str = "file",
    fix: str = "",
    expect: type | tuple[type, ...] = dict,
    limit: int = MAX_SMALL_FILE,
) -> Any:
    """A regular file's JSON value, which must be an ``expect`` (a dict by default; empty files are refused)."""
    text = read_text(path, what, fix, limit)
    if not text.strip():
        raise _refuse(path, what, "is empty", fix)
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        reason = error.msg if isinstance(error, json.JSONDecodeError) else "nested too deeply"
        raise _refuse(path, what, f"is not valid JSON ({reason})", fix) from None
    if not isinstance(value, expect):
        wanted = " or ".join(
            _JSON_NAMES.get(t, t.__name__) for t in (expect if isinstance(expect, tuple) else (expect,))
        )
        raise _refuse(path, what, f"holds a JSON {_json_name(value)}, not a JSON {wanted}", fix)
    return value


_JSON_NAMES = {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "boolean"}


def _json_name(value: Any) -> str:
    if value is None:
        return "null"
    return _JSON_NAMES.get(type(value), type(value).__name__)
