"""Decoding a ``QuackAutoEncoder`` step by step: free-running training batches and greedy reconstruction.

Teacher-forced training decodes every step at once (``QuackAutoEncoder._teacher_forced``); these loops feed
the decoder its own tokens, one step at a time, as they must.

Shape glossary: B batch size, T encoder width, S decoder steps, E embedding size, H hidden size,
V vocabulary size, L GRU layers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def decode_step(
    model: Any, token_embed: torch.Tensor, hidden: torch.Tensor, states: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoder step: ``token_embed`` (B, E), ``hidden`` (L, B, H) -> logits (B, V), hidden, weights (B, T)."""
    out, hidden = model.decoder(token_embed.unsqueeze(1), hidden)  # (B, 1, H), (L, B, H)
    scores = model.attention_score(states, out)  # (B, T, 1)
    context, weights = model.attention(states, scores, mask, check=False)  # (B, H), (B, T, 1)
    logits = model.predict(model.drop(torch.cat([context, out.squeeze(1)], dim=-1)))  # (B, 2H) -> (B, V)
    return logits, hidden, weights.squeeze(-1)


def free_running(
    model: Any, target: torch.Tensor, encoding: torch.Tensor, states: torch.Tensor, enc_mask: torch.Tensor
) -> torch.Tensor:
    """The decoder fed its own samples step by step; returns logits (B, S, V) for every step."""
    batch = target.size(0)
    hidden = model._initial_hidden(encoding)  # (L, B, H)
    token_embed = model.start.expand(batch, -1)  # (B, E)
    outputs = []
    for _ in range(model._steps(target.size(1))):
        logits, hidden, _ = decode_step(model, token_embed, hidden, states, enc_mask)  # (B, V)
        outputs.append(logits)
        with torch.no_grad():
            sampled = torch.multinomial(F.softmax(logits.float(), dim=-1), 1).squeeze(1)  # (B,)
        token_embed = model.drop(model.embed(sampled))  # (B, E)
    return torch.stack(outputs, dim=1)  # (B, S, V)


@torch.no_grad()
def greedy(
    model: Any, x: torch.Tensor, max_length: int | None = None, return_attention: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding of ``x`` (B, T) from its own encoding -> LongTensor (B, S); see
    ``QuackAutoEncoder.reconstruct``."""
    x, mask, lengths = model._check(x)
    encoding, states = model._encode(x, lengths)
    steps = max_length or model.hparams.max_decode_length or x.size(1)
    hidden = model._initial_hidden(encoding)  # (L, B, H)
    token_embed = model.start.expand(x.size(0), -1)  # (B, E)
    eos = model.hparams.eos_id
    done = torch.zeros(x.size(0), dtype=torch.bool, device=x.device)  # (B,)
    tokens, attention = [], []
    for _ in range(steps):
        logits, hidden, weights = decode_step(model, token_embed, hidden, states, mask)  # (B, V), (B, T)
        token = logits.argmax(dim=-1).masked_fill(done, model.pad_id)  # (B,)
        tokens.append(token)
        attention.append(weights)
        if eos is not None:
            done = done | token.eq(eos)
            if bool(done.all()):
                break
        token_embed = model.embed(token)  # (B, E)
    out = torch.stack(tokens, dim=1)  # (B, S)
    if return_attention:
        return out, torch.stack(attention, dim=1)  # (B, S, T)
    return out
