"""``quackae bench --what encode``: the encoder alone, ``quackae encode`` end to end, the data path alone
(``encode`` with the model's forward replaced by a stand-in), and the writer alone."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quackae.data.prepared import COMPLETE, DATASET, dataset_fingerprint, open_rows
from quackae.model.trainer import default_precision, encode_batch_size
from quackae.stages.encode import EncodeConfig, encode
from quackae.store.writer import AutoencoderWriter

DATA_PATH_ITEMS_PER_ITEM = 20  # the data path runs on 20x --items (200,000 by default): fast enough to need it
DATA_PATH_BATCHES = (128, 1024)
DATA_PATH_ROUNDS = 3

log = logging.getLogger(__name__)


def bench_encode(config: Any) -> dict[str, Any]:
    """items/s of the encoder alone, of ``encode`` end to end (default ``shards`` layout, and ``files`` under
    ``files_*`` keys), of the data path alone (``data_path_*``) and of the writer alone (256-d items).

    ``config.rounds`` end-to-end runs alternate with model-only passes; the ``*_runs`` keys list every one,
    the others are medians. The data path is ``encode()`` end to end, text on, with the model's forward
    replaced by a stand-in that returns slices of zeros allocated once (``_stand_in``): everything a GPU
    leaves to the CPU. Its items/s count from the first batch to the end of ``encode()`` (the last shard's
    write and the manifest included); the call's start-up to the first batch is ``data_path_first_batch_s``."""
    import tempfile

    import datasets

    from quackae.model.autoencoder import QuackAutoEncoder
    from quackae.model.config import PRESETS

    datasets.disable_progress_bars()
    items = config.items
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    base = PRESETS["base"]
    vocab, hidden = base.num_embeddings, base.hidden_size
    model = QuackAutoEncoder(config=base).eval()
    on_gpu = config.cuda and config.accelerator != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    flags = {
        "accelerator": "cuda" if on_gpu else "cpu",
        "precision": config.precision or default_precision(device.type),
    }
    batch_size = config.batch_size or encode_batch_size(flags["accelerator"])  # quackae encode's default here
    lengths = torch.randint(8, 65, (items,), generator=generator)
    rows = [torch.randint(4, vocab, (int(n) - 1,), generator=generator).tolist() + [3] for n in lengths]
    result: dict[str, Any] = {
        "bench": "encode",
        "items": items,
        "batch_size": batch_size,
        "hidden": hidden,
        "encoding_size": model.encoding_size,
        "device": torch.cuda.get_device_name(device) if on_gpu else f"cpu ({torch.get_num_threads()} threads)",
        "precision": flags["precision"],
    }
    with tempfile.TemporaryDirectory(prefix="quackae-bench-", dir=config.dir) as tmp:
        root = Path(tmp)
        _write_bench_run(root, rows, model, vocab)
        result.update(_model_and_end_to_end(root, rows, model, device, batch_size, config.rounds, flags))
        result.update(_data_path(root, model, vocab, DATA_PATH_ITEMS_PER_ITEM * items, batch_size, config.seed, flags))
        # the files layout once, beside the median model-only rate
        files = _encode_rate(root, "store-files", "files", batch_size, items, flags)
        result["files_end_to_end_items_per_s"] = round(files, 1)
        result["writer_items_per_s"] = round(_writer_alone(root / "writer", items, hidden, batch_size), 1)
    result["files_end_to_end_vs_model_only"] = round(
        result["files_end_to_end_items_per_s"] / result["model_only_items_per_s"], 3
    )
    return result


