"""Held-out figures of a trained model: greedy reconstruction of the items of the test split.

Shape glossary: B batch size, T longest item in the batch, S decoded steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


@torch.no_grad()
def evaluate_reconstruction(checkpoint: Path, datamodule: Any, indices: Any, limit: int = 2000) -> dict[str, float]:
    """Greedy reconstruction token accuracy and exact-match rate over (at most ``limit``) items ``indices``."""
    from quackae.data.padding import length_sorted_batches
    from quackae.model.checkpoints import load_model

    model = load_model(str(checkpoint))
    if not len(indices):
        return {"token_accuracy": float("nan"), "exact_match": float("nan")}
    indices = list(indices)[:limit]
    rows = datamodule.dataset.select_columns(["input_ids"])[indices]["input_ids"]
    correct = total = exact = 0
    for _, x in length_sorted_batches(rows, 128, model.pad_id):
        out = model.reconstruct(x, max_length=x.size(1))  # (B, S)
        if out.size(1) < x.size(1):
            out = torch.nn.functional.pad(out, (0, x.size(1) - out.size(1)), value=model.pad_id)
        valid = x.ne(model.pad_id)  # (B, T)
        hits = (out[:, : x.size(1)] == x) & valid
        correct += int(hits.sum())
        total += int(valid.sum())
        exact += int((hits | ~valid).all(dim=1).sum())
    return {"token_accuracy": correct / total, "exact_match": exact / len(rows)}
