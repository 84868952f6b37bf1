"""The predict loop's data: every item once across ranks, batches fetched a block at a time, and the typed
batch and prediction tuples that the data module, the model and the store's writer share.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader


class PredictBatch(NamedTuple):
    """A predict batch: the items' metadata (a ``pyarrow.Table``: ``id`` first, then the metadata columns) and
    their tokens (B, T); ``attention`` asks the model for its greedy reconstruction's attention maps too."""

    metadata: Any
    tokens: torch.Tensor
    attention: bool = False


class Prediction(NamedTuple):
    """What the model predicts for a ``PredictBatch`` and the store's writer stores: the metadata, the encodings
    (B, encoding size) and, when the batch asked, ``(attention (B, S, T), tokens (B, S), x (B, T))``."""

    metadata: Any
    encoding: torch.Tensor
    attention: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


class PredictLoader:
    """A predict ``DataLoader`` handed to Lightning as a plain iterable, so Lightning leaves it as it is.

    Lightning rebuilds any ``DataLoader`` it predicts from, wrapping the batch sampler in one that keeps
    every batch's index list until the run ends (``seen_batch_indices``, for the ``batch_indices`` argument
    of a prediction writer: 40 bytes an item measured with ``tracemalloc``, so 400 MB at 10M items). The
    writer reads each item's id from its metadata instead, so memory stays flat however many items go by.

    Without worker processes the rows of ``block`` batches at a time are fetched with one take (per-batch
    fetches cost 1-2 ms each in a CPU encode, about 4% of it) and each batch is a slice of them, padded;
    with workers the ``DataLoader`` fetches as usual. With ``prefetch`` (set by the data module when there
    are cores to spare, see ``quackae.core.cores.cores_to_spare``) a thread fetches and pads the next batches while the
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
        """The batches this rank predicts; 1 (and none to iterate) on a rank left without items when a job has
        fewer items than ranks: Lightning skips a predict loop of length 0 together with its end hooks, and the
        writer's end hook waits there for every rank before rank 0 completes the manifest."""
        count = len(self.loader)
        sampler = self.loader.batch_sampler
        if count == 0 and getattr(sampler, "num_replicas", 1) > 1 and len(getattr(sampler, "indices", ())):
            return 1
        return count


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
