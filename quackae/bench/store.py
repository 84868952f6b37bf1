"""``quackae bench --what store``: synthetic encodings through the writer and back, both layouts.

Items are 256-d float32 with an ``id``, an integer ``label`` and a short ``text``, handed to the
writer in the order ``quackae encode`` produces them: pools of ``shard_size`` consecutive ids, each in
a random order (encode sorts a pool by length, which has nothing to do with the id). Each layout runs
in a child process so that its peak RSS is its own: ``peak_rss_mb`` is the maximum RSS after
writing (the writer's memory, which must not grow with the item count), ``peak_rss_read_mb`` after
``to_numpy`` (which holds the whole (N, H) matrix by design).
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HIDDEN = 256
FILES_ITEMS = 100_000  # the files layout is measured at most at this size (one file per item)


def _disk_bytes(root: Path) -> int:
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            total += os.lstat(os.path.join(folder, name)).st_blocks * 512
    return total


def _text(index: int) -> str:
    return f"synthetic item {index} for the store bench"


def _measure(layout: str, items: int, batch_size: int, shard_size: int, root: str, seed: int) -> dict[str, Any]:
    import pyarrow as pa

    from quackae.store.reader import EncodingStore
    from quackae.store.writer import AutoencoderWriter

    store = Path(root) / f"store-{layout}"
    rng = np.random.default_rng(seed)
    block = rng.standard_normal((batch_size, HIDDEN)).astype(np.float32)  # (B, H)

    def encodings(ids: np.ndarray) -> np.ndarray:
        """Item i's encoding: row i % B of the block shifted by i // B (known without storing it)."""
        return block[ids % batch_size] + (ids // batch_size % 997).astype(np.float32)[:, None]  # (n, H)

    def metadata(ids: np.ndarray) -> Any:
        """A batch's metadata as the data module hands it to the writer: one Arrow table of columns."""
        return pa.table({"id": ids, "label": ids % 7, "text": [_text(i) for i in ids.tolist()]})

    def batches() -> Any:
        for pool in range(0, items, shard_size):
            order = pool + rng.permutation(min(shard_size, items - pool)).astype(np.int64)  # a length-sorted pool
            for s in range(0, len(order), batch_size):
                yield order[s : s + batch_size]

    # warm-up: a few items into a store of their own, so one-off imports (pyarrow loads pandas) are not
    # charged to the timed write
    warm = AutoencoderWriter(storage_path=Path(root) / f"warm-{layout}", layout=layout, shard_size=shard_size)
    warm.write_batch(metadata(np.arange(8)), block[:8])
    warm.flush()
    writer = AutoencoderWriter(storage_path=store, layout=layout, shard_size=shard_size, manifest={"bench": True})
    start = time.perf_counter()
    for ids in batches():
        writer.write_batch(metadata(ids), encodings(ids))
    writer.flush()
    writer.write_manifest()
    write_s = time.perf_counter() - start
    rss_write = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    reader = EncodingStore(store)
    ids, matrix = reader.to_numpy()
    read_s = time.perf_counter() - start
    assert np.array_equal(ids, np.arange(items)) and matrix.shape == (items, HIDDEN)
    checked = np.random.default_rng(seed + 2).integers(0, items, 1000)
    assert np.array_equal(matrix[checked], encodings(checked))
    picks = np.random.default_rng(seed + 1).integers(0, items, 10_000)
    start = time.perf_counter()
    for index in picks.tolist():
        reader[index]
    random_s = time.perf_counter() - start
    rss_read = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    raw = 8 + 4 * HIDDEN + 8 + float(np.mean([len(_text(i).encode()) for i in range(0, items, max(1, items // 1000))]))
    result = {
        "layout": layout,
        "items": items,
        "write_items_per_s": round(items / write_s, 1),
        "read_items_per_s": round(items / read_s, 1),
        "random_access_items_per_s": round(len(picks) / random_s, 1),
        "peak_rss_mb": round(rss_write, 1),
        "peak_rss_read_mb": round(rss_read, 1),
        "bytes_per_item": round(_disk_bytes(store) / items, 1),
        "raw_bytes_per_item": round(raw, 1),
    }
    shutil.rmtree(store)
    shutil.rmtree(Path(root) / f"warm-{layout}")
    return result


def _child(queue: Any, *args: Any) -> None:
    try:
        queue.put(_measure(*args))
    except BaseException as error:  # reported by the parent as a one-line error
        queue.put(error)


def _run_child(*args: Any) -> dict[str, Any]:
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, *args))
    process.start()
    result = queue.get()
    process.join()
    if isinstance(result, BaseException):
        raise result
    return result


def bench_store(config: Any) -> dict[str, Any]:
    """Write and read ``config.items`` synthetic items in the shards layout and up to 100k in the files layout."""
    batch_size = config.batch_size or 1024
    base = Path(config.dir or "storage")
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="quackae-bench-store-", dir=base) as tmp:
        from quackae.store.shards import DEFAULT_SHARD_SIZE

        result = {"bench": "store", "dir": str(base), "hidden": HIDDEN, "batch_size": batch_size}
        result.update(_run_child("shards", config.items, batch_size, DEFAULT_SHARD_SIZE, tmp, config.seed))
        files = _run_child("files", min(config.items, FILES_ITEMS), batch_size, DEFAULT_SHARD_SIZE, tmp, config.seed)
        result["files"] = files
    return result
