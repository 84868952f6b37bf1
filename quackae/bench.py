"""``quackae bench``: throughput figures on data the benchmark makes itself.

Every figure is measured here, on this process's devices, with warm-up steps excluded. Each
bench returns a flat dict of figures that the CLI prints (and, with ``--json``, dumps).
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from quackae.model import QuackAutoEncoder, adamw

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
    cuda: bool = field(default=True, metadata={"help": "also measure on CUDA when a GPU is present"})
    seed: int = field(default=0, metadata={"help": "random seed for the generated data"})
    corpus: str = field(default="stdlib", metadata={"help": "quality: stdlib, site (site-packages) or a JSONL file"})
    quality_steps: int = field(default=0, metadata={"help": "quality: training steps (0: 2000)"})
    option: tuple[str, ...] = field(default=(), metadata={"help": "quality: train settings NAME=VALUE to override"})
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
        for name in ("steps", "rows", "items"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.warmup < 0 or self.batch_size < 0:
            raise ValueError("--warmup and --batch-size must not be negative")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batches(
    count: int, batch_size: int, vocab: int, min_len: int, max_len: int, generator: torch.Generator, pad_id: int = 0
) -> list[torch.Tensor]:
    """``count`` right-padded batches (B, T) of random ids in [1, vocab) with lengths uniform in [min_len, max_len]."""
    batches = []
    for _ in range(count):
        lengths = torch.randint(min_len, max_len + 1, (batch_size,), generator=generator)  # (B,)
        width = int(lengths.max())
        ids = torch.randint(1, vocab, (batch_size, width), generator=generator)  # (B, T)
        ids[torch.arange(width).unsqueeze(0) >= lengths.unsqueeze(1)] = pad_id
        batches.append(ids)
    return batches


def time_training(
    model: QuackAutoEncoder, batches: list[torch.Tensor], warmup: int, device: torch.device, bf16: bool = False
) -> float:
    """Non-pad tokens/s of full training steps (forward, backward, AdamW step) over ``batches``."""
    model.to(device).train()
    optimizer = adamw(model.parameters(), lr=1e-3, weight_decay=0.01)
    batches = [b.to(device) for b in batches]

    def step(x: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model.training_loss(x)
        loss.backward()
        optimizer.step()

    for x in batches[:warmup]:
        step(x)
    _sync(device)
    timed = batches[warmup:]
    tokens = sum(int(x.ne(model.pad_id).sum()) for x in timed)
    start = time.perf_counter()
    for x in timed:
        step(x)
    _sync(device)
    return tokens / (time.perf_counter() - start)


def bench_train(config: BenchConfig) -> dict[str, Any]:
    """Training throughput at vocab 8000, embed 128, hidden 256, 1 layer, lengths U[8, 64], fp32."""
    batch_size = config.batch_size or 32
    generator = torch.Generator().manual_seed(config.seed)
    batches = random_batches(config.warmup + config.steps, batch_size, 8000, 8, 64, generator)
    torch.manual_seed(config.seed)
    result: dict[str, Any] = {
        "bench": "train",
        "config": {
            "vocab": 8000,
            "embed": 128,
            "hidden": 256,
            "layers": 1,
            "batch_size": batch_size,
            "lengths": [8, 64],
            "precision": "32",
            "teacher_forcing": True,
            "steps": config.steps,
        },
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
    }
    model = QuackAutoEncoder(8000, embed_size=128, hidden_size=256, layers=1)
    result["tokens_per_s"] = round(time_training(model, batches, config.warmup, torch.device("cpu")), 1)
    log.info("cpu: %.0f non-pad tokens/s", result["tokens_per_s"])
    if config.cuda and torch.cuda.is_available():
        cuda = torch.device("cuda")
        result["cuda_device"] = torch.cuda.get_device_name(cuda)
        result["cuda_tokens_per_s"] = round(time_training(model, batches, config.warmup, cuda), 1)
        result["cuda_bf16_tokens_per_s"] = round(time_training(model, batches, config.warmup, cuda, bf16=True), 1)
    return result


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Run the bench ``config.what`` names and return its figures."""
    if config.what == "train":
        return bench_train(config)
    if config.what == "quality":
        from quackae.bench_quality import bench_quality

        return bench_quality(config)
    if config.what == "prepare":
        from quackae.prepare import bench_prepare

        return bench_prepare(config)
    if config.what == "store":
        from quackae.storebench import bench_store

        return bench_store(config)
    from quackae.encode import bench_encode

    return bench_encode(config)
