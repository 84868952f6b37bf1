"""``TokenizedDataModule``: a prepared dataset as padded, length-bucketed batches.

The train/val/test split depends only on each item's id and the seed (a hash), so it is the
same on every run and machine and does not move when rows are added. Batches are padded with the
pad id to their longest item. With bucketing, items of similar length share a batch and the
batch order is shuffled every epoch. Under DDP each rank takes its own batches; the predict
loader gives every item to exactly one rank, once.

Shape glossary: B batch size, T longest item in the batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.accelerators import CUDAAccelerator
from torch.utils.data import DataLoader, Dataset, Sampler

from quackae.core.ids import id_hashes

log = logging.getLogger(__name__)


def split_of(ids: Sequence[int], seed: int, val_fraction: float, test_fraction: float) -> np.ndarray:
    """0 (train), 1 (val) or 2 (test) per id, from a hash of (seed, id): stable across runs and machines."""
    position = id_hashes(ids, str(seed))  # uniform in [0, 1)
    split = np.zeros(len(ids), dtype=np.int8)
    split[position < test_fraction + val_fraction] = 1
    split[position < test_fraction] = 2
    return split


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Right-pad token id lists to the longest one: LongTensor (B, T)."""
    width = max(len(s) for s in sequences)
    batch = np.full((len(sequences), width), pad_id, dtype=np.int64)  # (B, T)
    for row, sequence in enumerate(sequences):
        batch[row, : len(sequence)] = sequence
    return torch.from_numpy(batch)


def pad_lists(column: Any, pad_id: int) -> torch.Tensor:
    """Right-pad an Arrow list column (token id lists, any chunking) to its longest list: LongTensor (B, T).

    The columnar twin of ``pad_batch``: one scatter from the flat values, no per-item Python.
    """
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    lengths = np.diff(column.offsets.to_numpy())  # (B,), this slice's lengths
    values = column.flatten().to_numpy(zero_copy_only=False)  # (sum of lengths,) in row order
    width = int(lengths.max()) if len(lengths) else 0
    batch = np.full((len(lengths), width), pad_id, dtype=np.int64)  # (B, T)
    batch[np.arange(width) < lengths[:, None]] = values  # a boolean mask fills row by row, as values run
    return torch.from_numpy(batch)


def padding_fraction(lengths: np.ndarray, batches: Sequence[Sequence[int]]) -> float:
    """Share of the padded (B, T) cells that are padding, over ``batches`` of indices into ``lengths``."""
    cells = sum(len(b) * int(lengths[list(b)].max()) for b in batches if len(b))
    return 1.0 - float(sum(int(lengths[list(b)].sum()) for b in batches)) / max(cells, 1)


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of ``indices`` grouped by length (``bucket``) or at random, reshuffled each epoch.

    Items are shuffled, cut into pools of ``pool_batches`` batches, sorted by length inside each
    pool and cut into batches; the batch order is then shuffled. With ``num_replicas`` > 1 rank
    ``rank`` takes every ``num_replicas``-th batch; ``even`` repeats batches so every rank gets
    the same count (training needs it, prediction must not have it).
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

    def __len__(self) -> int:
        count = math.ceil(len(self.indices) / self.batch_size)
        if self.num_replicas == 1:
            return count
        if self.even:
            return math.ceil(count / self.num_replicas)
        return len(range(self.rank, count, self.num_replicas))


class RowTaker:
    """Rows of a chunked Arrow table by index, in the order asked, at a cost that grows with the rows asked for.

    ``Table.take`` on a table of many chunks (a prepared dataset has one per 1,000 rows) first joins every
    chunk: 49 ms for 1,024 rows of a 200,000-row table, growing with the table. Here the indices are sorted,
    each chunk they touch gives its rows with one take, and one take of the joined result restores the order.
    """

    def __init__(self, table: Any) -> None:
        self.schema = table.schema
        self.num_rows = table.num_rows
        self._batches = table.to_batches()
        self._starts = np.cumsum([0, *(b.num_rows for b in self._batches)])  # (chunks + 1,) first row of each

    def take(self, indices: Any) -> Any:
        import pyarrow as pa

        indices = np.asarray(indices, dtype=np.int64)  # (n,)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.num_rows):
            raise IndexError(f"row index out of range [0, {self.num_rows})")
        order = np.argsort(indices, kind="stable")  # (n,)
        ordered = indices[order]
        chunk = np.searchsorted(self._starts, ordered, side="right") - 1  # (n,) the chunk of each row
        cuts = [0, *(np.flatnonzero(np.diff(chunk)) + 1).tolist(), len(ordered)]
        parts = [
            self._batches[chunk[a]].take(pa.array(ordered[a:b] - self._starts[chunk[a]]))
            for a, b in zip(cuts[:-1], cuts[1:], strict=True)
            if b > a
        ]
        table = pa.Table.from_batches(parts, schema=self.schema).combine_chunks()
        if (order == np.arange(len(order))).all():
            return table
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))  # position in `ordered` of each index asked for
        return table.take(pa.array(inverse))


