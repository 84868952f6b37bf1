"""How every stage that runs a model hands it to Lightning: the Trainer flags, the accelerator and precision
rules, the CPU rank limit and the progress bar.

``TrainerFlags`` is a frozen dataclass whose fields are flags of ``train``, ``encode`` and ``classify``; torch
and Lightning are imported only when a trainer is built, so the command line reads the flags fast.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from quackae.core.cores import usable_cores
from quackae.core.errors import QuackError


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
        if re.fullmatch(r"0+", devices) or not (  # a bare 0 is a count of no devices; device 0 alone is "0,"
            devices == "auto"
            or re.fullmatch(r"-1|[1-9]\d*", devices)
            or re.fullmatch(r"\[?\s*\d+\s*(,\s*\d+\s*)*,?\s*\]?", devices)
        ):
            raise ValueError(
                f"--devices must be auto, a count of at least 1 (-1: all), or a list of device indices like 0, or "
                f"0,1; got {self.devices!r}"
            )
        seed = getattr(self, "seed", 0)  # the commands with these flags seed numpy and torch with --seed
        if not 0 <= seed < 2**32:
            raise ValueError(f"--seed must be in [0, 2**32), got {seed}")
        if self.batch_size is not None and self.batch_size <= 0:  # None: the stage chooses
            raise ValueError(f"--batch-size must be positive, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must not be negative, got {self.num_workers}")
        if self.num_nodes < 1:
            raise ValueError(f"--num-nodes must be at least 1, got {self.num_nodes}")

    def trainer_kwargs(self, training: bool = False) -> dict[str, Any]:
        """Keyword arguments for ``pl.Trainer`` (``training``: for fitting, which has its own precision default, see
        ``default_precision``); ``QuackError`` when this machine lacks the accelerator asked for."""
        devices = self.checked_devices()
        return {
            "accelerator": self.accelerator,
            "devices": devices,
            "num_nodes": self.num_nodes,
            "strategy": self.strategy,
            "precision": self.precision or default_precision(self.accelerator, training),
        }

    def checked_devices(self) -> Any:
        """``--devices`` as Lightning takes it, once the accelerator exists here and the rank count fits the CPU."""
        check_accelerator(self.accelerator)
        devices: Any = str(self.devices).strip()
        if re.fullmatch(r"-?\d+", devices):
            devices = int(devices)
        self.check_cpu_ranks(devices)
        return devices

    def check_cpu_ranks(self, devices: Any) -> None:
        """Refuse more processes on the CPU than this process may run on cores: each rank is a whole copy of the
        model and its data, so 99 ranks on 2 cores take minutes and tens of GB to do what one does."""
        import torch

        if devices == "auto" or (isinstance(devices, int) and devices <= 1):
            return
        name = self.accelerator.lower()
        gpu = torch.cuda.is_available() or bool(
            getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
        )
        if name != "cpu" and (name != "auto" or gpu):
            return
        if not isinstance(devices, int):
            raise QuackError(
                f"--devices {devices} lists device indices, which only a GPU has; on the CPU give a count (--devices 1)"
            )
        cores = usable_cores()
        if devices > cores:
            raise QuackError(
                f"--devices {devices} would start {devices} processes on the CPU, which has {cores} cores for this "
                f"process; use at most --devices {cores} (or 1: one process already uses every core)"
            )


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


ENCODE_BATCH = {"cpu": 128, "gpu": 1024}  # items per encode batch by default: a GPU needs larger batches to stay busy


def encode_batch_size(accelerator: str) -> int:
    """``quackae encode``'s default batch size on ``accelerator`` (``auto`` is a GPU where torch sees one)."""
    import torch

    on_gpu = accelerator.lower() in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return ENCODE_BATCH["gpu" if on_gpu else "cpu"]


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
