"""``quackae reconstruct``: texts beside the greedy reconstruction a trained model gives them.

Tokenizing, truncation and decoding are ``QuackEncoder``'s, so a text is rebuilt from exactly the
tokens ``quackae prepare`` would store for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from quackae.core.results import StageResult
from quackae.stages.configs import ReconstructConfig


@dataclass(frozen=True)
class ReconstructResult(StageResult):
    """Each text beside its greedy reconstruction by ``model``."""

    model: str
    pairs: tuple[tuple[str, str], ...]  # (text, reconstruction)

    def lines(self) -> list[str]:
        return [f"text:          {text}\nreconstructed: {again}\n" for text, again in self.pairs]


def reconstruct(config: ReconstructConfig) -> ReconstructResult:
    """Run ``quackae reconstruct``: ``pairs`` of (text, reconstruction) and the ``lines`` the command prints."""
    from quackae.model.encoder import QuackEncoder

    encoder = QuackEncoder.from_run(config.model, device="cpu", max_length=config.max_length)
    rebuilt = encoder.reconstruct(list(config.texts))
    return ReconstructResult(model=str(config.model), pairs=tuple(zip(config.texts, rebuilt, strict=True)))
