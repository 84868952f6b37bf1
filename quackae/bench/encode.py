"""``quackae bench --what encode``: the encoder alone, ``quackae encode`` end to end, and the writer alone."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quackae.encode import EncodeConfig, encode
from quackae.prepared import COMPLETE
from quackae.writer import AutoencoderWriter

log = logging.getLogger(__name__)


def bench_encode(config: Any) -> dict[str, Any]:
    """items/s of the encoder alone, of ``encode`` end to end (default ``shards`` layout, and ``files`` under
    ``files_*`` keys), and of the writer alone (256-d items, default layout)."""
    import tempfile

    import datasets

    from quackae.model import QuackAutoEncoder
    from quackae.modelconfig import PRESETS

    datasets.disable_progress_bars()
    batch_size = config.batch_size or 128
    items = config.items
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    base = PRESETS["base"]
    vocab, hidden = base.num_embeddings, base.hidden_size
    model = QuackAutoEncoder(config=base).eval()
    lengths = torch.randint(8, 65, (items,), generator=generator)
    rows = [torch.randint(4, vocab, (int(n) - 1,), generator=generator).tolist() + [3] for n in lengths]
    result: dict[str, Any] = {
        "bench": "encode",
        "items": items,
        "batch_size": batch_size,
        "hidden": hidden,
        "encoding_size": model.encoding_size,
        "device": f"cpu ({torch.get_num_threads()} threads)",
    }
    with tempfile.TemporaryDirectory(prefix="quackae-bench-", dir=config.dir) as tmp:
        root = Path(tmp)
        # model only: the encoder on pre-built, length-sorted batches already in memory
        from quackae.data import pad_batch

        order = sorted(range(items), key=lambda i: len(rows[i]))
        batches = [pad_batch([rows[i] for i in order[s : s + batch_size]], 0) for s in range(0, items, batch_size)]

        def model_only() -> float:
            with torch.inference_mode():
                start = time.perf_counter()
                for x in batches:
                    model(x)
                return items / (time.perf_counter() - start)

        # one untimed pass over every batch first: the first time each batch shape goes through the model
        # costs allocations a steady encode does not pay (timed, that pass ran 18-34% slower here)
        model_only()
        # model only is timed right before and right after the default layout's end-to-end run: the ratios
        # compare end to end with the mean of the two, so a machine that speeds up or slows down in between
        # does not tilt it
        before = model_only()
        # end to end: a prepared dataset on disk -> a store on disk, through encode(), both layouts
        _write_bench_run(root, rows, model, vocab)
        for layout, key in (("shards", "end_to_end_items_per_s"), ("files", "files_end_to_end_items_per_s")):
            start = time.perf_counter()
            encode(
                EncodeConfig(
                    data=str(root / "prepared"),
                    model=str(root / "run"),
                    out=str(root / f"store-{layout}"),
                    batch_size=batch_size,
                    accelerator="cpu",
                    devices="1",
                    layout=layout,
                )
            )
            result[key] = round(items / (time.perf_counter() - start), 1)
            if layout == "shards":
                after = model_only()
        result["model_only_items_per_s"] = round((before + after) / 2, 1)
        result["model_only_runs_items_per_s"] = [round(before, 1), round(after, 1)]
        # the writer alone: 256-d float32 items with metadata, atomic, no pickle (default layout)
        writer = AutoencoderWriter(storage_path=root / "writer")
        matrix = np.random.default_rng(0).standard_normal((items, hidden)).astype(np.float32)
        start = time.perf_counter()
        for s in range(0, items, batch_size):
            ids = np.arange(s, min(s + batch_size, items), dtype=np.int64)
            writer.write_batch({"id": ids, "label": ids % 7}, matrix[s : s + batch_size])  # columns, as encode's
        writer.flush()
        result["writer_items_per_s"] = round(items / (time.perf_counter() - start), 1)
    model_only = result["model_only_items_per_s"]
    result["end_to_end_vs_model_only"] = round(result["end_to_end_items_per_s"] / model_only, 3)
    result["files_end_to_end_vs_model_only"] = round(result["files_end_to_end_items_per_s"] / model_only, 3)
    return result


def _write_bench_run(root: Path, rows: list[list[int]], model: Any, vocab: int) -> None:
    """A prepared directory and a RUN directory for ``rows`` and ``model``, as prepare and train write them."""
    import datasets
    import pytorch_lightning as pl

    from quackae.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["quackae benchmark"], vocab_size=300, show_progress=False)
    tokenizer.add_tokens([f"tok{i}" for i in range(vocab - tokenizer.get_vocab_size())])
    prepared = root / "prepared"
    prepared.mkdir()
    datasets.Dataset.from_dict(
        {
            "id": list(range(len(rows))),
            "input_ids": rows,
            "length": [len(r) for r in rows],
            "label": [i % 7 for i in range(len(rows))],
        }
    ).save_to_disk(str(prepared / "dataset"))
    tokenizer.save(str(prepared / "tokenizer.json"))
    (prepared / COMPLETE).write_text("{}\n")  # a whole prepared folder, as prepare marks it
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    tokenizer.save(str(run / "tokenizer.json"))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.strategy.connect(model)
    trainer.save_checkpoint(str(run / "checkpoints" / "last.ckpt"), weights_only=True)
