"""The optimizer quackae trains with: AdamW, fused where this torch build has the kernel."""

from __future__ import annotations

from typing import Any

import torch


def adamw(parameters: Any, lr: float, weight_decay: float, fused: bool = True) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one pass over all parameters) where this torch build has it and ``fused``."""
    parameters = list(parameters)
    if fused:
        try:
            return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError):  # a device or dtype without a fused kernel
            pass
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
