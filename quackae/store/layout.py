"""What a store layout is: the one interface the job, the writer, the reader and verify use, and the registry.

A layout keeps a store's rows in units (a shard, an item file, ...). It lists its units in the order in
which the first copy of an id wins (``units``), reads a unit's ids (``ids``: cheap, for an index), reads a
whole unit (``read``: a ``Unit``, or ``CorruptUnit`` naming the file), commits one unit atomically through
a staging folder (``commit``), and gives the rows of many units as one Arrow table (``table``). Adding a
layout is one module that defines one ``Layout`` and passes it to ``register``; ``LAYOUTS`` maps each name
(the manifest's ``layout``) to its layout. Glossary: n rows of a unit, H encoding size.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from quackae.core.errors import QuackError
from quackae.core.files import MAX_SMALL_FILE, entry_kind

MAX_UNIT = MAX_SMALL_FILE  # an item larger than this is not one quackae wrote


class CorruptUnit(QuackError):
    """A damaged or foreign unit (shard or item); ``reason`` alone is what the quarantine line repeats."""

    def __init__(self, path: str | Path, reason: str, what: str = "shard") -> None:
        super().__init__(f"{what} {path} is corrupt ({reason}); rerun quackae encode to quarantine and redo it")
        self.path = Path(path)
        self.reason = reason


unit_kind = entry_kind  # None for a regular file, else what a unit's path itself is


def open_unit(path: str | Path, what: str = "shard") -> tuple[int, int]:
    """``(fd, size)`` of a unit opened for reading, only when it is a non-empty regular file of at most
    ``MAX_UNIT`` bytes (shards: any size); the kind is checked before the open and again on the open file,
    which never blocks and never follows a link. The caller closes ``fd``."""
    kind = unit_kind(path)
    if kind is not None:
        raise CorruptUnit(path, f"it is {kind}, not a file" if kind != "missing" else "it is missing", what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        reason = "it is a symbolic link" if error.errno == errno.ELOOP else f"it cannot be read: {error.strerror}"
        raise CorruptUnit(path, reason, what) from None
    info = os.fstat(fd)
    reason = None
    if not stat.S_ISREG(info.st_mode):
        reason = "it is not a regular file"
    elif info.st_size == 0:
        reason = "it is empty"
    elif what != "shard" and info.st_size > MAX_UNIT:
        reason = f"it is {info.st_size:,} bytes, more than an item ever holds"
    if reason is not None:
        os.close(fd)
        raise CorruptUnit(path, reason, what)
    return fd, info.st_size


class Unit(NamedTuple):
    """One stored unit read whole."""

    path: Path
    ids: np.ndarray  # (n,) int64, in stored order
    matrix: np.ndarray  # (n, H) float32
    provenance: dict[str, Any] | None  # None: the unit carries none
    metadata: Any  # the layout's own form of the rows' metadata, read through ``Layout.row``
    named: np.ndarray | None = None  # (n,) the ids the rows' metadata names, where the address names one too


class Layout:
    """The interface; ``shards`` and ``items`` hold the two layouts quackae ships."""

    name = ""
    rank = 100  # where the layout comes in ``known()``: the first is the default
    buffered = False  # the writer gathers rows into units of ``shard_size`` (else each batch is committed as given)
    mapped = False  # units are memory-mapped: a reader opens them all at once (else each one when it is read)
    unit_word = "units"  # what verify calls the units in its counts line
    folder: str | None = None  # the store's folder holding the units, where they have one of their own
    suffix = ""  # how a unit's file name ends in ``folder`` (anything else there is foreign)
    manifest_fields: dict[str, Any] = {}  # what a complete manifest records about the layout

    def units(self, store: Path) -> list[Path]:
        """Every unit of ``store``, in the order in which the first copy of an id wins."""
        raise NotImplementedError

    def ids(self, path: Path) -> np.ndarray:
        """The ids (n,) a unit holds; ``CorruptUnit`` when it cannot be read."""
        return self.read(path).ids

    def read(self, path: Path) -> Unit:
        """The whole unit; ``CorruptUnit`` naming it when it is not a regular file or does not parse."""
        raise NotImplementedError

    def row(self, unit: Unit, row: int) -> dict[str, Any]:
        """The metadata of row ``row`` of ``unit`` as a dict (with its ``id``)."""
        raise NotImplementedError

    def prepare(self, store: Path) -> None:
        """Make what the writer commits into (called once a job holds the store)."""

    def holds(self, store: Path) -> bool:
        """Whether ``store`` holds units of this layout."""
        return bool(self.units(store))

    def commit(
        self, store: Path, staging: Path, name: str, ids: np.ndarray, matrix: np.ndarray, columns: Any, header: Any
    ) -> int:
        """Commit rows ``ids`` (n,), ``matrix`` (n, H) with metadata ``columns`` (a pyarrow table, or None) and the
        store's provenance ``header`` atomically through ``staging``; ``name`` is the unit's name where the layout
        names units by job and sequence. Returns how many rows it stored."""
        raise NotImplementedError

    def table(self, units: list[Unit]) -> Any:
        """The rows of ``units`` as one Arrow table, in unit order: ``id``, ``encoding`` and the metadata columns."""
        raise NotImplementedError


LAYOUTS: dict[str, Layout] = {}


def register(layout: Layout) -> Layout:
    """Make ``layout`` known by its name (what ``--layout`` and a manifest's ``layout`` say); returns it."""
    LAYOUTS[layout.name] = layout
    return layout


def layout_of(store: Path, manifest: dict[str, Any] | None) -> Layout:
    """The layout of ``store``: the manifest's word, else the layout whose units are on disk, else the default."""
    names = known()
    if manifest and manifest.get("layout") in LAYOUTS:
        return LAYOUTS[manifest["layout"]]
    held = [LAYOUTS[name] for name in names if LAYOUTS[name].holds(store)]
    return held[0] if held else LAYOUTS[names[0]]


def layout_named(name: str) -> Layout:
    """The layout called ``name``; ``ValueError`` naming the known ones otherwise."""
    known()
    if name not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {name!r}")
    return LAYOUTS[name]


def known() -> tuple[str, ...]:
    """The names of every layout, the shipped ones first (importing them registers them)."""
    import quackae.store.items  # noqa: F401
    import quackae.store.shards  # noqa: F401

    return tuple(sorted(LAYOUTS, key=lambda name: LAYOUTS[name].rank))
