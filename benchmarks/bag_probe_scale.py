"""The bag-of-tokens baseline alone at scale: what ``quackae classify`` does for it, on synthetic tokens.

Makes ``--items`` items of 5-60 token ids each (Zipf-like ids over ``--vocab``, a share of each item's
tokens drawn from a band of ids belonging to its class, ``--classes`` classes) as an Arrow list column,
then runs the baseline's steps as ``classify`` runs them: the flat token arrays from the column
(``sparse.token_columns``), the sparse log(1 + count) matrix (``sparse.bag_csr``), the 70/15/15 split's
rows (``Csr.take``) and the probe with its weight decay chosen on validation over the whole grid
(``probes.tuned_sparse_probe``). Prints one JSON object with the time of each step and the process's
peak resident memory. Time it whole with ``/usr/bin/time -v`` for the peak RSS of the process::

    OMP_NUM_THREADS=1 /usr/bin/time -v .venv/bin/python benchmarks/bag_probe_scale.py --items 1000000
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import pyarrow as pa

from quackae.probes import PROBE_DECAYS, tuned_sparse_probe
from quackae.sparse import bag_csr, token_columns


def synthetic_column(items: int, vocab: int, classes: int, seed: int) -> tuple[pa.ChunkedArray, np.ndarray]:
    """``(token id lists as an Arrow column, labels (N,))``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, items)
    lengths = rng.integers(5, 61, items)
    offsets = np.zeros(items + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = (rng.zipf(1.3, int(offsets[-1])) % vocab).astype(np.int32)  # word-frequency-like ids
    item = np.repeat(np.arange(items), lengths)
    topical = rng.random(len(values)) < 0.15
    band = max(1, vocab // (4 * classes))
    values[topical] = (labels[item[topical]] * band + rng.integers(0, band, int(topical.sum()))) % vocab
    column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    return pa.chunked_array([column.slice(0, items // 2), column.slice(items // 2)]), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    column, labels = synthetic_column(args.items, args.vocab, args.classes, args.seed)
    started = time.perf_counter()
    offsets, values = token_columns(column)
    bag = bag_csr(offsets, values, args.vocab)
    tokens = len(values)
    del offsets, values
    built = time.perf_counter()
    train, val, test = np.split(np.arange(args.items), [int(args.items * 0.7), int(args.items * 0.85)])
    parts = bag.take(train), bag.take(val), bag.take(test)
    predicted, decay = tuned_sparse_probe(
        parts[0], labels[train], parts[1], labels[val], parts[2], args.classes, args.seed
    )
    fitted = time.perf_counter()
    print(
        json.dumps(
            {
                "items": args.items,
                "vocab": args.vocab,
                "classes": args.classes,
                "tokens": tokens,
                "nnz": len(bag.data),
                "build_s": round(built - started, 1),
                "fit_with_decay_choice_s": round(fitted - built, 1),
                "decays_tried": list(PROBE_DECAYS),
                "chosen_decay": decay,
                "test_accuracy": round(float((predicted == labels[test]).mean()), 4),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            }
        )
    )


if __name__ == "__main__":
    main()
