"""What ``quackae classify`` reports: the classifier's test figures beside its baselines, and ``--predict``'s counts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quackae.core.results import StageResult
from quackae.eval.probes import FEW_LABELS


@dataclass(frozen=True)
class ClassifyResult(StageResult):
    """A classifier's test figures beside its baselines; the whole report is ``OUT/report.json``."""

    out: str
    test_items: int
    accuracy: float
    macro_f1: float
    majority_accuracy: float
    linear_probe_accuracy: float
    bag_of_tokens_accuracy: float | None  # None: no bag of tokens, see bag_of_tokens_skipped
    bag_of_tokens_skipped: str | None
    few_label: dict[str, Any]  # report.json's few_label: the probes with 5, 10, 25, 50 labels per class

    def lines(self) -> list[str]:
        bag = (
            f"skipped ({self.bag_of_tokens_skipped})"
            if self.bag_of_tokens_accuracy is None
            else f"{self.bag_of_tokens_accuracy:.3f}"
        )
        return [
            f"test accuracy {self.accuracy:.3f} (macro-F1 {self.macro_f1:.3f}) on {self.test_items} items; majority "
            f"class {self.majority_accuracy:.3f}, linear probe {self.linear_probe_accuracy:.3f}, bag-of-tokens "
            f"probe {bag}",
            few_label_line(self.few_label),
        ]


@dataclass(frozen=True)
class PredictResult(StageResult):
    """``quackae classify --predict``: how many items of ``store`` got a predicted class, per class."""

    out: str
    store: str
    items: int
    predicted: dict[str, int]  # items per predicted class, the most first

    def lines(self) -> list[str]:
        counts = ", ".join(f"{c} {n}" for c, n in self.predicted.items())
        return [f"predicted {self.items} items of {self.store} into {Path(self.out) / 'predictions.parquet'}: {counts}"]


def few_label_line(few_label: dict[str, Any]) -> str:
    """``few labels (5/10/25/50 per class, mean of 3 draws): encodings 0.31/..., bag of tokens 0.33/...``."""

    def curve(figures: dict[str, Any] | None) -> str:
        return "n/a" if figures is None else "/".join(f"{figures[str(n)]['mean']:.2f}" for n in FEW_LABELS)

    return (
        f"few labels ({'/'.join(map(str, FEW_LABELS))} per class, mean of {few_label['draws']} draws): "
        f"encodings {curve(few_label['encodings'])}, bag of tokens {curve(few_label['bag_of_tokens'])}"
    )
