"""``quackae encode``: a trained encoder over a prepared dataset, each selected item stored exactly once.

Before the first item the store gets its provenance (checkpoint and tokenizer sha256, dataset
fingerprint, layout, encoding size, selection) under an exclusive lock; a rerun with the same
inputs encodes only the ids no sound shard or item holds (corrupt ones are quarantined first), and a
rerun with other inputs is refused unless ``--overwrite``. Batches are sorted by length; predictions
are never gathered in memory; under DDP each rank encodes and writes its own items and rank 0
completes the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quackae.core.errors import QuackError
from quackae.core.results import StageResult
from quackae.data.selection import is_labelled, selected_rows
from quackae.model.checkpoints import resolve_run
from quackae.model.config import UNTRAINED_DECODER, decoder_trained
from quackae.model.trainer import encode_batch_size, progress_bar
from quackae.stages.configs import EncodeConfig
from quackae.store.job import StoreJob, stored_ids_checked
from quackae.store.layout import layout_named
from quackae.store.manifest import DTYPE, read_manifest
from quackae.store.writer import AutoencoderWriter

log = logging.getLogger(__name__)


def _sha256(path: Path, stop: threading.Event) -> str:
    """The file's sha256, read a megabyte at a time; stops early (an unused result) once ``stop`` is set."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            if stop.is_set():
                break
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _sha256_meanwhile(path: Path) -> Iterator[Callable[[], str]]:
    """Hash ``path`` on a thread for the length of the block; calling what it yields waits for the digest (or
    raises the thread's error, a missing file's ``FileNotFoundError`` naming it).

    File reads and ``hashlib`` release the GIL, so the checkpoint is hashed on another core while the
    prediction thread loads the data and the model (a 1 GB checkpoint takes about a second to hash). Leaving
    the block (a failed start) stops the reading and waits for the thread, so no thread outlives the call.
    """
    stop = threading.Event()
    with ThreadPoolExecutor(1, thread_name_prefix="quackae-hash") as pool:
        digest = pool.submit(_sha256, path, stop)
        try:
            yield digest.result
        finally:
            stop.set()  # the pool's exit then waits for the thread


def _open_inputs(config: EncodeConfig, checkpoint: Path, tokenizer_file: Path) -> tuple[Any, Any, Any, str]:
    """``(dataset, data tokenizer, model tokenizer, its hash)`` of a prepared directory and a RUN, refusing
    data tokenized with another tokenizer than the model's."""
    from quackae.core.files import read_bytes
    from quackae.data.prepared import load_prepared
    from quackae.data.tokenizer import load_tokenizer, tokenizer_hash

    dataset, data_tokenizer, _ = load_prepared(config.data)
    if config.text and not dataset.original_text:
        log.warning(
            "%s was prepared before quackae kept each item's original text: the store's text is decoded from the "
            "tokens (cut to --max-length) and 'truncated' is unknown; run quackae prepare again to store the "
            "original texts",
            config.data,
        )
    data_hash = tokenizer_hash(data_tokenizer)
    if read_bytes(tokenizer_file, "tokenizer file") == read_bytes(Path(config.data) / "tokenizer.json"):
        return dataset, data_tokenizer, data_tokenizer, data_hash  # one file, read once
    model_tokenizer = load_tokenizer(tokenizer_file)
    model_hash = tokenizer_hash(model_tokenizer)
    if model_hash != data_hash:
        raise QuackError(
            f"the data in {config.data} was tokenized with another tokenizer than the model "
            f"{checkpoint} was trained with; prepare it again with --tokenizer {tokenizer_file}"
        )
    return dataset, data_tokenizer, model_tokenizer, model_hash


def _majority_label(dataset: Any, config: EncodeConfig) -> Any:
    """The most frequent labelled class, which ``--reduction-threshold`` thins under ``--filtered``."""
    if not config.label_field or not (config.filtered or config.evaluate):
        return None
    if config.label_field not in dataset.column_names:
        raise QuackError(
            f"--label-field {config.label_field!r} is not a column of the data (columns: "
            f"{', '.join(dataset.column_names)})"
        )
    if config.reduction_threshold >= 1:
        return None
    labels = dataset.data.column(config.label_field).to_pylist()
    counts = Counter(str(v) for v in labels if is_labelled(v, config.unlabeled_value))
    return counts.most_common(1)[0][0] if counts else None


