"""``quackae bench --what train``: training-step throughput on generated batches."""

from __future__ import annotations

import logging
import platform
from typing import Any

import torch

from quackae.model.autoencoder import QuackAutoEncoder
from quackae.model.config import PRESETS
from quackae.model.steptime import random_batches, time_training
from quackae.model.trainer import cpu_has_amx_bf16

log = logging.getLogger(__name__)


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
