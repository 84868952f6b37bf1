"""What every stage that runs a model shares: the Trainer flags, the precision default, finding a run's
checkpoint and tokenizer, and loading a model from it.

Stages (``train``, ``encode``, ``classify``, ``reconstruct``) import from here, never from each other.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quackae.core.errors import QuackError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainerFlags:
    """Flags every stage that runs a model takes; they go to the Lightning ``Trainer``."""

    accelerator: str = field(default="auto", metadata={"help": "cpu, gpu, cuda, mps or auto"})
    devices: str = field(default="auto", metadata={"help": "device count, list (0,1) or auto"})
    num_nodes: int = field(default=1, metadata={"help": "nodes for multi-node DDP"})
    strategy: str = field(default="auto", metadata={"help": "Lightning strategy: auto, ddp, ddp_spawn, ..."})
    precision: str | None = field(
        default=None,
        metadata={
            "help": "Lightning precision; default bf16-mixed on a GPU that supports it and, for training, on a CPU "
            "with AMX-BF16; else 32-true"
        },
    )
    batch_size: int = field(default=64, metadata={"help": "items per batch"})
    num_workers: int = field(default=0, metadata={"help": "data loader worker processes"})

    def check_trainer_flags(self) -> None:
        devices = str(self.devices).strip()
        if not (
            devices == "auto"
            or re.fullmatch(r"-1|[1-9]\d*", devices)
            or re.fullmatch(r"\[?\s*\d+\s*(,\s*\d+\s*)*,?\s*\]?", devices)
        ):
            raise ValueError(
                f"--devices must be auto, a count of at least 1 (-1: all), or a list of device indices like 0,1; "
                f"got {self.devices!r}"
            )
        if self.batch_size <= 0:
            raise ValueError(f"--batch-size must be positive, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must not be negative, got {self.num_workers}")
        if self.num_nodes < 1:
            raise ValueError(f"--num-nodes must be at least 1, got {self.num_nodes}")

    def trainer_kwargs(self, training: bool = False) -> dict[str, Any]:
        """Keyword arguments for ``pl.Trainer`` (``training``: for fitting, which has its own precision default, see
        ``default_precision``); ``QuackError`` when this machine lacks the accelerator asked for."""
        check_accelerator(self.accelerator)
        devices: Any = str(self.devices).strip()
        if re.fullmatch(r"-?\d+", devices):
            devices = int(devices)
        self.check_cpu_ranks(devices)
        return {
            "accelerator": self.accelerator,
            "devices": devices,
            "num_nodes": self.num_nodes,
            "strategy": self.strategy,
            "precision": self.precision or default_precision(self.accelerator, training),
        }

    def check_cpu_ranks(self, devices: Any) -> None:
        """Refuse more processes on the CPU than this process may run on cores: each rank is a whole copy of the
        model and its data, so 99 ranks on 2 cores take minutes and tens of GB to do what one does."""
        import torch

        if not isinstance(devices, int) or devices <= 1:
            return
        name = self.accelerator.lower()
        gpu = torch.cuda.is_available() or bool(
            getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
        )
        if name != "cpu" and (name != "auto" or gpu):
            return
        cores = usable_cores()
        if devices > cores:
            raise QuackError(
                f"--devices {devices} would start {devices} processes on the CPU, which has {cores} cores for this "
                f"process; use at most --devices {cores} (or 1: one process already uses every core)"
            )


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def progress_bar(min_interval_s: float = 0.5) -> Any:
    """Lightning's tqdm progress bar, redrawn at most every ``min_interval_s`` seconds and at the end:
    redrawing after every batch cost about 2 ms of terminal writes per batch, 3% of a CPU encode of short
    items (``cProfile``)."""
    import time

    from pytorch_lightning.callbacks import TQDMProgressBar

    class ThrottledProgressBar(TQDMProgressBar):
        last = float("-inf")

        def _should_update(self, current: int, total: int) -> bool:
            if not super()._should_update(current, total):
                return False
            now = time.monotonic()
            if current != total and now - self.last < min_interval_s:
                return False
            self.last = now
            return True

    return ThrottledProgressBar()


def check_accelerator(accelerator: str) -> None:
    """Refuse a GPU accelerator on a machine torch sees none on, before Lightning raises deep inside."""
    import torch

    name = accelerator.lower()
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps is not None and mps.is_available())
    if (name == "cuda" or (name == "gpu" and not has_mps)) and not torch.cuda.is_available():
        raise QuackError(
            f"--accelerator {accelerator}: torch {torch.__version__} sees no GPU on this machine; "
            "use --accelerator cpu or auto, or install a CUDA build of torch"
        )
    if name == "mps" and not has_mps:
        raise QuackError(f"--accelerator {accelerator}: this machine has no MPS device; use --accelerator cpu or auto")


def default_precision(accelerator: str, training: bool = False) -> str:
    """bf16-mixed on a GPU that supports it, and for ``training`` on a CPU with AMX-BF16 matrix units; else 32-true.

    On the CPU it is for training only: there bf16 autocast runs the vocabulary projection about five times as fast
    (oneDNN's AMX kernels) and the loss follows fp32's (a default step measured at 0.75-0.81 of fp32's time; the
    validation loss after 300 steps within 0.4%), while stored encodings stay fp32 numbers. A CPU without AMX
    emulates bf16 and gains nothing.
    """
    import torch

    wants_gpu = accelerator in ("auto", "gpu", "cuda")
    if wants_gpu and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    if training and accelerator in ("auto", "cpu") and cpu_has_amx_bf16():
        return "bf16-mixed"
    return "32-true"


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has AMX-BF16 tiles that torch's oneDNN kernels use (Intel Xeon since Sapphire Rapids)."""
    import torch

    capabilities = getattr(torch.cpu, "get_capabilities", None)  # absent from older torch builds
    if capabilities is None:
        return False
    found = capabilities()
    return bool(found.get("amx_bf16") and found.get("amx_tile"))


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


def resolve_run(model: str | Path) -> tuple[Path, Path]:
    """``(checkpoint, tokenizer.json)`` of a RUN directory (best, else last) or a ``.ckpt`` file.

    Both must be regular files (a FIFO, a directory or a link loop in their place is a ``QuackError``
    naming it); a checkpoint's RUN is the folder above its ``checkpoints/`` folder.
    """
    import os

    from quackae.core.files import regular_file

    path = Path(model)
    if path.is_dir():
        for name in ("best.ckpt", "last.ckpt"):
            if os.path.lexists(path / "checkpoints" / name):
                checkpoint = regular_file(path / "checkpoints" / name, "checkpoint", "train the run again")
                break
        else:
            raise QuackError(f"{path} holds no checkpoints/best.ckpt or last.ckpt; pass a RUN from quackae train")
        run = path
    elif os.path.lexists(path):
        checkpoint = regular_file(path, "model", "pass a RUN directory or a .ckpt file")
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    else:
        raise QuackError(f"model {path} does not exist; pass a RUN directory or a .ckpt file")
    tokenizer = run / "tokenizer.json"
    if not os.path.lexists(tokenizer):
        raise QuackError(f"no tokenizer.json beside the model ({tokenizer}); quackae train copies it into the RUN")
    return checkpoint, regular_file(tokenizer, "tokenizer file", "quackae train copies it into the RUN")


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


def cores_to_spare(trainer: Any) -> bool:
    """Whether helper threads (fetching the next batch, writing the last one) run beside the model rather than
    on the cores it computes on: yes when it runs on an accelerator, or when the CPU has more cores than its
    processes' torch threads.

    On a CPU whose every core runs a torch thread, a helper thread stalls the thread it displaces and the
    others wait for it at every parallel step: measured on 2 cores with 2 torch threads, ``quackae encode``
    ran at 0.74-0.86 of the model alone with helper threads and 0.92 with the same work done between
    batches on the prediction thread.
    """
    import os

    import torch
    from pytorch_lightning.accelerators import CPUAccelerator

    if trainer is None or not isinstance(trainer.accelerator, CPUAccelerator):
        return True
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores > torch.get_num_threads() * max(1, trainer.num_devices)
