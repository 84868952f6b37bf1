"""``QuackEncoder``: a trained run as an in-memory text encoder, ``QuackEncoder.from_run(RUN).encode(texts)``.

Texts are tokenized by the very function ``quackae prepare`` uses (same truncation to the run's
``--max-length``, same ``[EOS]``), so ``encode`` gives the numbers ``quackae encode`` stores for the
same texts. Batches are sorted by length and results come back in input order.

Shape glossary: N texts, B batch size, T tokens, S decoder steps, H encoding size.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quackae.core.errors import QuackError

log = logging.getLogger(__name__)


def _prepare_info(run: Path) -> dict[str, Any]:
    """``prepare.json`` of the data a run was trained on, when it can still be found; else ``{}``.

    Found through the run's ``config.yaml`` (its ``data`` path); a damaged ``config.yaml`` or
    ``prepare.json`` is a ``QuackError`` naming it.
    """
    from quackae.core.files import read_json
    from quackae.core.safeyaml import read_yaml

    candidates = [run / "prepare.json"]
    config_file = run / "config.yaml"
    if config_file.exists() or config_file.is_symlink():
        config = read_yaml(config_file, "run config", "it is written by quackae train")
        data = _nested(config, "data", "path") or _nested(config, "train", "data")
        if data:
            candidates += [Path(data) / "prepare.json", run.parent / Path(data).name / "prepare.json"]
    for file in candidates:
        if file.exists() or file.is_symlink():
            info = read_json(file, "prepare summary", "run quackae prepare again or pass max_length")
            config = info.get("config")
            if config is not None and not isinstance(config, dict):
                raise QuackError(f"prepare summary {file} has a config that is not a JSON object; pass max_length")
            return info
    return {}


def _nested(mapping: dict[str, Any], section: str, key: str) -> str | None:
    """``mapping[section][key]`` when both levels are there and the value is a string."""
    part = mapping.get(section)
    value = part.get(key) if isinstance(part, dict) else None
    return value if isinstance(value, str) else None


def default_max_length() -> int:
    """``quackae prepare``'s default ``--max-length``."""
    from dataclasses import fields

    from quackae.prepare import PrepareConfig

    return next(f.default for f in fields(PrepareConfig) if f.name == "max_length")


