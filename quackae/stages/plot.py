"""``quackae plot RUN``: draw ``RUN/curves.png`` (training and validation loss and teacher-forced token accuracy
against step) and say which token accuracy it shows."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from quackae.core.errors import QuackError
from quackae.core.files import read_json
from quackae.core.results import StageResult
from quackae.stages.configs import PlotConfig
from quackae.viz.curves import write_curves

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlotResult(StageResult):
    """The picture drawn, and the held-out greedy token accuracy the run's summary holds (not drawn)."""

    out: str
    summary: str  # RUN/summary.json
    greedy_token_accuracy: float | None

    def lines(self) -> list[str]:
        line = (
            f"{self.out}: loss and teacher-forced token accuracy (train_token_acc, val_token_acc: each token "
            "predicted from the true previous ones) against step"
        )
        if self.greedy_token_accuracy is not None:
            line += (
                f"; the held-out greedy token accuracy train printed ({self.summary}: greedy_token_accuracy) is "
                f"{self.greedy_token_accuracy:.3f}"
            )
        return [line]


def plot(config: PlotConfig) -> PlotResult:
    """Run ``quackae plot RUN``; its line names the teacher-forced token accuracy drawn and the greedy one not drawn."""
    out = write_curves(config.run, config.out)
    summary = Path(config.run) / "summary.json"
    greedy = None
    if summary.is_file():
        try:
            greedy = read_json(summary, "run summary", "train the run again").get("greedy_token_accuracy")
        except QuackError as error:
            log.warning("%s", error)
    return PlotResult(
        out=str(out), summary=str(summary), greedy_token_accuracy=greedy if isinstance(greedy, float) else None
    )
