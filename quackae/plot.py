"""``quackae plot RUN``: draw ``RUN/curves.png`` (training and validation loss and token accuracy against step)."""

from __future__ import annotations

from dataclasses import dataclass, field

from quackae.curves import write_curves


@dataclass(frozen=True)
class PlotConfig:
    run: str = field(metadata={"positional": True, "path": True, "help": "RUN directory (quackae train --out)"})
    out: str | None = field(default=None, metadata={"path": True, "help": "PNG to write (default: RUN/curves.png)"})


def plot(config: PlotConfig) -> dict[str, str]:
    """Run ``quackae plot RUN``."""
    return {"out": str(write_curves(config.run, config.out))}
