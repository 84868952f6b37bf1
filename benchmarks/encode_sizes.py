"""``encode()`` end to end against the model alone at several item counts: what is fixed per call, what per item.

For each count N the bench's generated data (``quackae bench --what encode``: the ``base`` model, token
lengths uniform in [8, 64]) is written as a prepared folder and a RUN; the model-only pass (the encoder on
length-sorted batches in memory) and ``encode()`` into a new store alternate ``--rounds`` times, in this one
process, after one untimed pass of each. Prints the medians, their ratio, and from the two extreme counts the
per-call cost (what encode adds whatever N) and the per-item cost as a multiple of the model's.

    OMP_NUM_THREADS=1 python benchmarks/encode_sizes.py --items 10000 40000 --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    import datasets

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="+", default=[10_000, 40_000])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where the data and stores go (default: a temporary folder)")
    args = parser.parse_args()
    datasets.disable_progress_bars()
    figures = {}
    for items in args.items:
        figures[items] = _one_count(items, args.rounds, args.dir)
        alone, whole = figures[items]
        print(
            f"{items:>8} items: model only {alone:.2f} s, encode() {whole:.2f} s, end to end / model only "
            f"{alone / whole:.3f}",
            flush=True,
        )
    low, high = min(figures), max(figures)
    if high > low:
        per_item = (figures[high][1] - figures[low][1]) / (figures[high][0] - figures[low][0])
        fixed = figures[low][1] - figures[low][0] * per_item
        print(f"per call: {fixed:.2f} s; each item beyond: {per_item:.3f}x the model's time")


def _one_count(items: int, rounds: int, folder: str | None) -> tuple[float, float]:
    """Median seconds of the model-only pass and of ``encode()`` over ``items`` generated items."""
    import torch

    from quackae.bench.encode import _encode, _write_bench_run
    from quackae.data.padding import length_sorted_batches
    from quackae.model.autoencoder import QuackAutoEncoder
    from quackae.model.config import PRESETS
    from quackae.model.trainer import encode_batch_size

    base, batch_size = PRESETS["base"], encode_batch_size("cpu")
    flags = {"accelerator": "cpu", "precision": "32-true"}
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = QuackAutoEncoder(config=base).eval()
    lengths = torch.randint(8, 65, (items,), generator=generator)
    vocab = base.num_embeddings
    rows = [torch.randint(4, vocab, (int(n) - 1,), generator=generator).tolist() + [3] for n in lengths]
    batches = [x for _, x in length_sorted_batches(rows, batch_size, 0)]

    def model_only() -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            for x in batches:
                model(x)
            return time.perf_counter() - start

    with tempfile.TemporaryDirectory(prefix="quackae-sizes-", dir=folder) as tmp:
        root = Path(tmp)
        _write_bench_run(root, rows, model, vocab)

        def end_to_end(name: str) -> float:
            start = time.perf_counter()
            _encode(root / "prepared", root / "run", root / name, "shards", batch_size, flags)
            return time.perf_counter() - start

        model_only(), end_to_end("warm")  # untimed: first shapes, first imports
        alone, whole = [], []
        for round_ in range(rounds):
            alone.append(model_only())
            whole.append(end_to_end(f"store-{round_}"))
    return statistics.median(alone), statistics.median(whole)


if __name__ == "__main__":
    main()