def _metadata_schema(dataset: Any) -> Any:
    """The Arrow schema of the metadata columns the data module hands the writer (real types, not guessed)."""
    import pyarrow as pa

    return pa.schema([f for f in dataset.schema if f.name not in ("input_ids", "length")])


@dataclass(frozen=True)
class EncodeResult(StageResult):
    """What ``quackae encode`` stored: counts over every rank, and the whole call's throughput."""

    store: str
    layout: str
    items_written: int  # by this call, every rank's
    items_skipped: int  # selected items the store already held soundly
    items_in_store: int
    encoding_size: int
    items_per_s: float | None
    seconds: float

    @property
    def written(self) -> str | None:
        return self.store


@dataclass
class _Inputs:
    """What an encode reads: the checkpoint and its model, the prepared rows and the tokenizers."""

    checkpoint: Path
    checkpoint_sha256: str
    tokenizer_file: Path
    tokenizer_sha256: str
    dataset: Any
    data_tokenizer: Any
    model_tokenizer: Any
    model: Any


def encode(config: EncodeConfig) -> EncodeResult | None:
    """Run ``quackae encode``; returns counts and throughput (None on the ranks of a DDP job other than 0, which
    report nothing)."""
    started = time.time()
    _check_flags(config)
    inputs = _inputs(config)
    store = Path(config.out)
    selection, header = _selection_and_header(config, inputs)
    job = StoreJob.start(store, header, config.overwrite)
    try:
        wanted = selected_rows(inputs.dataset, selection)
        ids = np.asarray(inputs.dataset.data.column("id").to_numpy())
        job.expected = np.unique(ids[wanted])  # what the finished store holds, each once
        existing = stored_ids_checked(
            store, layout_named(config.layout), header["encoding_size"], header, job.leader, expected=job.expected
        )
        todo = wanted[~np.isin(ids[wanted], existing)]
        _check_png_ids(config, ids[wanted])
        log.info(
            "%d items to encode (%d already stored, %d not selected)",
            len(todo),
            len(wanted) - len(todo),
            inputs.dataset.num_rows - len(wanted),
        )
        writer = _writer(config, inputs, selection, header, job, existing)
        trainer = _predict(config, inputs, writer, todo)
    finally:
        job.close()
    seconds = time.time() - started
    if not trainer.is_global_zero:
        return None
    total = int(read_manifest(store)["items"])  # rank 0 just counted the sound ids into the manifest
    written = total - len(existing)  # every rank's items, not only this rank's writer
    log.info("store %s holds %d items (%d written now)", store, total, written)
    return EncodeResult(
        store=str(store),
        layout=config.layout,
        items_written=written,
        items_skipped=len(wanted) - len(todo),
        items_in_store=total,
        encoding_size=int(inputs.model.encoding_size),
        items_per_s=round(written / seconds, 1) if seconds else None,
        seconds=round(seconds, 1),
    )


def _check_flags(config: EncodeConfig) -> None:
    if "spawn" in str(config.strategy):
        raise QuackError(
            f"--strategy {config.strategy} starts its processes by pickling the trainer, and the store's writer "
            "(its threads and the store's lock) cannot travel that way; use --strategy ddp, which starts each "
            "process as a copy of this command"
        )
    if Path(config.out).exists() and not Path(config.out).is_dir():
        raise QuackError(f"--out {config.out} is an existing file, not a store folder; give the store a directory")
    config.checked_devices()  # an accelerator or a rank count this machine lacks: refused before the store is touched


def _inputs(config: EncodeConfig) -> _Inputs:
    """Open the RUN's checkpoint (hashed on a thread meanwhile) and the prepared data; refuses a model trained
    with another tokenizer than the data's."""
    from quackae.model.checkpoints import load_model

    checkpoint, tokenizer_file = resolve_run(config.model)
    with _sha256_meanwhile(checkpoint) as checkpoint_sha256:
        dataset, data_tokenizer, model_tokenizer, model_hash = _open_inputs(config, checkpoint, tokenizer_file)
        model = load_model(str(checkpoint), tokenizer_sha256=model_hash)  # refuses another run's tokenizer
        digest = checkpoint_sha256()
    if config.png == "attention" and not decoder_trained(model.hparams):
        log.warning("--png attention: %s", UNTRAINED_DECODER)
    return _Inputs(checkpoint, digest, tokenizer_file, model_hash, dataset, data_tokenizer, model_tokenizer, model)