class TokenizedDataset(Dataset):
    """The rows of a prepared dataset (a ``prepared.PreparedDataset`` or a ``pyarrow.Table``) fetched a batch at
    a time as an Arrow table (``__getitems__``: one take), padded by ``collate``; metadata stays columnar (a
    ``pyarrow.Table``: ``id``, ``text``, ``truncated`` and the metadata columns) all the way to the writer."""

    def __init__(self, dataset: Any, pad_id: int, with_metadata: bool, attention: bool = False) -> None:
        table = getattr(dataset, "data", dataset)
        self.pad_id = pad_id
        self.with_metadata = with_metadata
        self.attention = attention
        self.metadata_columns = [c for c in table.column_names if c not in ("input_ids", "length")]
        self._rows = RowTaker(table.select(["input_ids", *self.metadata_columns] if with_metadata else ["input_ids"]))

    def __len__(self) -> int:
        return self._rows.num_rows

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])

    def __getitems__(self, indices: Any) -> Any:
        """A ``pyarrow.Table``, one row per index."""
        return self._rows.take(indices)

    def collate(self, rows: Any) -> torch.Tensor | tuple[Any, ...]:
        """Arrow batch -> LongTensor (B, T), or ``(metadata, LongTensor (B, T))`` with metadata (a
        ``pyarrow.Table`` of the metadata columns, ``id`` first), and ``(metadata, x, True)`` when the batch
        asks the model for attention maps."""
        x = pad_lists(rows.column("input_ids"), self.pad_id)  # (B, T)
        if not self.with_metadata:
            return x
        metadata = rows.select(self.metadata_columns)
        return (metadata, x, True) if self.attention else (metadata, x)


