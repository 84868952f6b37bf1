"""What a training run reports: ``TrainResult`` (also ``RUN/summary.json``) and why training stopped."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quackae.core.results import StageResult
from quackae.runs.budget import Budget
from quackae.runs.heldout import figure_lines

# Why a RUN trained without reconstruction has no held-out greedy figures (summary.json and the printed line).
SKIPPED_GREEDY = (
    "no reconstruction trained (--reconstruction-weight 0), so the decoder is untrained; "
    "--reconstruction-weight 1 --bow-weight 0 trains the reconstruction autoencoder"
)


@dataclass(frozen=True)
class TrainResult(StageResult):
    """What ``quackae train`` measured, also written to ``RUN/summary.json``.

    ``stop_reason`` is one of interrupted, max_time, early_stopping, max_steps, max_epochs, non_finite or
    other; ``stop_detail`` says it in words. The greedy figures are over ``greedy_items`` of the
    ``greedy_sampled`` test items (fewer when ``--max-time`` ended the scoring); a RUN trained without
    reconstruction has none and says why under ``greedy_skipped``.
    """

    run: str
    stop_reason: str
    stop_detail: str
    global_step: int
    epochs: int
    validations: int  # in this start of the run
    test_items: int
    best_checkpoint: str | None = None
    last_checkpoint: str | None = None
    best_val_loss: float | None = None
    train_bow_loss: float | None = None  # the bag-of-words loss per token: the last epoch's mean
    val_bow_loss: float | None = None  # and the last validation's (None without the bag-of-words term)
    evaluated_checkpoint: str | None = None  # the checkpoint the held-out figures come from
    greedy_sampled: int = 0
    greedy_items: int = 0
    greedy_token_accuracy: float | None = None
    greedy_exact_match: float | None = None
    teacher_forced_val_token_accuracy: float | None = None
    greedy_skipped: str | None = None
    non_finite_step: int | None = None
    seconds: float = 0.0

    def figures(self) -> dict[str, Any]:
        # the names the first summaries gave the greedy figures, kept for their readers
        return {
            **super().figures(),
            "token_accuracy": self.greedy_token_accuracy,
            "exact_match": self.greedy_exact_match,
        }

    def lines(self) -> list[str]:
        lines = self.stop_lines()
        if self.evaluated_checkpoint is None:
            lines.append("no checkpoint was written: training stopped before its first step")
        elif self.greedy_skipped is not None:
            lines.append(f"held-out greedy reconstruction skipped: {self.greedy_skipped}")
        else:
            which = "best" if self.best_checkpoint else "last"
            lines.extend(figure_lines(self.figures(), self.greedy_sampled, which, Path(self.evaluated_checkpoint)))
        return lines

    def stop_lines(self) -> list[str]:
        """Why training stopped, and where the held-out figures come from when no validation ran."""
        lines = [
            f"training stopped: {self.stop_detail} at step {self.global_step} ({self.validations} validations in "
            "this start)"
        ]
        if self.best_checkpoint is None:
            lines.append(
                "no validation ran before the stop, so there is no best checkpoint; held-out figures come from "
                f"{Path(self.last_checkpoint or 'last.ckpt').name} (validate sooner with --val-check-interval)"
            )
        return lines


def stop_reason(trainer: Any, early: Any, interrupted: bool, config: Any, budget: Budget | None) -> tuple[str, str]:
    """``(reason, what happened)``: interrupted, max_time, early_stopping, max_steps, max_epochs or other."""
    if interrupted:
        return "interrupted", "interrupted (Ctrl-C); continue with --resume RUN/checkpoints/last.ckpt"
    if budget is not None and budget.stopped:
        return "max_time", f"--max-time {config.max_time} reached (stopped in time for what follows training)"
    stopping = getattr(early, "stopping_reason", None)
    if (stopping is not None and stopping.value != 0) or (stopping is None and early.stopped_epoch > 0):
        detail = getattr(early, "stopping_reason_message", None) or f"val_loss did not improve for {early.patience}"
        return "early_stopping", "early stopping: " + " ".join(str(detail).split())
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return "max_steps", f"--max-steps {trainer.max_steps} reached"
    if trainer.max_epochs not in (None, -1) and trainer.current_epoch >= trainer.max_epochs:
        return "max_epochs", f"--max-epochs {trainer.max_epochs} reached"
    return "other", "training ended"
