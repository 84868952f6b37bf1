"""``quackae reconstruct``: texts beside the greedy reconstruction a trained model gives them.

Tokenizing, truncation and decoding are ``QuackEncoder``'s, so a text is rebuilt from exactly the
tokens ``quackae prepare`` would store for it.
"""

from __future__ import annotations

from typing import Any

from quackae.stages.configs import ReconstructConfig


def reconstruct(config: ReconstructConfig) -> dict[str, Any]:
    """Run ``quackae reconstruct``: ``pairs`` of (text, reconstruction) and the ``lines`` the command prints."""
    from quackae.model.encoder import QuackEncoder

    encoder = QuackEncoder.from_run(config.model, device="cpu", max_length=config.max_length)
    rebuilt = encoder.reconstruct(list(config.texts))
    pairs = list(zip(config.texts, rebuilt, strict=True))
    lines = [f"text:          {text}\nreconstructed: {again}\n" for text, again in pairs]
    return {"model": config.model, "pairs": pairs, "lines": lines}
