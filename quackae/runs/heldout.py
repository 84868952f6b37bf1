"""Held-out greedy reconstruction: the figure ``quackae train`` ends with.

Each sampled test item is encoded and decoded greedily, every step fed the model's own previous token (as
``quackae reconstruct`` does); the greedy token accuracy is the share of the item's tokens rebuilt at their
position, the exact-match rate the share of items rebuilt whole. It is not the teacher-forced token accuracy
that training logs (``train_token_acc``/``val_token_acc`` in ``metrics.csv`` and ``curves.png``), where every
step is fed the true previous token: greedy decoding compounds its own mistakes and scores far lower.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from quackae.runs.budget import now

BATCH = 128  # items decoded together
BLOCK_BATCHES = 2  # batches whose items are sorted by length together; the deadline is checked between blocks


def sample(indices: Any, size: int, seed: int) -> np.ndarray:
    """A seeded random sample of ``size`` of ``indices`` (all of them, shuffled, when ``size`` < 0 or larger)."""
    order = np.random.default_rng(seed).permutation(np.asarray(indices, dtype=np.int64))
    return order if size < 0 else order[:size]


@torch.no_grad()
def greedy_reconstruction(checkpoint: Path, dataset: Any, items: np.ndarray, deadline: float | None) -> dict[str, Any]:
    """Greedy token accuracy and exact-match rate over the rows ``items`` of ``dataset``; ``greedy_items`` says how
    many were scored.

    ``items`` (a random sample) are taken in blocks of ``BLOCK_BATCHES`` batches of ``BATCH``, each block sorted
    by length so that similar lengths decode together; after the first, no block starts past ``deadline`` (a
    ``budget.now()``), so the items scored before a deadline are a random sample too, not a length stratum.
    """
    from quackae.data.padding import length_sorted_batches
    from quackae.model.checkpoints import load_model

    scored = {"greedy_items": 0, "greedy_token_accuracy": None, "greedy_exact_match": None}
    if not len(items):
        return scored
    model = load_model(str(checkpoint))
    rows = dataset.select_columns(["input_ids"])[items.tolist()]["input_ids"]
    block = BLOCK_BATCHES * BATCH
    correct = total = exact = done = 0
    for start in range(0, len(rows), block):
        if done and deadline is not None and now() >= deadline:
            break
        ordered = rows[start : start + block]
        for _, x in length_sorted_batches(ordered, BATCH, model.pad_id):  # x: (B, T)
            out = model.reconstruct(x, max_length=x.size(1))  # (B, S)
            if out.size(1) < x.size(1):
                out = torch.nn.functional.pad(out, (0, x.size(1) - out.size(1)), value=model.pad_id)
            valid = x.ne(model.pad_id)
            hits = (out[:, : x.size(1)] == x) & valid
            correct += int(hits.sum())
            total += int(valid.sum())
            exact += int((hits | ~valid).all(dim=1).sum())
        done += len(ordered)
    scored.update(greedy_items=done, greedy_token_accuracy=correct / total, greedy_exact_match=exact / done)
    return scored


def teacher_forced(out: Path, has_best: bool) -> float | None:
    """``val_token_acc`` (teacher-forced) of the validation with the lowest ``val_loss``, the best checkpoint's."""
    from quackae.runs.logs import read_metrics

    if not has_best or not (out / "metrics.csv").is_file():
        return None
    metrics = read_metrics(out / "metrics.csv")
    if not metrics.get("val_loss"):
        return None
    step = min(metrics["val_loss"], key=lambda point: point[1])[0]
    return dict(metrics.get("val_token_acc", [])).get(step)


def figure_lines(summary: dict[str, Any], sampled: int, which: str, evaluated: Path) -> list[str]:
    """What the command prints about the held-out greedy figures and the teacher-forced one beside them."""
    scored = summary["greedy_items"]
    if not scored:
        return [f"no held-out items scored (--eval-items {sampled} of {summary['test_items']:,} test items)"]
    cut = f"; {sampled - scored:,} sampled left unscored: the --max-time budget ended" if scored < sampled else ""
    lines = [
        f"held-out greedy reconstruction (each token decoded from the model's own previous ones) of {scored:,} "
        f"sampled of {summary['test_items']:,} test items{cut}: greedy token accuracy "
        f"{summary['greedy_token_accuracy']:.3f}, exact match {summary['greedy_exact_match']:.3f} "
        f"({which} checkpoint {evaluated})"
    ]
    if summary["teacher_forced_val_token_accuracy"] is not None:
        lines.append(
            "teacher-forced token accuracy (each token predicted from the true previous ones: val_token_acc in "
            f"metrics.csv and curves.png) at the best validation: {summary['teacher_forced_val_token_accuracy']:.3f}"
        )
    return lines
