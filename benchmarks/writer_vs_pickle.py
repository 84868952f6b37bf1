"""The store writer beside the original's way of storing items, on the same disk, alternating.

The original writer did, per item: ``mkdir(parents=True, exist_ok=True)`` of the item's folder, then
``open(..., "wb")`` and ``pickle.dump({"metadata": ..., "encoded": row})`` into a ``.pyc`` file. That
pattern is reproduced here only as a yardstick, in a scratch folder that is deleted after each round;
quackae itself never pickles stored data.

    python benchmarks/writer_vs_pickle.py storage/writer-bench [--items 10000] [--rounds 4]
"""

from __future__ import annotations

import argparse
import pickle
import shutil
import time
from pathlib import Path

import numpy as np

from quackae.store.items import item_path
from quackae.store.writer import AutoencoderWriter


def original_style(root: Path, matrix: np.ndarray, metas: list[dict]) -> None:
    for row, meta in zip(matrix, metas, strict=True):
        (root / item_path(meta["id"], dir_only=True)).mkdir(parents=True, exist_ok=True)
        with (root / item_path(meta["id"], "pyc")).open("wb") as target:
            pickle.dump({"metadata": meta, "encoded": row}, target)


def quackae_writer(root: Path, matrix: np.ndarray, metas: list[dict], layout: str = "shards") -> None:
    writer = AutoencoderWriter(storage_path=root, layout=layout)
    for start in range(0, len(metas), 128):
        writer.write_batch(metas[start : start + 128], matrix[start : start + 128])
    writer.flush()


def quackae_files_writer(root: Path, matrix: np.ndarray, metas: list[dict]) -> None:
    quackae_writer(root, matrix, metas, layout="files")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="scratch folder on the disk to measure")
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=256, help="encoding size")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    base = Path(args.folder)
    matrix = np.random.default_rng(0).standard_normal((args.items, args.size)).astype(np.float32)
    metas = [{"id": i, "label": i % 7} for i in range(args.items)]
    contenders = [
        ("original pickle writer", original_style),
        ("quackae shards", quackae_writer),
        ("quackae files", quackae_files_writer),
    ]
    for round_ in range(args.rounds):
        # Alternate who goes first: a file system recycles the inodes the previous round freed, and
        # the first writer of a round gets the cheap ones.
        for name, write in contenders if round_ % 2 == 0 else contenders[::-1]:
            root = base / f"round{round_}-{write.__name__}"
            shutil.rmtree(root, ignore_errors=True)
            start = time.perf_counter()
            write(root, matrix, metas)
            seconds = time.perf_counter() - start
            shutil.rmtree(root)
            print(f"round {round_ + 1}: {name:>22}: {args.items / seconds:8,.0f} items/s")


if __name__ == "__main__":
    main()
