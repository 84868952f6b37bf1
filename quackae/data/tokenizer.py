"""Byte-level BPE tokenizers: train one on a corpus, or load and check an existing ``tokenizer.json``.

Special tokens are ``[PAD]`` (id 0), ``[UNK]``, ``[BOS]`` and ``[EOS]``. Their spellings inside a
text are encoded as ordinary text (``encode_special_tokens``), so ``decode(encode(text)) == text``
holds for any Unicode string: no normalizer, byte-level pre-tokenization and decoding.

Work per text is bounded whatever the input: tokenizer training sees at most ``max_chars`` characters of a
text and at most ``MAX_RUN`` characters of any run of non-space (or space) characters, and tokenizing sees
at most ``text_limit`` characters, enough for every token kept (``tokenize_batch``). Unbounded, a single
1M-character word took BPE training over 300 s, and a 48 MB line was tokenized whole before truncation.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from quackae.core.errors import QuackError
from quackae.core.files import read_text

log = logging.getLogger(__name__)

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
DEFAULT_MAX_LENGTH = 128  # tokens per item, [EOS] included, unless quackae prepare is told otherwise
MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + 1  # every byte, the special tokens and at least one merge
MAX_RUN = 100  # tokenizer training: longer runs of non-space (or of space) characters count with their first 100
TRAIN_CHARS_PER_TOKEN = 32  # tokenizer training: texts are cut to this many characters per token kept
_LONG_RUN = re.compile(rf"(\S{{{MAX_RUN}}})\S+|(\s{{{MAX_RUN}}})\s+")


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    unk: int | None
    bos: int | None
    eos: int | None


def bounded_texts(texts: Iterable[str], max_chars: int | None, cut: Counter[str] | None = None) -> Iterator[str]:
    """``texts`` as tokenizer training sees them: each cut to ``max_chars`` characters, and every run of more than
    ``MAX_RUN`` non-space (or space) characters cut to its first ``MAX_RUN`` (BPE training works per word, in
    time that grows faster than the word's length). ``cut`` counts ``texts`` and ``runs`` cut."""
    for text in texts:
        if max_chars is not None and len(text) > max_chars:
            text = text[:max_chars]
            if cut is not None:
                cut["texts"] += 1
        if len(text) > MAX_RUN and _LONG_RUN.search(text):
            text, runs = _LONG_RUN.subn(lambda m: m.group(1) or m.group(2), text)
            if cut is not None:
                cut["runs"] += runs
        yield text


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 8000,
    min_frequency: int = 2,
    length: int | None = None,
    show_progress: bool = True,
    max_chars: int | None = None,
    cut: Counter[str] | None = None,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts``; ``[PAD]`` gets id 0. Deterministic for the same texts.

    The trainer sees ``bounded_texts(texts, max_chars, cut)``: over-long texts and runs are cut first.
    """
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
    tokenizer.train_from_iterator(bounded_texts(texts, max_chars, cut), trainer=trainer, length=length)
    tokenizer.encode_special_tokens = True
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load ``tokenizer.json`` and check it has a pad token; raises ``QuackError`` naming the file (read through
    ``quackae.core.files``: a FIFO, a link loop, an empty or non-UTF-8 file is refused, never waited on)."""
    file = Path(path)
    if file.is_dir():
        file = file / "tokenizer.json"
    text = read_text(file, "tokenizer file")
    try:
        tokenizer = Tokenizer.from_str(text)
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


_LONGEST: dict[int, tuple[Tokenizer, int]] = {}  # id -> (the tokenizer, kept alive so the id stays its, chars)


def longest_token(tokenizer: Tokenizer) -> int:
    """The most characters of text one token of ``tokenizer`` can stand for (its longest vocabulary entry)."""
    cached = _LONGEST.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    longest = max(map(len, tokenizer.get_vocab(with_added_tokens=True)), default=1)
    if tokenizer.normalizer is not None:  # a normalizer may drop characters: a token can stand for more
        longest *= 4
    if len(_LONGEST) > 16:
        _LONGEST.clear()
    _LONGEST[id(tokenizer)] = (tokenizer, longest)
    return longest


def text_limit(tokenizer: Tokenizer, limit: int) -> int:
    """Characters of a text that tokenizing reads when ``limit`` tokens are kept: twice what ``limit`` tokens of
    ``tokenizer`` can cover. A longer text is cut there first (it is truncated either way); its kept tokens are
    those of the whole text unless one word of over ``limit`` tokens' length crosses the cut."""
    return 2 * (limit + 1) * longest_token(tokenizer)


def tokenize_batch(
    batch: dict[str, list[Any]], tokenizer: Any, text_field: str, limit: int, eos: int
) -> dict[str, list[Any]]:
    """Token ids of ``batch[text_field]`` as every stage stores them: at most ``limit`` tokens, then ``eos``.

    Texts longer than ``text_limit(tokenizer, limit)`` characters are cut there before the tokenizer sees them.
    Returns ``input_ids``, ``length`` (with ``eos``) and ``truncated`` (whether tokens were cut) lists;
    ``datasets.map`` takes it as is.
    """
    most = text_limit(tokenizer, limit)
    texts = [text if len(text) <= most else text[:most] for text in batch[text_field]]
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    input_ids, lengths, truncated = [], [], []
    for encoding in encodings:
        ids = encoding.ids
        cut = len(ids) > limit
        ids = ids[:limit] if cut else ids
        ids.append(eos)
        input_ids.append(ids)
        lengths.append(len(ids))
        truncated.append(cut)
    return {"input_ids": input_ids, "length": lengths, "truncated": truncated}


def _byte_level_chars() -> dict[str, int]:
    """The byte-level alphabet: the printable character that stands for each byte (GPT-2's table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {chr(b): b for b in printable}
    shifted = 0
    for byte in range(256):
        if byte not in printable:
            chars[chr(256 + shifted)] = byte
            shifted += 1
    return chars


_BYTE_CHARS = _byte_level_chars()
_ALPHABET = frozenset(_BYTE_CHARS)
_TO_BYTES = {ord(c): b for c, b in _BYTE_CHARS.items()}  # str.translate, then latin-1: a token's bytes


class BatchDecoder:
    """Padded token rows -> their texts as one ``pyarrow`` string array, what ``tokenizer.decode_batch(rows,
    skip_special_tokens=True)`` returns, without per-token Python.

    For a byte-level decoder (every tokenizer ``quackae prepare`` trains) each token id stands for a fixed
    run of bytes: a row's text is its tokens' bytes, concatenated and read as UTF-8. The bytes of every id
    are tabled once; a batch is then gathered with one numpy index. A row whose tokens are each whole
    characters is valid UTF-8 as it stands; a row with a token that is part of a character (a rare
    character, or a text cut inside one) is read in Python, where an invalid sequence becomes U+FFFD as
    the tokenizer makes it. Any other decoder is called as is.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        import numpy as np

        self.tokenizer = tokenizer
        self.fast = isinstance(tokenizer.decoder, decoders.ByteLevel)
        if not self.fast:
            return
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        special = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
        tokens: list[str | None] = [None] * (max(vocab.values(), default=-1) + 1)
        for token, index in vocab.items():
            tokens[index] = None if index in special else token
        pieces, whole = [], []
        for token in tokens:
            if not token:
                piece = b""
            elif _ALPHABET.issuperset(token):
                piece = token.translate(_TO_BYTES).encode("latin-1")
            else:  # a token outside the alphabet (an added token) stands for its own UTF-8 bytes
                piece = token.encode("utf-8")
            pieces.append(piece)
            whole.append(piece.isascii() or _is_utf8(piece))
        self._lengths = np.array([len(p) for p in pieces], dtype=np.int64)  # (V,) bytes per id
        self._starts = np.concatenate([[0], np.cumsum(self._lengths)[:-1]]).astype(np.int64)  # (V,)
        self._blob = np.frombuffer(b"".join(pieces), dtype=np.uint8)  # every id's bytes, end to end
        self._whole = np.array(whole, dtype=bool)  # (V,) whole characters on its own

    def __call__(self, tokens: Any) -> Any:
        """``tokens``: int array (B, T), padded with a special id -> ``pyarrow.StringArray`` of B texts."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        tokens = np.asarray(tokens, dtype=np.int64)
        if not self.fast:
            return pa.array(self.tokenizer.decode_batch(tokens.tolist(), skip_special_tokens=True), type=pa.string())
        rows = len(tokens)
        if tokens.size == 0:  # no rows, or rows of no tokens
            return pa.array([""] * rows, type=pa.string())
        known = (tokens >= 0) & (tokens < len(self._lengths))  # (B, T): unknown ids decode to nothing
        ids = np.where(known, tokens, 0).ravel()  # (B*T,)
        lengths = np.where(known.ravel(), self._lengths[ids], 0)  # (B*T,) bytes per token
        offsets = np.zeros(rows + 1, dtype=np.int64)
        np.cumsum(lengths.reshape(rows, -1).sum(axis=1), out=offsets[1:])  # (B + 1,) each text's bytes
        total = int(offsets[-1])
        token_starts = np.cumsum(lengths) - lengths  # (B*T,) where each token's bytes go in the output
        source = np.arange(total, dtype=np.int64) + np.repeat(self._starts[ids] - token_starts, lengths)
        data = self._blob[source]  # (total,) uint8: the batch's texts, end to end
        small = total < 2**31
        kind, width = (pa.binary(), np.int32) if small else (pa.large_binary(), np.int64)
        texts = pa.Array.from_buffers(kind, rows, [None, pa.py_buffer(offsets.astype(width)), pa.py_buffer(data)])
        partial = ~(self._whole[ids] | ~known.ravel()).reshape(rows, -1).all(axis=1)  # (B,) rows to read in Python
        if partial.any():
            raw = data.tobytes()
            fixed = [
                raw[offsets[r] : offsets[r + 1]].decode("utf-8", "replace").encode() for r in np.flatnonzero(partial)
            ]
            texts = pc.replace_with_mask(texts, pa.array(partial), pa.array(fixed, type=kind))
        return texts.cast(pa.string() if small else pa.large_string())  # checks the UTF-8


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