def _selection_and_header(config: EncodeConfig, inputs: _Inputs) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(selection, header)``: the selection rule's settings and the store's provenance (every path absolute:
    readers run from anywhere)."""
    model = inputs.model
    selection = {
        "filtered": config.filtered,
        "evaluate": config.evaluate,
        "label_field": config.label_field,
        "unlabeled_value": config.unlabeled_value,
        "reduce_label": _majority_label(inputs.dataset, config),
        "reduction_threshold": config.reduction_threshold,
        "seed": config.seed,
    }
    header = {
        "checkpoint": str(inputs.checkpoint.resolve()),
        "checkpoint_sha256": inputs.checkpoint_sha256,
        "tokenizer": str(inputs.tokenizer_file.resolve()),
        "tokenizer_sha256": inputs.tokenizer_sha256,
        "dataset": str(Path(config.data).resolve()),
        "dataset_rows": inputs.dataset.num_rows,
        "dataset_fingerprint": inputs.dataset.fingerprint,
        "layout": config.layout,
        "encoding_size": int(model.encoding_size),
        "pooling": model.pooling,  # what each stored encoding is (one of modelconfig.POOLINGS)
        "dtype": DTYPE,
        "text": config.text,
        "selection": selection,
        "model": {k: v for k, v in model.hparams.items()},
    }
    return selection, header


def _check_png_ids(config: EncodeConfig, selected_ids: np.ndarray) -> None:
    unknown = sorted(set(config.png_ids) - set(selected_ids.tolist()))
    if unknown:
        raise QuackError(
            f"--png-ids {' '.join(map(str, unknown[:5]))}: no item with this id in {config.data}"
            + (" among the items --filtered/--evaluate keep" if config.filtered or config.evaluate else "")
        )


def _writer(
    config: EncodeConfig,
    inputs: _Inputs,
    selection: dict[str, Any],
    header: dict[str, Any],
    job: StoreJob,
    existing: np.ndarray,
) -> AutoencoderWriter:
    return AutoencoderWriter(
        storage_path=Path(config.out),
        **selection,  # recorded in the manifest; the rows predicted (todo) are the ones the selection keeps
        png=config.png,
        png_limit=config.png_limit,
        png_ids=config.png_ids or None,
        threads=config.writer_threads,
        manifest={k: v for k, v in header.items() if k != "model"},
        layout=config.layout,
        shard_size=config.shard_size,
        schema=_metadata_schema(inputs.dataset),
        tokenizer=inputs.model_tokenizer,
        text=config.text,
        job=job,
        known_ids=existing,
    )


def _predict(config: EncodeConfig, inputs: _Inputs, writer: AutoencoderWriter, todo: np.ndarray) -> Any:
    """Encode the rows ``todo`` (sorted by length) into ``writer``; returns the Trainer that ran it."""
    import pytorch_lightning as pl

    from quackae.data.module import TokenizedDataModule

    datamodule = TokenizedDataModule(
        config.data,
        batch_size=config.batch_size or encode_batch_size(config.accelerator),
        num_workers=config.num_workers,
        pad_id=inputs.model.pad_id,
        predict_indices=todo,
        predict_attention=config.png == "attention",
        predict_pool=config.shard_size if layout_named(config.layout).buffered else 0,
        prepared=(inputs.dataset, inputs.data_tokenizer),
    )
    trainer = pl.Trainer(
        callbacks=[writer, progress_bar()],
        logger=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        enable_model_summary=False,
        inference_mode=True,
        **config.trainer_kwargs(),
    )
    if len(todo):
        try:
            trainer.predict(inputs.model, datamodule=datamodule, return_predictions=False)
        except SystemExit:
            # Lightning turns Ctrl-C into a graceful shutdown and then sys.exit(1): a stop like any other
            # stage's (exit 130); the shards committed so far stay, a rerun encodes the rest
            if not trainer.interrupted:
                raise
            raise KeyboardInterrupt from None
    elif trainer.is_global_zero:
        writer.write_manifest()
    return trainer
