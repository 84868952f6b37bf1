"""QuackEncoder: the same numbers as ``quackae encode``, tokens as ``prepare`` makes them, input order kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from quackae import EncodingStore, QuackEncoder
from quackae.core.errors import QuackError
from quackae.data.padding import pad_batch
from quackae.data.prepared import load_prepared
from quackae.stages.encode import EncodeConfig, encode
from quackae.stages.prepare import PrepareConfig, prepare
from quackae.stages.train import TrainConfig, train

WORDS = "duck goose swan heron apple pear plum hammer saw drill quack feather pond".split()
MAX_LENGTH = 7  # short enough that some texts are truncated


def _texts(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 9)))) for _ in range(count)]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny prepared corpus, a RUN trained a few steps on it and a store of all its items."""
    root = tmp_path_factory.mktemp("encoder")
    corpus = root / "corpus.jsonl"
    with corpus.open("w") as handle:
        for i, text in enumerate(_texts(96)):
            handle.write(json.dumps({"id": 5 * i + 1, "text": text}) + "\n")
    prepare(
        PrepareConfig(
            inputs=str(corpus), out=str(root / "prepared"), vocab_size=290, min_frequency=1, max_length=MAX_LENGTH
        )
    )
    train(
        TrainConfig(
            data=str(root / "prepared"),
            out=str(root / "run"),
            max_epochs=1,
            embed_size=8,
            hidden_size=16,
            batch_size=16,
            accelerator="cpu",
            devices="1",
        )
    )
    encode(
        EncodeConfig(
            data=str(root / "prepared"),
            model=str(root / "run"),
            out=str(root / "store"),
            batch_size=11,
            accelerator="cpu",
            devices="1",
        )
    )
    return root


def _corpus(run: Path) -> dict[int, str]:
    rows = [json.loads(line) for line in (run / "corpus.jsonl").read_text().splitlines()]
    return {row["id"]: row["text"] for row in rows}


def test_encode_equals_what_quackae_encode_stores(run):
    store = EncodingStore(run / "store")
    ids, stored = store.to_numpy()
    texts = _corpus(run)
    encoder = QuackEncoder.from_run(run / "run", device="cpu")
    encodings = encoder.encode([texts[int(i)] for i in ids], batch_size=13)
    assert encodings.dtype == np.float32 and encodings.shape == stored.shape
    np.testing.assert_allclose(encodings, stored, atol=1e-5, rtol=0)
    one, _ = store[int(ids[3])]
    np.testing.assert_allclose(encoder.encode(texts[int(ids[3])]), one, atol=1e-5, rtol=0)


def test_tokens_are_exactly_those_prepare_stores(run):
    dataset, _, _ = load_prepared(run / "prepared")
    texts = _corpus(run)
    ids = dataset["id"]
    encoder = QuackEncoder.from_run(run / "run", device="cpu")
    assert encoder.max_length == MAX_LENGTH  # read from the data's prepare.json
    assert encoder.tokenize([texts[i] for i in ids]) == dataset["input_ids"]
    assert any(len(row) == MAX_LENGTH for row in dataset["input_ids"])  # truncation was exercised


def test_rows_come_back_in_input_order_and_match_one_at_a_time(run):
    encoder = QuackEncoder.from_run(run / "run", device="cpu")
    texts = _texts(23, seed=1) + [""]
    batched = encoder.encode(texts, batch_size=4)
    model = encoder.model
    with torch.no_grad():  # the obvious reference: each text alone, no padding, no sorting
        alone = np.stack([model(pad_batch([row], model.pad_id))[0][0].numpy() for row in encoder.tokenize(texts)])
    np.testing.assert_allclose(batched, alone, atol=1e-5, rtol=0)
    np.testing.assert_allclose(encoder.encode(texts[::-1], batch_size=64), batched[::-1], atol=1e-5, rtol=0)
    assert encoder.encode([]).shape == (0, model.encoding_size)


def test_reconstruct_matches_one_at_a_time(run):
    from quackae.data.tokenizer import decode

    encoder = QuackEncoder.from_run(run / "run", device="cpu")
    texts = _texts(9, seed=2)
    rebuilt = encoder.reconstruct(texts, batch_size=4)
    model = encoder.model
    reference = []
    for row in encoder.tokenize(texts):
        out = model.reconstruct(pad_batch([row], model.pad_id), max_length=len(row) + 8)
        reference.append(decode(encoder.tokenizer, out[0].tolist()))
    assert rebuilt == reference and all(isinstance(t, str) for t in rebuilt)


def test_from_run_takes_a_checkpoint_and_names_what_is_missing(run, tmp_path):
    encoder = QuackEncoder.from_run(run / "run" / "checkpoints" / "last.ckpt", device="cpu")
    assert encoder.encode(["duck pond"]).shape == (1, encoder.model.encoding_size) == (1, 32)  # final+mean: 2H
    with pytest.raises(QuackError, match="does not exist; pass a RUN directory or a .ckpt file"):
        QuackEncoder.from_run(tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"texts\[1\] is int"):
        encoder.encode(["duck", 3])


def test_train_draws_its_curves(run):
    from PIL import Image

    from quackae.viz.curves import WIDTH

    with Image.open(run / "run" / "curves.png") as image:
        assert image.format == "PNG" and image.width == WIDTH


def test_a_text_with_a_lone_surrogate_is_named_as_prepare_names_it(run):
    encoder = QuackEncoder.from_run(run / "run", device="cpu")
    for call in (encoder.encode, encoder.reconstruct, encoder.tokenize):
        with pytest.raises(ValueError, match=r"^texts\[1\] is not valid text \(lone surrogate\)$"):
            call(["duck pond", "bad \ud800 text"])
    assert encoder.tokenize(["caf\u00e9 \U0001f986"])[0]  # other text outside ASCII is fine
