"""Training-only noise on a ``QuackAutoEncoder``'s inputs: pushing information through the encoding.

``corrupt`` deletes or masks encoder input tokens (``denoise``); ``word_dropout`` replaces decoder input tokens
by the mask id (Bowman et al. 2016). Both draw from torch's generator on the tokens' device.

Shape glossary: B batch size, T encoder width, S decoder steps.
"""

from __future__ import annotations

import torch


def corrupt(
    x: torch.Tensor, mask: torch.Tensor, share: float, mode: str, mask_id: int | None, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token deletion (``mode`` "delete") or masking ("mask": the tokens become ``mask_id``) of about ``share`` of
    the tokens of ``x`` (B, T) where ``mask`` (B, T) is true; returns ``(x', mask', lengths' on the CPU)``.

    Deletion keeps the remaining tokens in their order, moved to the front, and at least one token a row.
    """
    drop = (torch.rand(x.shape, device=x.device) < share) & mask  # (B, T)
    if mode == "mask":
        return x.masked_fill(drop, mask_id), mask, mask.sum(dim=1).cpu()
    keep = mask & ~drop
    keep[:, 0] |= ~keep.any(dim=1)  # every row keeps at least one token
    # A stable sort of "dropped" flags moves kept tokens to the front in their order.
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # (B, T)
    kept = keep.sum(dim=1, keepdim=True)  # (B, 1)
    new_mask = torch.arange(x.size(1), device=x.device).unsqueeze(0) < kept  # (B, T)
    noisy = x.gather(1, order).masked_fill(~new_mask, pad_id)  # (B, T)
    return noisy, new_mask, kept.squeeze(1).cpu()


def word_dropout(tokens: torch.Tensor, share: float, mask_id: int | None, pad_id: int) -> torch.Tensor:
    """Decoder input ids (B, S) with about ``share`` of the non-pad tokens replaced by ``mask_id`` (the pad id,
    whose embedding is zero, when there is no mask id)."""
    replacement = mask_id if mask_id is not None else pad_id
    hit = (torch.rand(tokens.shape, device=tokens.device) < share) & tokens.ne(pad_id)
    return tokens.masked_fill(hit, replacement)  # (B, S)
