"""``quackae plot RUN``: draw ``RUN/curves.png`` (training and validation loss and teacher-forced token accuracy
against step) and say which token accuracy it shows."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quackae.curves import write_curves
from quackae.errors import QuackError
from quackae.files import read_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlotConfig:
    run: str = field(metadata={"positional": True, "path": True, "help": "RUN directory (quackae train --out)"})
    out: str | None = field(default=None, metadata={"path": True, "help": "PNG to write; none given: RUN/curves.png"})


def plot(config: PlotConfig) -> dict[str, Any]:
    """Run ``quackae plot RUN``; its line names the teacher-forced token accuracy drawn and the greedy one not drawn."""
    out = write_curves(config.run, config.out)
    line = (
        f"{out}: loss and teacher-forced token accuracy (train_token_acc, val_token_acc: each token predicted from "
        "the true previous ones) against step"
    )
    summary = Path(config.run) / "summary.json"
    greedy = None
    if summary.is_file():
        try:
            greedy = read_json(summary, "run summary", "train the run again").get("greedy_token_accuracy")
        except QuackError as error:
            log.warning("%s", error)
    if isinstance(greedy, float):
        line += f"; the held-out greedy token accuracy train printed ({summary}: greedy_token_accuracy) is {greedy:.3f}"
    return {"out": str(out), "lines": [line]}
