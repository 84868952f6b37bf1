from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quackae.core.errors import QuackError
from quackae.data.tokenizer import (
    PAD,
    BatchDecoder,
    decode,
    load_tokenizer,
    special_ids,
    tokenizer_hash,
    train_tokenizer,
)

SENTENCES = ["the quick brown fox", "jumps over the lazy dog", "a stitch in time saves nine", "naïve café — ok"] * 5


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(SENTENCES, vocab_size=300, min_frequency=1, show_progress=False)


def test_special_tokens_have_fixed_ids(tokenizer):
    ids = special_ids(tokenizer)
    assert (ids.pad, ids.unk, ids.bos, ids.eos) == (0, 1, 2, 3)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_any_unicode(tokenizer, text):
    assert decode(tokenizer, tokenizer.encode(text, add_special_tokens=False).ids) == text


@pytest.mark.parametrize("text", ["[PAD] and [EOS] are just text", "emoji 🦆🦆 and\ttabs\nnewlines", "  spaces  "])
def test_round_trip_examples(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert 0 not in ids
    assert decode(tokenizer, ids) == text


def test_training_is_deterministic():
    a = train_tokenizer(SENTENCES, vocab_size=300, min_frequency=1, show_progress=False)
    b = train_tokenizer(SENTENCES, vocab_size=300, min_frequency=1, show_progress=False)
    assert tokenizer_hash(a) == tokenizer_hash(b)


def test_load_round_trip_and_errors(tmp_path, tokenizer):
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    assert tokenizer_hash(loaded) == tokenizer_hash(tokenizer)
    with pytest.raises(QuackError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(QuackError, match="not a tokenizers JSON file"):
        load_tokenizer(tmp_path / "junk.json")
    no_pad = tokenizer.to_str().replace(f'"{PAD}"', '"[NOTPAD]"')
    (tmp_path / "nopad.json").write_text(no_pad)
    with pytest.raises(QuackError, match=r"no \[PAD\] token"):
        load_tokenizer(tmp_path / "nopad.json")


def _decoder_cases(tokenizer, seed):
    """Padded rows of random ids: special ids inside rows, ids past the vocabulary, bytes that are not UTF-8
    on their own (a character cut in two), and rows of real text."""
    rng = np.random.default_rng(seed)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    for _ in range(60):
        rows, width = int(rng.integers(1, 12)), int(rng.integers(1, 30))
        tokens = rng.integers(0, size + 3, (rows, width))
        tokens[rng.random((rows, width)) < 0.2] = 0  # padding, also mid-row
        yield tokens
    encoded = [tokenizer.encode(t, add_special_tokens=False).ids + [3] for t in SENTENCES + ["日本語 🦆 ok"]]
    width = max(map(len, encoded))
    yield np.array([row + [0] * (width - len(row)) for row in encoded])


def test_batch_decoder_matches_the_tokenizer(tokenizer):
    from tokenizers import AddedToken

    extended = train_tokenizer(SENTENCES, vocab_size=300, min_frequency=1, show_progress=False)
    extended.add_tokens(["tok1", "é", "日本", " spaced "])  # added tokens, in and out of the byte alphabet
    extended.add_special_tokens([AddedToken("<sep>", special=True)])
    for tok in (tokenizer, extended):
        decoder = BatchDecoder(tok)
        assert decoder.fast
        for tokens in _decoder_cases(tok, 0):
            texts = decoder(tokens)
            assert texts.type == "string"
            assert texts.to_pylist() == tok.decode_batch(tokens.tolist(), skip_special_tokens=True)


def test_batch_decoder_takes_empty_batches(tokenizer):
    for shape in ((0, 5), (3, 0), (0, 0)):
        assert BatchDecoder(tokenizer)(np.zeros(shape, dtype=np.int64)).to_pylist() == [""] * shape[0]


def test_batch_decoder_falls_back_for_other_decoders(tokenizer):
    from tokenizers import decoders

    other = train_tokenizer(SENTENCES, vocab_size=300, min_frequency=1, show_progress=False)
    other.decoder = decoders.Metaspace()
    decoder = BatchDecoder(other)
    assert not decoder.fast
    for tokens in _decoder_cases(other, 1):
        assert decoder(tokens).to_pylist() == other.decode_batch(tokens.tolist(), skip_special_tokens=True)
