"""Byte-level BPE tokenizers: train one on a corpus, or load and check an existing ``tokenizer.json``.

Special tokens are ``[PAD]`` (id 0), ``[UNK]``, ``[BOS]`` and ``[EOS]``. Their spellings inside a
text are encoded as ordinary text (``encode_special_tokens``), so ``decode(encode(text)) == text``
holds for any Unicode string: no normalizer, byte-level pre-tokenization and decoding.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from quackae.errors import QuackError

log = logging.getLogger(__name__)

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + 1  # every byte, the special tokens and at least one merge


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    unk: int | None
    bos: int | None
    eos: int | None


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 8000,
    min_frequency: int = 2,
    length: int | None = None,
    show_progress: bool = True,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts``; ``[PAD]`` gets id 0. Deterministic for the same texts."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"--vocab-size must be at least {MIN_VOCAB}, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    tokenizer.encode_special_tokens = True
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load ``tokenizer.json`` and check it has a pad token; raises ``QuackError`` naming the file."""
    file = Path(path)
    if file.is_dir():
        file = file / "tokenizer.json"
    if not file.is_file():
        raise QuackError(f"tokenizer file {file} does not exist")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as error:  # noqa: BLE001 - the tokenizers library raises a bare Exception
        raise QuackError(f"{file} is not a tokenizers JSON file: {str(error).splitlines()[0]}") from None
    if tokenizer.token_to_id(PAD) is None:
        raise QuackError(f"tokenizer {file} has no {PAD} token; train one with quackae prepare (no --tokenizer)")
    tokenizer.encode_special_tokens = True
    return tokenizer


def special_ids(tokenizer: Tokenizer) -> SpecialIds:
    pad = tokenizer.token_to_id(PAD)
    if pad is None:
        raise QuackError(f"tokenizer has no {PAD} token")
    return SpecialIds(pad, tokenizer.token_to_id(UNK), tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS))


def decode(tokenizer: Tokenizer, ids: Iterable[int]) -> str:
    """Text of ``ids`` with special tokens (pad, EOS, ...) left out."""
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """SHA-256 of the tokenizer's canonical JSON: equal hashes mean equal tokenizers."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


def tokenize_batch(
    batch: dict[str, list[Any]], tokenizer: Any, text_field: str, limit: int, eos: int
) -> dict[str, list[Any]]:
    """Token ids of ``batch[text_field]`` as every stage stores them: at most ``limit`` tokens, then ``eos``.

    Returns ``input_ids``, ``length`` (with ``eos``) and ``_truncated`` (whether a text was cut) lists;
    ``datasets.map`` takes it as is.
    """
    encodings = tokenizer.encode_batch_fast(batch[text_field], add_special_tokens=False)
    input_ids, lengths, truncated = [], [], []
    for encoding in encodings:
        ids = encoding.ids
        cut = len(ids) > limit
        ids = ids[:limit] if cut else ids
        ids.append(eos)
        input_ids.append(ids)
        lengths.append(len(ids))
        truncated.append(cut)
    return {"input_ids": input_ids, "length": lengths, "_truncated": truncated}
