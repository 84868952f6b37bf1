"""Timing training steps of a ``QuackAutoEncoder`` on generated batches: ``quackae bench --what train`` and the
training-time estimate of ``quackae run`` both measure with it.

Shape glossary: B batch size, T padded width.
"""

from __future__ import annotations

import time

import torch

from quackae.model.autoencoder import QuackAutoEncoder
from quackae.model.optimizer import adamw


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