class QuackEncoder:
    """A ``QuackAutoEncoder`` and its tokenizer, encoding and reconstructing texts in memory.

    ``encode(texts) -> (N, H)`` float32, ``reconstruct(texts) -> list[str]``. Build it with
    ``from_run``; ``max_length`` is the token limit texts are truncated to (``[EOS]`` included),
    the one the run's data was prepared with.
    """

    def __init__(self, model: Any, tokenizer: Any, max_length: int, device: str | torch.device | None = None) -> None:
        from quackae.tokenizer import special_ids

        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (one token and [EOS]), got {max_length}")
        eos = special_ids(tokenizer).eos
        if eos is None:
            raise QuackError("the tokenizer has no [EOS] token; use the tokenizer.json quackae train wrote")
        if tokenizer.get_vocab_size() > model.num_embeddings:
            raise QuackError(
                f"the tokenizer has {tokenizer.get_vocab_size()} tokens, the model knows {model.num_embeddings}; "
                "they come from different runs"
            )
        self.device = torch.device(device) if device is not None else _default_device()
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.eos_id = eos
        self.pad_id = model.pad_id

    @classmethod
    def from_run(
        cls, run: str | Path, device: str | torch.device | None = None, max_length: int | None = None
    ) -> QuackEncoder:
        """Load a RUN folder (its best checkpoint, else the last) or a ``.ckpt`` with ``tokenizer.json`` beside it.

        ``max_length`` defaults to the ``--max-length`` of the data the run was trained on (read from
        its ``prepare.json``); when that cannot be found, to ``quackae prepare``'s default, with a warning.
        ``device`` defaults to CUDA when available, else the CPU. Raises ``QuackError`` naming what is missing.
        """
        from quackae.checkpoints import load_model
        from quackae.runtime import resolve_run
        from quackae.tokenizer import load_tokenizer, tokenizer_hash

        checkpoint, tokenizer_file = resolve_run(run)
        if max_length is None:
            info = _prepare_info(tokenizer_file.parent)
            max_length = (info.get("config") or {}).get("max_length")
            if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)):
                raise QuackError(f"the prepare.json of {run} has max_length {max_length!r}, not a whole number")
            if max_length is None:
                max_length = default_max_length()
                log.warning(
                    "cannot find the prepare.json of the data %s was trained on; truncating texts to %d tokens "
                    "(pass max_length= the run's quackae prepare --max-length)",
                    run,
                    max_length,
                )
        device = torch.device(device) if device is not None else _default_device()
        tokenizer = load_tokenizer(tokenizer_file)
        try:
            model = load_model(str(checkpoint), map_location=device, tokenizer_sha256=tokenizer_hash(tokenizer))
        except ValueError as error:
            raise QuackError(str(error)) from None
        return cls(model, tokenizer, int(max_length), device)

    # ------------------------------------------------------------------ tokens
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text exactly as ``quackae prepare`` stores them (truncated, ``[EOS]`` last)."""
        from quackae.tokenizer import tokenize_batch

        texts = _check_texts(texts)
        if not texts:
            return []
        rows = tokenize_batch({"text": texts}, self.tokenizer, "text", self.max_length - 1, self.eos_id)["input_ids"]
        high = max(max(row) for row in rows)
        if high >= self.model.num_embeddings:
            raise QuackError(f"token id {high} is outside the model's vocabulary; the tokenizer is from another run")
        return rows

    def _batches(
        self, rows: list[list[int]], batch_size: int, show_progress_bar: bool, desc: str
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """``(positions in rows, x (B, T) on the device)`` for length-sorted batches of ``rows``."""
        from quackae.data import pad_batch

        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        order = np.argsort([-len(row) for row in rows], kind="stable")  # longest first: memory peaks at once
        starts = range(0, len(order), batch_size)
        if show_progress_bar:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=desc, unit="batch")
        for start in starts:
            positions = order[start : start + batch_size]
            x = pad_batch([rows[i] for i in positions], self.pad_id).to(self.device)  # (B, T)
            yield positions, x

    # ------------------------------------------------------------------ public API
    def encode(self, texts: str | Sequence[str], batch_size: int = 64, show_progress_bar: bool = False) -> np.ndarray:
        """Encodings of ``texts``: float32 (N, H), row i for ``texts[i]``; a single string gives (H,)."""
        single = isinstance(texts, str)
        rows = self.tokenize([texts] if single else texts)
        out = np.empty((len(rows), self.model.encoding_size), dtype=np.float32)  # (N, H)
        with torch.inference_mode():
            for positions, x in self._batches(rows, batch_size, show_progress_bar, "encoding"):
                encoding, _ = self.model(x)  # (B, H)
                out[positions] = encoding.float().cpu().numpy()
        return out[0] if single else out

    def reconstruct(self, texts: str | Sequence[str], batch_size: int = 64) -> list[str]:
        """Greedy reconstruction of each text from its own encoding, in input order."""
        from quackae.tokenizer import decode

        rows = self.tokenize([texts] if isinstance(texts, str) else texts)
        out: list[str] = [""] * len(rows)
        with torch.inference_mode():
            for positions, x in self._batches(rows, batch_size, False, "reconstructing"):
                tokens = self.model.reconstruct(x, max_length=x.size(1) + 8)  # (B, S)
                for position, row in zip(positions, tokens.tolist(), strict=True):
                    # each item decodes at most its own length + 8 steps, whatever its batch mates' lengths
                    out[position] = decode(self.tokenizer, row[: len(rows[position]) + 8])
        return out

    def __repr__(self) -> str:
        return (
            f"QuackEncoder(encoding_size={self.model.encoding_size}, vocab={self.model.num_embeddings}, "
            f"max_length={self.max_length}, device={self.device})"
        )


def _check_texts(texts: Sequence[str]) -> list[str]:
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{index}] is {type(text).__name__}, not a string")
    return texts


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
