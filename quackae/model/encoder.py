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
    """``prepare.json`` of the data a run was trained on, when it can still be found; else ``{}``: how the
    ``--max-length`` of a run whose checkpoints predate the record of it is found.

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


class QuackEncoder:
    """A ``QuackAutoEncoder`` and its tokenizer, encoding and reconstructing texts in memory.

    ``encode(texts) -> (N, H)`` float32, ``reconstruct(texts) -> list[str]``. Build it with
    ``from_run``; ``max_length`` is the token limit texts are truncated to (``[EOS]`` included),
    the one the run's data was prepared with.
    """

    def __init__(self, model: Any, tokenizer: Any, max_length: int, device: str | torch.device | None = None) -> None:
        from quackae.data.tokenizer import special_ids

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

        ``max_length`` defaults to the ``--max-length`` of the data the run was trained on, which the checkpoint
        records (a run trained before it did: found through its ``config.yaml`` and the data's ``prepare.json``);
        when that cannot be found, to ``quackae prepare``'s default, with a warning. ``device`` defaults to CUDA
        when available, else the CPU. Raises ``QuackError`` naming what is missing.
        """
        from quackae.data.tokenizer import load_tokenizer, tokenizer_hash
        from quackae.model.checkpoints import load_model_and_record, resolve_run

        checkpoint, tokenizer_file = resolve_run(run)
        device = torch.device(device) if device is not None else _default_device()
        tokenizer = load_tokenizer(tokenizer_file)
        model, record = load_model_and_record(
            checkpoint, map_location=device, tokenizer_sha256=tokenizer_hash(tokenizer)
        )
        if max_length is None:
            max_length = _trained_max_length(run, record, tokenizer_file.parent)
        return cls(model, tokenizer, int(max_length), device)

    # ------------------------------------------------------------------ tokens
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text exactly as ``quackae prepare`` stores them (truncated, ``[EOS]`` last)."""
        from quackae.data.tokenizer import tokenize_batch

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
        from quackae.data.padding import length_sorted_batches

        batches = length_sorted_batches(rows, batch_size, self.pad_id)
        if show_progress_bar:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc=desc, unit="batch", total=-(-len(rows) // batch_size))
        for positions, x in batches:
            yield positions, x.to(self.device)  # (B, T)

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
        """Greedy reconstruction of each text from its own encoding, in input order (noise, with a warning, from a
        model whose decoder was not trained: ``--reconstruction-weight 0``)."""
        from quackae.data.tokenizer import decode
        from quackae.model.config import UNTRAINED_DECODER, decoder_trained

        if not decoder_trained(self.model.hparams):
            log.warning("reconstruct: %s", UNTRAINED_DECODER)
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


def _trained_max_length(run: Any, record: dict[str, Any] | None, folder: Path) -> int:
    """The ``--max-length`` the run's data was prepared with: the checkpoint's record of it, else (a run trained
    before the record kept it) its ``prepare.json``, else ``quackae prepare``'s default with a warning."""
    from quackae.data.tokenizer import DEFAULT_MAX_LENGTH

    where = f"the checkpoint of {run}"
    value = (record or {}).get("max_length")
    if value is None:
        where = f"the prepare.json of {run}"
        value = (_prepare_info(folder).get("config") or {}).get("max_length")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
        raise QuackError(f"{where} has max_length {value!r}, not a whole number of at least 2; pass max_length")
    if value is None:
        log.warning(
            "cannot find the --max-length of the data %s was trained on; truncating texts to %d tokens "
            "(pass max_length= the run's quackae prepare --max-length)",
            run,
            DEFAULT_MAX_LENGTH,
        )
        return DEFAULT_MAX_LENGTH
    return value


def _check_texts(texts: Sequence[str]) -> list[str]:
    from quackae.data.readers import _encodable

    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{index}] is {type(text).__name__}, not a string")
        if not text.isascii() and not _encodable(text):  # the tokenizer takes only what UTF-8 can hold
            raise ValueError(f"texts[{index}] is not valid text (lone surrogate)")
    return texts


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