def _model_and_end_to_end(
    root: Path,
    rows: list[list[int]],
    model: Any,
    device: torch.device,
    batch_size: int,
    rounds: int,
    flags: dict[str, str],
) -> dict[str, Any]:
    """Model only (the encoder on pre-built, length-sorted batches already in memory) against end to end (a
    prepared dataset on disk -> a store on disk, through ``encode()``), in alternation.

    Model only comes first and last; each round's ratio is its end-to-end rate over the mean of the model-only
    passes on either side, and the medians are reported: on a shared machine the same pass moves 10-20% from
    one run to the next, and so does a ratio of two single runs."""
    from quackae.data.padding import length_sorted_batches

    items, on_gpu = len(rows), device.type == "cuda"
    bf16 = flags["precision"].startswith("bf16")
    batches = [x.to(device) for _, x in length_sorted_batches(rows, batch_size, 0)]
    model.to(device)

    def model_only() -> float:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            start = time.perf_counter()
            for x in batches:
                model(x)
            if on_gpu:
                torch.cuda.synchronize(device)
            return items / (time.perf_counter() - start)

    # one untimed pass over every batch first: the first time each batch shape goes through the model
    # costs allocations a steady encode does not pay (timed, that pass ran 18-34% slower here)
    model_only()
    passes, runs, steady, startups = [model_only()], [], [], []
    for round_ in range(rounds):
        first: list[float] = []
        with _first_forward(first):
            start = time.perf_counter()
            _encode(root / "prepared", root / "run", root / f"store-shards-{round_}", "shards", batch_size, flags)
            end = time.perf_counter()
        runs.append(items / (end - start))
        steady.append(items / (end - first[0]))  # from the first batch's forward to the end of encode()
        startups.append(round(first[0] - start, 3))
        passes.append(model_only())
    ratios = [runs[r] / ((passes[r] + passes[r + 1]) / 2) for r in range(rounds)]
    steady_ratios = [steady[r] / ((passes[r] + passes[r + 1]) / 2) for r in range(rounds)]
    return {
        "model_only_items_per_s": round(float(np.median(passes)), 1),
        "end_to_end_items_per_s": round(float(np.median(runs)), 1),
        "end_to_end_vs_model_only": round(float(np.median(ratios)), 3),
        "model_only_runs_items_per_s": [round(p, 1) for p in passes],
        "end_to_end_runs_items_per_s": [round(r, 1) for r in runs],
        "end_to_end_vs_model_only_runs": [round(r, 3) for r in ratios],
        # the same runs without their start-up (opening the data and the checkpoint, building the Trainer),
        # which a short bench run pays in full: what the data path leaves of the model's speed once items flow
        "end_to_end_startup_s": round(float(np.median(startups)), 3),
        "end_to_end_startup_s_runs": startups,
        "end_to_end_after_startup_vs_model_only": round(float(np.median(steady_ratios)), 3),
        "end_to_end_after_startup_vs_model_only_runs": [round(r, 3) for r in steady_ratios],
    }


def _writer_alone(folder: Path, items: int, hidden: int, batch_size: int) -> float:
    """items/s of the writer alone: ``hidden``-d float32 items with metadata, atomic, no pickle (default layout)."""
    writer = AutoencoderWriter(storage_path=folder)
    matrix = np.random.default_rng(0).standard_normal((items, hidden)).astype(np.float32)
    start = time.perf_counter()
    for s in range(0, items, batch_size):
        ids = np.arange(s, min(s + batch_size, items), dtype=np.int64)
        writer.write_batch({"id": ids, "label": ids % 7}, matrix[s : s + batch_size])  # columns, as encode's
    writer.flush()
    return items / (time.perf_counter() - start)


def _encode_rate(root: Path, name: str, layout: str, batch_size: int, items: int, flags: dict[str, str]) -> float:
    """items/s of one ``encode`` of the bench's prepared data into a new store ``root/name``."""
    start = time.perf_counter()
    _encode(root / "prepared", root / "run", root / name, layout, batch_size, flags)
    return items / (time.perf_counter() - start)


@contextlib.contextmanager
def _first_forward(first: list[float]) -> Iterator[None]:
    """``QuackAutoEncoder.forward`` unchanged but for noting, in ``first``, the time of its first call."""
    from quackae.model.autoencoder import QuackAutoEncoder

    original = QuackAutoEncoder.forward

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not first:
            first.append(time.perf_counter())
        return original(self, *args, **kwargs)

    QuackAutoEncoder.forward = forward
    try:
        yield
    finally:
        QuackAutoEncoder.forward = original


@contextlib.contextmanager
def _stand_in(model: Any, batch_size: int, width: int, first: list[float]) -> Iterator[None]:
    """``QuackAutoEncoder.forward`` replaced, for the block, by one that returns slices of zeros of the model's
    output shapes, allocated here once (a stand-in allocating per batch would add page faults a real model
    does not pay); ``first`` gets the time of the first call."""
    from quackae.model.autoencoder import QuackAutoEncoder

    zeros: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not first:
            first.append(time.perf_counter())
        if x.device not in zeros:  # once, on the device the batches arrive on
            codes = torch.zeros(batch_size, model.encoding_size, device=x.device)  # (B, encoding size)
            zeros[x.device] = codes, torch.zeros(batch_size, width, model.hidden_size, device=x.device)  # (B, T, H)
        codes, states = zeros[x.device]
        return codes[: x.shape[0]], states[: x.shape[0], : x.shape[1]]

    original = QuackAutoEncoder.forward
    QuackAutoEncoder.forward = forward
    try:
        yield
    finally:
        QuackAutoEncoder.forward = original


