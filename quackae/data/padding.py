"""Token rows to right-padded (B, T) tensors, and the one loop that batches rows by length.

Shape glossary: B batch size, T longest item in the batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch


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


def length_sorted_batches(
    rows: Sequence[Sequence[int]], batch_size: int, pad_id: int
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """``(positions in rows, x (B, T))`` for ``rows`` in batches of similar length, longest first (memory peaks
    at the first batch), each padded to its own longest row. An item's encoding and reconstruction do not
    depend on its batch mates, so each result goes back to its ``positions``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = np.argsort([-len(row) for row in rows], kind="stable")  # (N,)
    for start in range(0, len(order), batch_size):
        positions = order[start : start + batch_size]
        yield positions, pad_batch([rows[i] for i in positions], pad_id)  # (B, T)
