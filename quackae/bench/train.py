"""``quackae bench --what train``: training-step throughput on generated batches."""

from __future__ import annotations

import logging
import platform
from dataclasses import replace
from typing import Any

import torch

from quackae.model.autoencoder import QuackAutoEncoder
from quackae.model.config import PRESETS
from quackae.model.steptime import random_batches, time_training
from quackae.model.trainer import cpu_has_amx_bf16

log = logging.getLogger(__name__)


def bench_train(config: Any) -> dict[str, Any]:
    """Training throughput of the ``base`` preset (vocab 8000, E 128, H 256, 1 layer), lengths U[8, 64], fp32, and
    bf16-mixed too on a CPU with AMX-BF16 (where ``quackae train`` defaults to it): with train's default objective
    (``tokens_per_s``: the bag-of-words term alone, no decoder) and with the reconstruction autoencoder
    (``reconstruction_tokens_per_s``: teacher-forced decoding, the only objective before the bag-of-words
    default, so the figure to set beside earlier versions')."""
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
            "objective": {"reconstruction_weight": base.reconstruction_weight, "bow_weight": base.bow_weight},
            "steps": config.steps,
        },
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
    }
    cpu = torch.device("cpu")
    cuda = torch.device("cuda") if config.cuda and torch.cuda.is_available() else None
    if cuda is not None:
        result["cuda_device"] = torch.cuda.get_device_name(cuda)
    objectives = {"": base, "reconstruction_": replace(base, reconstruction_weight=1.0, bow_weight=0.0)}
    for prefix, settings in objectives.items():
        model = QuackAutoEncoder(config=settings)
        result[f"{prefix}tokens_per_s"] = round(time_training(model, batches, config.warmup, cpu), 1)
        log.info("cpu%s: %.0f non-pad tokens/s", f" ({prefix[:-1]})" if prefix else "", result[f"{prefix}tokens_per_s"])
        if cpu_has_amx_bf16():
            bf16 = time_training(model, batches, config.warmup, cpu, bf16=True)
            result[f"{prefix}cpu_bf16_tokens_per_s"] = round(bf16, 1)
        if cuda is not None:
            result[f"{prefix}cuda_tokens_per_s"] = round(time_training(model, batches, config.warmup, cuda), 1)
            bf16 = time_training(model, batches, config.warmup, cuda, bf16=True)
            result[f"{prefix}cuda_bf16_tokens_per_s"] = round(bf16, 1)
    return result
