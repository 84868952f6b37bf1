from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    """The tests hide the library warnings the command line hides: the one list in ``quackae.cli.quiet``."""
    from quackae.cli.quiet import LIBRARY_WARNINGS

    for pattern, category in LIBRARY_WARNINGS:
        config.addinivalue_line("filterwarnings", f"ignore:{pattern}:{category.__name__}")


# what encode writes into a store's manifest before its first item: stores made by hand in tests carry it too (a
# store without it is not one that classify or export reads)
STORE_HEADER = {"checkpoint_sha256": "0" * 64, "tokenizer_sha256": "1" * 64, "dataset_fingerprint": "f", "text": False}


def write_hand_made_store(path, matrix, metas):
    """A complete shards store of ``matrix`` (N, H) and per-item metadata dicts, written through the writer."""
    from quackae.store.writer import AutoencoderWriter

    header = {**STORE_HEADER, "layout": "shards", "encoding_size": int(matrix.shape[1]), "selection": {}}
    writer = AutoencoderWriter(storage_path=path, manifest=header)
    writer.write_batch(metas, matrix)
    writer.flush()
    writer.write_manifest()
    return path


# the reconstruction autoencoder (train's objective before the bag-of-words default): tests of reconstruction
RECONSTRUCTION = {"reconstruction_weight": 1.0, "bow_weight": 0.0}


WORDS = "duck goose swan heron crane apple pear plum hammer saw drill".split()


@pytest.fixture(scope="session")
def words_prepared(tmp_path_factory) -> Path:
    """A prepared folder of 60 short texts over 11 words (2-5 words each, vocabulary 300): what the small
    training tests train on. Tests read it and never write into it."""
    from quackae.stages.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("words")
    with (root / "c.jsonl").open("w") as handle:
        for i in range(60):
            words = [WORDS[(i * 5 + k * 3) % len(WORDS)] for k in range(2 + i % 4)]
            handle.write(json.dumps({"id": i, "text": " ".join(words)}) + "\n")
    prepare(PrepareConfig(inputs=(str(root / "c.jsonl"),), out=str(root / "p"), vocab_size=300, min_frequency=1))
    return root / "p"


def train_tiny(data: Path, out: Path, **flags):
    """``quackae train`` of a tiny model (8-d embeddings and states, batches of 8) on one CPU, logging every step;
    ``flags`` are further ``TrainConfig`` fields and win over these."""
    from quackae.stages.train import TrainConfig, train

    values = {"embed_size": 8, "hidden_size": 8, "batch_size": 8, "learning_rate": 1e-2, "accelerator": "cpu"}
    values.update(devices="1", log_every_n_steps=1)
    return train(TrainConfig(data=str(data), out=str(out), **{**values, **flags}))


def random_padded(count: int, vocab: int, min_len: int, max_len: int, seed: int = 0) -> torch.Tensor:
    """(count, max_len) right-padded random ids in [1, vocab) with lengths uniform in [min_len, max_len]."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (count,), generator=generator)
    lengths[0] = max_len
    ids = torch.randint(1, vocab, (count, max_len), generator=generator)
    ids[torch.arange(max_len).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    return ids


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
