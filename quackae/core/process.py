"""Process-wide settings the ``quackae`` command gives itself: the OpenMP thread policy (every command), and,
for the stages whose entry in the table names them, glibc keeping freed memory (``keep_freed_memory``) and the
loaded heap kept out of full garbage collections (``settled_heap``). A library call applies none of them."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping

log = logging.getLogger(__name__)


# OpenMP wait settings a user may give; quackae chooses a wait policy only when none of them is set
WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def thread_settings(environ: Mapping[str, str], cores: int, load: float) -> dict[str, str]:
    """The OpenMP settings the ``quackae`` command gives itself, on ``cores`` cores with 1-minute ``load`` average,
    where the user's ``environ`` sets none.

    ``OMP_WAIT_POLICY=PASSIVE``: a torch thread that waits for the others sleeps instead of spinning. By default
    it spins, and when another process holds the core its partner needs, both spin while the work waits; measured
    on 2 busy cores (load 5-6) with 2 torch threads, a default training step took 5.7-6.0x as long as with one
    thread, and 1.2-1.5x as long with PASSIVE. ``OMP_NUM_THREADS``: as many threads as the load leaves cores
    free (at least one), set only when that is fewer than the cores, so an idle machine keeps torch's own choice.
    """
    settings = {}
    if not any(name in environ for name in WAIT_SETTINGS):
        settings["OMP_WAIT_POLICY"] = "PASSIVE"
    free = max(1, min(cores, round(cores - load)))
    if "OMP_NUM_THREADS" not in environ and free < cores:
        settings["OMP_NUM_THREADS"] = str(free)
    return settings


def apply_thread_policy() -> dict[str, str]:
    """Put ``thread_settings`` into this process's environment before torch starts its thread pool, which reads
    them once; returns what it set. The ``quackae`` command calls it first thing. Once torch is imported it does
    nothing, so a process that uses quackae as a library keeps its settings."""
    import os
    import sys

    if "torch" in sys.modules or not hasattr(os, "getloadavg"):
        return {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    settings = thread_settings(os.environ, cores, os.getloadavg()[0])
    os.environ.update(settings)
    return settings


# glibc's mallopt parameters; the values keep the model's per-step temporaries (up to a few MB) in the process
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 128 << 20


def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks for reuse instead of handing them back to the kernel; True when applied.

    By default a block over 128 KB is its own ``mmap`` and freed memory at the top of the heap is trimmed,
    so the tensors a GRU allocates and frees at every time step are faulted in afresh each time (measured:
    240,000-550,000 page faults and 1-2 s of system time per 10,000 items encoded on CPU, a quarter of the
    run). With blocks up to 32 MB served from the heap and trimming only past 128 MB free, they are reused.
    The ``quackae`` command calls it at start; a process that sets any ``MALLOC_*`` variable keeps its own
    settings, and other C libraries are left alone.
    """
    import ctypes
    import os
    import sys

    if not sys.platform.startswith("linux") or any(name.startswith("MALLOC_") for name in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


_settled = threading.Lock()
_settled_state = {"depth": 0, "froze": False}  # open settled_heap blocks, in every thread; whether they froze


@contextlib.contextmanager
def settled_heap() -> Iterator[None]:
    """Keep the objects alive on entry out of the cyclic garbage collector's full passes until exit.

    Once torch is loaded a process tracks over 300,000 objects and a full collection walks them all:
    0.24-0.43 s a pass on a 2-core VM. Imports (``datasets`` pulls in pandas) and the short-lived objects
    a prediction or training loop makes at every batch set such passes off: one in a third of the
    10,000-item encodes of a process measured, a tenth of each. ``gc.freeze()`` moves every object alive
    now where full passes do not look (new objects are collected as usual) and ``gc.unfreeze()`` puts them
    back, so a process that calls a stage in a loop gets its collector back as it was.

    The first block to open freezes (unless the heap is frozen already: then it is left to whoever froze
    it) and the last one to close, in any thread, unfreezes; blocks inside it do nothing, since freezing
    again would also pin garbage made since (an earlier stage's objects) until the outer block ends.
    """
    import gc

    with _settled:
        if _settled_state["depth"] == 0:
            _settled_state["froze"] = gc.get_freeze_count() == 0
            if _settled_state["froze"]:
                gc.freeze()
        _settled_state["depth"] += 1
    try:
        yield
    finally:
        with _settled:
            _settled_state["depth"] -= 1
            if _settled_state["depth"] == 0 and _settled_state["froze"]:
                _settled_state["froze"] = False
                gc.unfreeze()


@contextlib.contextmanager
def process_settings(names: tuple[str, ...]) -> Iterator[None]:
    """Apply the named settings (``keep_freed_memory``, ``settled_heap``) around a command's stage: the
    command line does, for the settings its stage's table entry names."""
    unknown = set(names) - {"keep_freed_memory", "settled_heap"}
    if unknown:
        raise ValueError(f"unknown process settings {sorted(unknown)}")
    if "keep_freed_memory" in names:
        keep_freed_memory()  # for the rest of the process: the command ends with its stage
    with settled_heap() if "settled_heap" in names else contextlib.nullcontext():
        yield
