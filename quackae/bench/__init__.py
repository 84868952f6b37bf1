"""``quackae bench``: throughput and quality figures on data the benchmark makes itself.

One module per bench (``train``, ``prepare``, ``encode``, ``store``, ``quality``), each with a
``bench_NAME(config)`` that imports the stages it measures (never the other way round). Every
figure is measured here, on this process's devices, with warm-up steps excluded. Each bench
returns a flat dict of figures; ``run_bench`` hands it back as a ``BenchResult``, whose lines the command line
prints (with ``--json``, then the figures as one JSON object).

May import: quackae.core, quackae.data, quackae.model, quackae.runs, quackae.viz, quackae.store,
quackae.eval, quackae.stages.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Any

from quackae.core.results import StageResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    what: str = field(default="train", metadata={"help": "what to measure: train, prepare, encode, store or quality"})
    steps: int = field(default=40, metadata={"help": "timed training steps per device (train)"})
    warmup: int = field(default=3, metadata={"help": "untimed warm-up steps (train)"})
    rows: int = field(default=100_000, metadata={"help": "corpus rows (prepare)"})
    items: int = field(default=10_000, metadata={"help": "items to encode (encode) or to store (store)"})
    batch_size: int = field(
        default=0, metadata={"help": "batch size; 0 takes each bench's standard (32 train, 128 encode)"}
    )
    rounds: int = field(
        default=5, metadata={"help": "encode: end-to-end runs, each between two model-only passes (medians reported)"}
    )
    cuda: bool = field(default=True, metadata={"help": "also measure on CUDA when a GPU is present"})
    accelerator: str = field(default="auto", metadata={"help": "encode: cpu, or cuda/auto (a GPU when present)"})
    precision: str | None = field(
        default=None, metadata={"help": "encode: Lightning precision (default bf16-mixed on a GPU that supports it)"}
    )
    seed: int = field(
        default=0,
        metadata={"help": "random seed of the generated data (quality: of training, the probe split and its draws)"},
    )
    corpus: str = field(default="stdlib", metadata={"help": "quality: stdlib, site (site-packages) or a JSONL file"})
    quality_steps: int = field(default=0, metadata={"help": "quality: training steps (0: 2000)"})
    option: tuple[str, ...] = field(default=(), metadata={"help": "quality: train settings NAME=VALUE to override"})
    pretrain: bool = field(
        default=False,
        metadata={"help": "quality: also train on the site corpus's paragraphs outside the probe, and probe with that"},
    )
    dir: str | None = field(
        default=None,
        metadata={
            "help": "folder for the generated corpus, dataset and store "
            "(default: the system temporary folder); put it on "
            "the disk you want to measure"
        },
    )

    def __post_init__(self) -> None:
        if self.what not in ("train", "prepare", "encode", "store", "quality"):
            raise ValueError(f"--what must be train, prepare, encode, store or quality, got {self.what!r}")
        for name in ("steps", "rows", "items", "rounds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.warmup < 0 or self.batch_size < 0:
            raise ValueError("--warmup and --batch-size must not be negative")


@dataclass(frozen=True)
class BenchResult(StageResult):
    """The figures of one bench: a flat mapping whose names depend on ``what`` (see each bench module)."""

    what: str
    measured: dict[str, Any]

    def figures(self) -> dict[str, Any]:
        return dict(self.measured)

    def lines(self) -> list[str]:
        return [f"{key:>28}: {value}" for key, value in self.measured.items() if key != "config"]


def run_bench(config: BenchConfig) -> BenchResult:
    """Run the bench ``config.what`` names and return its figures (each bench module imported only when run)."""
    module = importlib.import_module(f"quackae.bench.{config.what}")
    return BenchResult(what=config.what, measured=getattr(module, f"bench_{config.what}")(config))
