from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