def _data_path(
    root: Path, model: Any, vocab: int, items: int, default_batch: int, seed: int, flags: dict[str, str]
) -> dict[str, Any]:
    """``encode()`` with the stand-in forward at each of ``DATA_PATH_BATCHES`` (and the default batch size),
    ``DATA_PATH_ROUNDS`` runs each, on ``items`` generated rows (lengths 8-64) with their text."""
    import shutil

    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, 65, items)
    values = rng.integers(4, vocab, int(lengths.sum())).astype(np.int32)
    values[np.cumsum(lengths) - 1] = 3  # [EOS] last
    prepared = root / "data-path"
    _write_prepared(prepared, lengths, values, root / "run" / "tokenizer.json")
    figures: dict[str, Any] = {"data_path_items": items}
    starts = []
    for batch in sorted({*DATA_PATH_BATCHES, default_batch}):
        runs = []
        for round_ in range(DATA_PATH_ROUNDS):
            first: list[float] = []
            out = root / f"data-path-store-{batch}-{round_}"
            with _stand_in(model, batch, int(lengths.max()), first):
                start = time.perf_counter()
                _encode(prepared, root / "run", out, "shards", batch, flags)
                end = time.perf_counter()
            runs.append(round(items / (end - first[0]), 1))
            starts.append(round(first[0] - start, 3))
            shutil.rmtree(out)
        figures[f"data_path_batch_{batch}_items_per_s"] = round(float(np.median(runs)), 1)
        figures[f"data_path_batch_{batch}_items_per_s_runs"] = runs
    figures["data_path_items_per_s"] = figures[f"data_path_batch_{default_batch}_items_per_s"]
    figures["data_path_items_per_s_runs"] = figures[f"data_path_batch_{default_batch}_items_per_s_runs"]
    figures["data_path_first_batch_s"] = round(float(np.median(starts)), 3)
    figures["data_path_first_batch_s_runs"] = starts
    return figures


def _encode(data: Path, run: Path, out: Path, layout: str, batch_size: int, flags: dict[str, str]) -> None:
    config = EncodeConfig(data=str(data), model=str(run), out=str(out), batch_size=batch_size, devices="1", **flags)
    encode(replace(config, layout=layout))


def _write_prepared(folder: Path, lengths: np.ndarray, values: np.ndarray, tokenizer_file: Path) -> None:
    """A complete prepared folder of token rows (``lengths`` (N,), ``values`` flat), as prepare writes one: their
    text (decoded), ``truncated`` false, a ``label`` column, the tokenizer and the ``COMPLETE`` marker."""
    import datasets
    import pyarrow as pa

    from quackae.data.padding import pad_lists
    from quackae.data.tokenizer import BatchDecoder, load_tokenizer, tokenizer_hash

    tokenizer = load_tokenizer(tokenizer_file)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    input_ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    decoder, texts = BatchDecoder(tokenizer), []
    for start in range(0, len(lengths), 8192):  # padded a block at a time, decoded in bulk
        block = input_ids.slice(start, 8192)
        texts.append(decoder(pad_lists(block, 0).numpy()))
    count = len(lengths)
    table = pa.table(
        {
            "id": pa.array(np.arange(count, dtype=np.int64)),
            "input_ids": input_ids,
            "length": pa.array(lengths.astype(np.int64)),
            "text": pa.chunked_array(texts),
            "truncated": pa.array(np.zeros(count, dtype=bool)),
            "label": pa.array(np.arange(count) % 7),
        }
    )
    folder.mkdir()
    datasets.Dataset(table).save_to_disk(str(folder / DATASET))
    tokenizer.save(str(folder / "tokenizer.json"))
    fingerprint = dataset_fingerprint(open_rows(folder / DATASET, "run the bench again"))
    marker = {"tokenizer_sha256": tokenizer_hash(tokenizer), "dataset_fingerprint": fingerprint, "rows": count}
    (folder / COMPLETE).write_text(json.dumps(marker) + "\n")  # a whole prepared folder, as prepare marks it


def _write_bench_run(root: Path, rows: list[list[int]], model: Any, vocab: int) -> None:
    """A prepared directory and a RUN directory for ``rows`` and ``model``, as prepare and train write them."""
    from quackae.data.tokenizer import train_tokenizer
    from quackae.model.checkpoints import write_run

    tokenizer = train_tokenizer(["quackae benchmark"], vocab_size=300, show_progress=False)
    tokenizer.add_tokens([f"tok{i}" for i in range(vocab - tokenizer.get_vocab_size())])
    run = write_run(model, tokenizer, root / "run")
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    values = np.array([t for r in rows for t in r], dtype=np.int32)
    _write_prepared(root / "prepared", lengths, values, run / "tokenizer.json")
