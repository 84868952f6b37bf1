"""The encode data path alone, on whatever quackae the running Python imports: this checkout or another one.

``encode()`` runs end to end (a prepared folder that this quackae's own ``prepare`` wrote -> Lightning's
predict loop -> ``AutoencoderWriter`` -> a store of shards) with ``QuackAutoEncoder.forward`` replaced by
a stand-in that returns slices of zeros allocated once (allocating per batch would add page faults a
real model does not pay), so only the loader, the loop and the writer are timed: what a GPU leaves to
the CPU. The same script measures an older commit beside this one, for example::

    cd /path/to/old-clone && OMP_NUM_THREADS=1 .venv/bin/python /path/to/this/benchmarks/data_path.py \\
        --items 200000 --batch-size 1024 --rounds 3

It prints one JSON object: items/s of each run (items over the time from the first batch to the end of
``encode()``, the last shard's write and the manifest included), the start-up of each run (the call to the
first batch) and the whole call.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def corpus(path: Path, items: int, seed: int) -> None:
    """``items`` JSON lines of 5-40 made-up words each (about 8-64 tokens with a trained tokenizer)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(3000)]
    counts = rng.integers(5, 41, items)
    picks = rng.integers(0, len(words), int(counts.sum()))
    ends = np.cumsum(counts)
    with path.open("w", encoding="utf-8") as handle:
        for row, end in enumerate(ends):
            text = " ".join(words[i] for i in picks[end - counts[row] : end])
            handle.write(json.dumps({"id": row, "text": text, "label": row % 7}) + "\n")


def make_run(root: Path, prepared: Path) -> None:
    """A RUN folder (checkpoint + tokenizer.json) for the prepared data, as train writes one."""
    import pytorch_lightning as pl

    from quackae.data.tokenizer import load_tokenizer
    from quackae.model.autoencoder import QuackAutoEncoder
    from quackae.model.config import PRESETS

    vocab = load_tokenizer(prepared / "tokenizer.json").get_vocab_size()
    model = QuackAutoEncoder(config=PRESETS["base"].replace(num_embeddings=vocab)).eval()
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(prepared / "tokenizer.json", run / "tokenizer.json")
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(str(run / "checkpoints" / "last.ckpt"), weights_only=True)


def stand_in(batch_size: int, width: int, encoding: int, hidden: int, first: list[float]):
    """A forward of the model's output shapes that only slices zeros allocated here, once."""
    codes = torch.zeros(batch_size, encoding)
    states = torch.zeros(batch_size, width, hidden)

    def forward(self, x):
        if not first:
            first.append(time.perf_counter())
        return codes[: x.shape[0]], states[: x.shape[0], : x.shape[1]]

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--text", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--dir", default=None, help="folder for the data and the stores (default: system temp)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import quackae
    from quackae.core.process import keep_freed_memory
    from quackae.model.autoencoder import QuackAutoEncoder
    from quackae.model.config import PRESETS
    from quackae.stages.encode import EncodeConfig, encode
    from quackae.stages.prepare import PrepareConfig, prepare

    keep_freed_memory()  # what the quackae command does at start
    source = Path(quackae.__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    with tempfile.TemporaryDirectory(prefix="quackae-datapath-", dir=args.dir) as tmp:
        root = Path(tmp)
        corpus(root / "corpus.jsonl", args.items, args.seed)
        prepare(PrepareConfig(inputs=(str(root / "corpus.jsonl"),), out=str(root / "prepared"), vocab_size=8000))
        make_run(root, root / "prepared")
        base = PRESETS["base"]
        first: list[float] = []
        QuackAutoEncoder.forward = stand_in(args.batch_size, 128, base.encoding_size, base.hidden_size, first)
        runs, startups, calls = [], [], []
        for round_ in range(args.rounds):
            out = root / f"store-{round_}"
            first.clear()
            start = time.perf_counter()
            encode(
                EncodeConfig(
                    data=str(root / "prepared"),
                    model=str(root / "run"),
                    out=str(out),
                    batch_size=args.batch_size,
                    accelerator="cpu",
                    devices="1",
                    text=args.text,
                )
            )
            end = time.perf_counter()
            runs.append(round(args.items / (end - first[0]), 1))
            startups.append(round(first[0] - start, 3))
            calls.append(round(end - start, 3))
            shutil.rmtree(out)
    print(
        json.dumps(
            {
                "commit": commit.stdout.strip(),
                "items": args.items,
                "batch_size": args.batch_size,
                "text": args.text,
                "torch_threads": torch.get_num_threads(),
                "items_per_s_runs": runs,
                "first_batch_s_runs": startups,
                "call_s_runs": calls,
                "load": os.getloadavg(),
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
