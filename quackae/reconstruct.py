"""``quackae reconstruct``: texts beside the greedy reconstruction a trained model gives them.

Tokenizing, truncation and decoding are ``QuackEncoder``'s, so a text is rebuilt from exactly the
tokens ``quackae prepare`` would store for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ReconstructConfig:
    texts: tuple[str, ...] = field(metadata={"positional": True, "help": "texts to encode and rebuild"})
    model: str = field(default="storage/run", metadata={"path": True, "help": "RUN directory or .ckpt file"})
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "tokens per text, [EOS] included (default: the --max-length the run's data was prepared with)"
        },
    )

    def __post_init__(self) -> None:
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"--max-length must be at least 2, got {self.max_length}")


def reconstruct(config: ReconstructConfig) -> dict[str, Any]:
    """Run ``quackae reconstruct``: ``pairs`` of (text, reconstruction) and the ``lines`` the command prints."""
    from quackae.model.encoder import QuackEncoder

    encoder = QuackEncoder.from_run(config.model, device="cpu", max_length=config.max_length)
    rebuilt = encoder.reconstruct(list(config.texts))
    pairs = list(zip(config.texts, rebuilt, strict=True))
    lines = [f"text:          {text}\nreconstructed: {again}\n" for text, again in pairs]
    return {"model": config.model, "pairs": pairs, "lines": lines}
