"""Scaled dot-product attention over encoder states, with exact masking.

Shape glossary:
    B  batch size
    T  encoder time steps (items attended over)
    S  decoder steps (queries); the single-query API uses S = 1
    H  hidden size
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def attention_scores(states: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Scaled dot products of every state with every query.

    ``states`` is (B, T, H), ``queries`` is (B, S, H); returns (B, T, S) with
    ``scores[b, t, s] = states[b, t] . queries[b, s] / sqrt(H)``.
    """
    scale = 1.0 / math.sqrt(states.size(-1))
    return torch.bmm(states, queries.transpose(1, 2)) * scale  # (B, T, H) x (B, H, S) -> (B, T, S)


def attend(
    states: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor | None = None, check: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over T of ``scores`` (B, T, S), then the weighted sum of ``states`` (B, T, H).

    ``mask`` is boolean (B, T), True where a state is present. Masked positions get weight
    exactly 0; ``scores`` is never modified in place. Returns ``(context (B, S, H), weights (B, T, S))``.
    With ``check`` a row whose mask is all False raises ``ValueError`` (its softmax would be NaN);
    callers that already guarantee non-empty rows pass ``check=False`` to skip the host sync.
    """
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != scores.shape[:2]:
            raise ValueError(
                f"mask must be a bool tensor of shape {tuple(scores.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}"
            )
        if check and not bool(mask.any(dim=1).all()):
            raise ValueError("attention mask has a row with no present item; every row needs at least one True")
        scores = scores.masked_fill(~mask.unsqueeze(-1), float("-inf"))  # (B, T, S), a new tensor
    weights = F.softmax(scores, dim=1)  # (B, T, S), each column sums to 1 over T
    context = torch.bmm(weights.transpose(1, 2), states)  # (B, S, T) x (B, T, H) -> (B, S, H)
    return context, weights


class AttentionScore(nn.Module):
    """Scaled dot-product score ``h_t . c / sqrt(H)`` of each state against a context vector."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"AttentionScore dim must be positive, got {dim}")
        self.dim = dim

    def forward(self, states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``states`` (B, T, H) and ``context`` (B, H) -> scores (B, T, 1).

        A batch of queries ``context`` (B, S, H) gives scores (B, T, S).
        """
        if states.size(-1) != self.dim or context.size(-1) != self.dim:
            raise ValueError(
                f"AttentionScore expects hidden size {self.dim}, got states {tuple(states.shape)} "
                f"and context {tuple(context.shape)}"
            )
        queries = context.unsqueeze(1) if context.dim() == 2 else context  # (B, S, H)
        return attention_scores(states, queries)  # (B, T, S)


class AttentionModule(nn.Module):
    """Turns scores into weights (masked softmax over T) and a context vector."""

    def forward(
        self,
        states: torch.Tensor,
        attention_scores: torch.Tensor,
        mask: torch.Tensor | None = None,
        check: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``states`` (B, T, H), ``attention_scores`` (B, T, 1), ``mask`` bool (B, T) or None.

        Returns ``(context (B, H), weights (B, T, 1))``; masked weights are exactly 0 and each
        row's weights sum to 1. Raises ``ValueError`` for a row whose mask is all False (unless
        ``check`` is off: a caller that guarantees non-empty rows skips the host sync).
        """
        if attention_scores.dim() != 3 or attention_scores.size(-1) != 1:
            raise ValueError(f"attention_scores must be (B, T, 1), got {tuple(attention_scores.shape)}")
        context, weights = attend(states, attention_scores, mask, check)  # (B, 1, H), (B, T, 1)
        return context.squeeze(1), weights  # (B, H), (B, T, 1)

    def attend_all(
        self, states: torch.Tensor, attention_scores: torch.Tensor, mask: torch.Tensor | None = None, check: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every decoder step at once: scores (B, T, S) -> ``(context (B, S, H), weights (B, T, S))``, the same
        numbers as ``forward`` step by step."""
        return attend(states, attention_scores, mask, check)  # (B, S, H), (B, T, S)
