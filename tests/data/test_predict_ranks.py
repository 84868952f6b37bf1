"""Prediction over DDP ranks when the items make fewer batches than there are ranks (a small job, or a rerun with
a few items left): each item goes to exactly one rank, every rank with an item to take gets a batch, and a rank
left without items still runs its predict loop (Lightning skips a loop of length 0 and its end hooks with it)."""

from __future__ import annotations

import numpy as np
import pytest
from torch.utils.data import DataLoader

from quackae.data.predict import PredictLoader
from quackae.data.sampler import BucketBatchSampler


@pytest.mark.parametrize("items", [1, 2, 3, 5, 40, 129, 300])
@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_few_predict_items_reach_every_rank_once(items, ranks):
    lengths = np.arange(items) % 7 + 1
    mine = [BucketBatchSampler(range(items), lengths, 128, shuffle=False, num_replicas=ranks, rank=r, even=False)
            for r in range(ranks)]  # fmt: skip
    batches = [sampler.mine() for sampler in mine]
    assert [len(b) for b in batches] == [len(sampler) for sampler in mine]
    seen = np.concatenate([np.concatenate(b) for b in batches if b])
    assert sorted(seen.tolist()) == list(range(items))  # each item once
    if items <= 128 * (ranks - 1):  # fewer batches than ranks: near-equal parts, one per rank while items last
        assert [sum(map(len, b)) for b in batches] == [len(p) for p in np.array_split(range(items), ranks)]


def test_a_rank_without_items_still_runs_its_predict_loop():
    lengths = np.ones(1, dtype=np.int64)
    sampler = BucketBatchSampler([0], lengths, 128, shuffle=False, num_replicas=2, rank=1, even=False)
    loader = PredictLoader(DataLoader(range(1), batch_sampler=sampler))
    assert len(sampler) == 0 and len(loader) == 1 and list(loader) == []
    alone = BucketBatchSampler([], lengths, 128, shuffle=False, num_replicas=2, rank=1, even=False)
    assert len(PredictLoader(DataLoader(range(1), batch_sampler=alone))) == 0  # nothing to predict on any rank
