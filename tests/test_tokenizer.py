from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quackae.errors import QuackError
from quackae.tokenizer import PAD, decode, load_tokenizer, special_ids, tokenizer_hash, train_tokenizer

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