class TokenizedDataModule(pl.LightningDataModule):
    """Train/val/test/predict loaders over a prepared directory (``quackae prepare --out``)."""

    def __init__(
        self,
        path: str | Path,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        bucket: bool = True,
        pad_id: int | None = None,
        predict_indices: Sequence[int] | None = None,
        predict_attention: bool = False,
        predict_pool: int = 0,
        prepared: tuple[Any, Any] | None = None,
    ) -> None:
        """``prepared``: ``(dataset, tokenizer)`` already opened from ``path`` (saves opening it again)."""
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"--batch-size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"--num-workers must not be negative, got {num_workers}")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"--val-fraction and --test-fraction must be in [0, 1) with a sum below 1, got "
                f"{val_fraction} and {test_fraction}"
            )
        self.path = Path(path)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.bucket = bucket
        self.pad_id = pad_id
        self.predict_indices = predict_indices
        self.predict_attention = predict_attention  # predict batches ask the model for attention maps too
        # predict items are length-sorted within pools of this many items taken in row order (0: 100 batches);
        # encode sets its shard size, so that each shard covers one run of consecutive rows
        self.predict_pool = predict_pool
        self.dataset: Any = None if prepared is None else prepared[0]
        self.tokenizer: Any = None if prepared is None else prepared[1]
        self.lengths: Any = None
        self.splits: dict[str, np.ndarray] = {}

    def setup(self, stage: str | None = None) -> None:
        """Open the prepared directory; for any stage but ``predict`` (which covers every item) also split it."""
        if self.lengths is None:
            from quackae.prepared import load_prepared
            from quackae.tokenizer import special_ids

            if self.dataset is None:
                self.dataset, self.tokenizer, _ = load_prepared(self.path)
            if self.pad_id is None:
                self.pad_id = special_ids(self.tokenizer).pad
            self.lengths = self.dataset.data.column("length").to_numpy().astype(np.int64)
        if stage == "predict" or self.splits:
            return
        ids = self.dataset.data.column("id").to_pylist()
        split = split_of(ids, self.seed, self.val_fraction, self.test_fraction)
        self.splits = {name: np.flatnonzero(split == code) for code, name in enumerate(("train", "val", "test"))}
        sizes = {name: len(index) for name, index in self.splits.items()}
        log.info("split of %d items (seed %d): %s", len(ids), self.seed, sizes)
        train = self.splits["train"]
        if len(train):
            sampler = BucketBatchSampler(train, self.lengths, self.batch_size, bucket=self.bucket, seed=self.seed)
            log.info(
                "padding fraction of training batches (%s): %.3f",
                "bucketed" if self.bucket else "random",
                padding_fraction(self.lengths, sampler.batches()),
            )

    def _replicas(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _loader(
        self,
        indices: np.ndarray,
        shuffle: bool,
        with_metadata: bool,
        even: bool,
        attention: bool = False,
        pool_batches: int = 100,
    ) -> DataLoader:
        replicas, rank = self._replicas()
        sampler = BucketBatchSampler(
            indices,
            self.lengths,
            self.batch_size,
            bucket=self.bucket or not shuffle,
            shuffle=shuffle,
            seed=self.seed,
            num_replicas=replicas,
            rank=rank,
            even=even,
            pool_batches=pool_batches,
        )
        dataset = TokenizedDataset(self.dataset, self.pad_id, with_metadata, attention)
        on_gpu = self.trainer is not None and isinstance(self.trainer.accelerator, CUDAAccelerator)
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=dataset.collate,
            num_workers=self.num_workers,
            pin_memory=on_gpu,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.splits["train"], shuffle=True, with_metadata=False, even=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.splits["val"], shuffle=False, with_metadata=False, even=True)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.splits["test"], shuffle=False, with_metadata=False, even=True)

    def predict_dataloader(self) -> PredictLoader:
        """Every item (or ``predict_indices``) exactly once across ranks, sorted by length for speed."""
        indices = (
            np.arange(self.dataset.num_rows)
            if self.predict_indices is None
            else np.asarray(self.predict_indices, dtype=np.int64)
        )
        pool_batches = max(1, self.predict_pool // self.batch_size) if self.predict_pool else 100
        loader = self._loader(
            indices,
            shuffle=False,
            with_metadata=True,
            even=False,
            attention=self.predict_attention,
            pool_batches=pool_batches,
        )
        from quackae.runtime import cores_to_spare

        prefetch = self.num_workers == 0 and cores_to_spare(self.trainer)
        return PredictLoader(loader, prefetch=prefetch, block=pool_batches)


class PredictLoader:
    """A predict ``DataLoader`` handed to Lightning as a plain iterable, so Lightning leaves it as it is.

    Lightning rebuilds any ``DataLoader`` it predicts from, wrapping the batch sampler in one that keeps
    every batch's index list until the run ends (``seen_batch_indices``, for the ``batch_indices`` argument
    of a prediction writer: 40 bytes an item measured with ``tracemalloc``, so 400 MB at 10M items). The
    writer reads each item's id from its metadata instead, so memory stays flat however many items go by.

    Without worker processes the rows of ``block`` batches at a time are fetched with one take (per-batch
    fetches cost 1-2 ms each in a CPU encode, about 4% of it) and each batch is a slice of them, padded;
    with workers the ``DataLoader`` fetches as usual. With ``prefetch`` (set by the data module when there
    are cores to spare, see ``runtime.cores_to_spare``) a thread fetches and pads the next batches while the
    model computes the current one, instead of the prediction thread doing it between batches.
    """

    def __init__(self, loader: DataLoader, prefetch: bool = False, depth: int = 2, block: int = 128) -> None:
        self.loader = loader
        self.prefetch = prefetch
        self.depth = depth
        self.block = block

    def __iter__(self) -> Iterator[Any]:
        batches = self._blocks() if self.loader.num_workers == 0 else iter(self.loader)
        return _prefetched(batches, self.depth) if self.prefetch else batches

    def _blocks(self) -> Iterator[Any]:
        dataset, pin = self.loader.dataset, self.loader.pin_memory
        batches = self.loader.batch_sampler.mine()
        for start in range(0, len(batches), self.block):
            group = batches[start : start + self.block]
            rows = dataset.__getitems__(np.concatenate(group).tolist())  # one take for the whole group
            offset = 0
            for indices in group:
                batch = self.loader.collate_fn(rows.slice(offset, len(indices)))
                offset += len(indices)
                yield _pinned(batch) if pin else batch

    def __len__(self) -> int:
        return len(self.loader)


def _pinned(batch: Any) -> Any:
    """``batch`` with its tensors in pinned memory (what a ``DataLoader`` with ``pin_memory`` hands over)."""
    if torch.is_tensor(batch):
        return batch.pin_memory()
    return tuple(part.pin_memory() if torch.is_tensor(part) else part for part in batch)


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _prefetched(loader: Any, depth: int) -> Iterator[Any]:
    """``loader``'s batches in order, fetched by a background thread at most ``depth`` ahead; an error in the
    thread is raised here, and closing the iterator early stops the thread."""
    import queue
    import threading

    batches: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                batches.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def fill() -> None:
        try:
            for batch in loader:
                if not put(batch):
                    return
        except BaseException as error:  # noqa: BLE001 - handed to the consuming thread, raised there
            put(_Failed(error))
            return
        put(end)

    thread = threading.Thread(target=fill, name="quackae-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = batches.get()
            if item is end:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()
