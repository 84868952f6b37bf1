"""``TokenizedDataModule``: a prepared dataset as padded, length-bucketed batches for every stage that runs a
model: the id-hash split and the bucketing (``sampler``), padding (``padding``) and the predict loader
(``predict``). ``TokenizedDataset`` fetches a batch's rows with one Arrow take (``RowTaker``).

Shape glossary: B batch size, T longest item in the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.accelerators import CUDAAccelerator
from torch.utils.data import DataLoader, Dataset

from quackae.data.padding import pad_lists
from quackae.data.predict import PredictBatch, PredictLoader
from quackae.data.sampler import BucketBatchSampler, padding_fraction, split_of

log = logging.getLogger(__name__)


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

    def collate(self, rows: Any) -> torch.Tensor | PredictBatch:
        """Arrow batch -> LongTensor (B, T), or with metadata a ``PredictBatch`` (the metadata columns as a
        ``pyarrow.Table``, ``id`` first, and the tokens)."""
        x = pad_lists(rows.column("input_ids"), self.pad_id)  # (B, T)
        if not self.with_metadata:
            return x
        return PredictBatch(rows.select(self.metadata_columns), x, self.attention)


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
        self.info: dict[str, Any] = {}  # prepare.json of the folder, when this module opened it
        self.lengths: Any = None
        self.splits: dict[str, np.ndarray] = {}

    def setup(self, stage: str | None = None) -> None:
        """Open the prepared directory; for any stage but ``predict`` (which covers every item) also split it."""
        if self.lengths is None:
            from quackae.data.prepared import load_prepared
            from quackae.data.tokenizer import special_ids

            if self.dataset is None:
                self.dataset, self.tokenizer, self.info = load_prepared(self.path)
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
        """Every item (or ``predict_indices``) exactly once across ranks, sorted by length for speed. Each rank
        gets a batch when there are at least as many items as ranks (``BucketBatchSampler``); with fewer (a rerun
        with an item or two left) the ranks past them get none (``PredictLoader`` still runs their loop)."""
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
        from quackae.core.cores import cores_to_spare

        prefetch = self.num_workers == 0 and cores_to_spare(self.trainer)
        return PredictLoader(loader, prefetch=prefetch, block=pool_batches)
