"""``quackae plot RUN``: draw ``RUN/curves.png`` (training and validation loss and token accuracy against step)."""

from __future__ import annotations

from quackae.stages.configs import PlotConfig
from quackae.viz.curves import write_curves


def plot(config: PlotConfig) -> dict[str, str]:
    """Run ``quackae plot RUN``."""
    return {"out": str(write_curves(config.run, config.out))}
