"""Which items a training epoch sees together: the id-hash split and length-bucketed batches.

The train/val/test split depends only on each item's id and the seed (``quackae.core.ids``), so it is the
same on every run and machine and does not move when rows are added. ``BucketBatchSampler`` groups items
of similar length into batches and shuffles the batch order every epoch; under DDP each rank takes its own
batches, evenly for training, each item once for prediction.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from quackae.core.ids import id_hashes


def split_of(ids: Sequence[int], seed: int, val_fraction: float, test_fraction: float) -> np.ndarray:
    """0 (train), 1 (val) or 2 (test) per id, from a hash of (seed, id): stable across runs and machines."""
    position = id_hashes(ids, str(seed))  # uniform in [0, 1)
    split = np.zeros(len(ids), dtype=np.int8)
    split[position < test_fraction + val_fraction] = 1
    split[position < test_fraction] = 2
    return split


def padding_fraction(lengths: np.ndarray, batches: Sequence[Sequence[int]]) -> float:
    """Share of the padded (B, T) cells that are padding, over ``batches`` of indices into ``lengths``."""
    cells = sum(len(b) * int(lengths[list(b)].max()) for b in batches if len(b))
    return 1.0 - float(sum(int(lengths[list(b)].sum()) for b in batches)) / max(cells, 1)


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of ``indices`` grouped by length (``bucket``) or at random, reshuffled each epoch.

    Items are shuffled, cut into pools of ``pool_batches`` batches, sorted by length inside each
    pool and cut into batches; the batch order is then shuffled. With ``num_replicas`` > 1 rank
    ``rank`` takes every ``num_replicas``-th batch; ``even`` repeats batches so every rank gets
    the same count (training needs it, prediction must not have it). Without ``even``, items that
    make fewer batches than ranks are cut into ``min(items, num_replicas)`` near-equal batches
    instead, so that every rank with an item to take gets one (40 items at the CPU's 128 a batch
    would otherwise be one batch, all rank 0's, and rank 1's loader would be empty).
    """

    def __init__(
        self,
        indices: Sequence[int],
        lengths: np.ndarray,
        batch_size: int,
        *,
        bucket: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        even: bool = True,
        pool_batches: int = 100,
    ) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        self.lengths = lengths
        self.batch_size = batch_size
        self.bucket = bucket
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.even = even
        self.pool_batches = pool_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[np.ndarray]:
        """Every batch of this epoch, across all ranks."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.indices) if self.shuffle else self.indices.copy()
        if self.bucket:
            pool = self.batch_size * self.pool_batches
            pools = [order[i : i + pool] for i in range(0, len(order), pool)]
            order = np.concatenate([p[np.argsort(self.lengths[p], kind="stable")] for p in pools]) if pools else order
        if self._shared():
            batches = np.array_split(order, min(len(order), self.num_replicas))
        else:
            batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def mine(self) -> list[np.ndarray]:
        """This rank's batches of this epoch, as index arrays."""
        batches = self.batches()
        if self.num_replicas > 1 and self.even and batches:
            total = math.ceil(len(batches) / self.num_replicas) * self.num_replicas
            batches = batches + batches[: total - len(batches)]
        return batches[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.mine():
            yield batch.tolist()

    def _shared(self) -> bool:
        """Whether the items make fewer batches than there are ranks to share them (prediction only): then each
        rank gets a part of them, and ``min(items, num_replicas)`` ranks one batch each."""
        return not self.even and 0 < math.ceil(len(self.indices) / self.batch_size) < self.num_replicas

    def __len__(self) -> int:
        count = math.ceil(len(self.indices) / self.batch_size)
        if self._shared():
            count = min(len(self.indices), self.num_replicas)
        if self.num_replicas == 1:
            return count
        if self.even:
            return math.ceil(count / self.num_replicas)
        return len(range(self.rank, count, self.num_replicas))
