"""``quackae bench --what train``: training-step throughput on generated batches."""

from __future__ import annotations

import logging
import platform
import time
from typing import Any

import torch

from quackae.model import QuackAutoEncoder, adamw
from quackae.modelconfig import PRESETS
from quackae.runtime import cpu_has_amx_bf16

log = logging.getLogger(__name__)


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
        # as Lightning's bf16-mixed does: autocast around the forward pass, no cache of cast weights
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
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


def bench_train(config: Any) -> dict[str, Any]:
    """Training throughput of the ``base`` preset (vocab 8000, E 128, H 256, 1 layer), lengths U[8, 64], fp32, and
    bf16-mixed too on a CPU with AMX-BF16 (where ``quackae train`` defaults to it)."""
    base = PRESETS["base"]
    batch_size = config.batch_size or 32
    generator = torch.Generator().manual_seed(config.seed)
    batches = random_batches(config.warmup + config.steps, batch_size, base.num_embeddings, 8, 64, generator)
    torch.manual_seed(config.seed)
    result: dict[str, Any] = {
        "bench": "train",
        "config": {
            "vocab": base.num_embeddings,
            "embed": base.embed_size,
            "hidden": base.hidden_size,
            "layers": base.layers,
            "batch_size": batch_size,
            "lengths": [8, 64],
            "precision": "32",
            "teacher_forcing": True,
            "steps": config.steps,
        },
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
    }
    model = QuackAutoEncoder(config=base)
    cpu = torch.device("cpu")
    result["tokens_per_s"] = round(time_training(model, batches, config.warmup, cpu), 1)
    log.info("cpu: %.0f non-pad tokens/s", result["tokens_per_s"])
    if cpu_has_amx_bf16():
        result["cpu_bf16_tokens_per_s"] = round(time_training(model, batches, config.warmup, cpu, bf16=True), 1)
        log.info("cpu, bf16-mixed: %.0f non-pad tokens/s", result["cpu_bf16_tokens_per_s"])
    if config.cuda and torch.cuda.is_available():
        cuda = torch.device("cuda")
        result["cuda_device"] = torch.cuda.get_device_name(cuda)
        result["cuda_tokens_per_s"] = round(time_training(model, batches, config.warmup, cuda), 1)
        result["cuda_bf16_tokens_per_s"] = round(time_training(model, batches, config.warmup, cuda, bf16=True), 1)
    return result
