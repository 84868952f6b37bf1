"""Outputs that appear whole or not at all.

Every file a later stage reads is written to a hidden temporary name on the same file system,
flushed and fsynced, renamed over its final name, and its folder fsynced: a reader sees the old
file or the new one, never a part. A killed writer leaves only hidden ``*.partial`` files, which
``remove_temporaries`` clears on the next run. A folder whose files belong together is written
whole in a staging folder beside it (``sibling_staging``) and put in place by ``replace_folder``. A failed write (a full
disk) is an ``OSError`` naming the file it was writing.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TEMPORARY_SUFFIX = ".partial"


def fsync_dir(path: str | Path) -> None:
    """Make the renames in folder ``path`` durable (a no-op where the file system cannot fsync a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and folder below ``root`` (before the tree is renamed into place)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


def temporary_name(path: Path) -> Path:
    """The hidden name ``path`` is written under before its rename: unique per process and thread."""
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}{TEMPORARY_SUFFIX}")


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temporaries(path: str | Path) -> int:
    """Delete the temporary files of ``path`` (``temporary_name``'s) whose writing process no longer runs on this
    machine (it was killed); returns how many went. Those of a live writer stay."""
    target = Path(path)
    prefix = f".{target.name}."
    removed = 0
    for candidate in target.parent.glob(f"{glob.escape(prefix)}*{TEMPORARY_SUFFIX}"):
        pid = candidate.name[len(prefix) : -len(TEMPORARY_SUFFIX)].split("-")[0]
        if not pid.isdigit() or alive(int(pid)):
            continue  # a live writer's (or another user's): it may still be writing
        candidate.unlink(missing_ok=True)
        removed += 1
    return removed


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file for writing; on a clean exit it is fsynced and renamed over ``path``, on an
    exception it is removed and ``path`` keeps its old contents."""
    target = Path(path)
    temporary = temporary_name(target)
    handle = open(temporary, mode, encoding=encoding if "b" not in mode else None)  # noqa: SIM115
    try:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        os.replace(temporary, target)
    except OSError as error:
        _discard(handle, temporary)
        raise _naming(error, target) from error
    except BaseException:
        _discard(handle, temporary)
        raise
    fsync_dir(target.parent)


def _discard(handle: IO[Any], temporary: Path) -> None:
    try:
        handle.close()  # flushing what is left may fail again on a full disk
    except OSError:
        pass
    temporary.unlink(missing_ok=True)


def _naming(error: OSError, target: Path) -> OSError:
    """``error`` itself when it names a file, else the same error naming ``target`` (a full disk's ``write``
    and ``fsync`` name none)."""
    if error.filename is not None or error.errno is None:
        return error
    return type(error)(error.errno, error.strerror or os.strerror(error.errno), str(target))


def write_atomic(path: str | Path, data: bytes | str, staging: str | Path | None = None, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically.

    Without ``staging`` the temporary file sits beside ``path`` and the write is durable. With a
    ``staging`` folder (same file system; the store's hot path for per-item files) the file is
    created there and renamed into place, fsynced only when ``durable``.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    if staging is None:
        with atomic_file(path, "wb") as handle:
            handle.write(payload)
        return
    tmp = os.path.join(staging, os.path.basename(path) + TEMPORARY_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    except OSError as error:
        os.close(fd)
        os.unlink(tmp)
        raise _naming(error, Path(path)) from error
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(os.path.dirname(path) or ".")


def remove_temporaries(directory: str | Path) -> int:
    """Delete the hidden temporary files a killed writer left in ``directory``; returns how many."""
    folder = Path(directory)
    if not folder.is_dir():
        return 0
    found = list(folder.glob(f".*{TEMPORARY_SUFFIX}"))
    for path in found:
        path.unlink(missing_ok=True)
    return len(found)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # not supported by this kernel or file system
        return False
    raise OSError(code, os.strerror(code), str(b))


def sibling_staging(target: Path, tag: str) -> Path:
    """A new, empty folder ``.{name}.{tag}-{pid}`` beside ``target`` in which this process builds a folder whole
    before ``replace_folder`` puts it at ``target``. The staging folders (and the old folders ``replace_folder``
    set aside) that stopped processes left beside ``target`` are removed first; a live process's stay."""
    prefix = f".{target.name}."
    for leftover in target.parent.glob(f"{glob.escape(prefix)}*-*"):
        word, _, pid = leftover.name[len(prefix) :].rpartition("-")
        if word not in (tag, _ASIDE) or not pid.isdigit():
            continue
        if int(pid) != os.getpid() and alive(int(pid)):
            continue  # another process builds or replaces the same folder right now
        shutil.rmtree(leftover, ignore_errors=True)
    staging = target.parent / f"{prefix}{tag}-{os.getpid()}"
    staging.mkdir()
    return staging


_ASIDE = "old"


def replace_folder(staging: Path, target: Path) -> None:
    """Put the complete folder ``staging`` (fsynced here) at ``target`` in one step; an old ``target`` is
    removed after. Where the system cannot exchange two paths atomically, two renames leave a moment in
    which ``target`` is missing, never one in which it is partial."""
    fsync_tree(staging)
    if not os.path.lexists(target):
        os.rename(staging, target)
    elif not exchange(staging, target):
        aside = target.with_name(f".{target.name}.{_ASIDE}-{os.getpid()}")
        os.rename(target, aside)
        os.rename(staging, target)
        staging = aside
    fsync_dir(target.parent)
    shutil.rmtree(staging, ignore_errors=True)
