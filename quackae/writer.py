"""``AutoencoderWriter``: the Lightning callback that stores each predicted item exactly once.

Batches leave the prediction thread right after one device-to-host copy and go through a bounded
queue (at most ``max_pending`` batches) to background writing. In the ``shards`` layout one writer
thread buffers rows and commits a shard of ``shard_size`` items at a time (Arrow columns built from
numpy in bulk); in the ``files`` layout ``threads`` threads write one ``.npz`` per item. Memory stays
flat: at most one shard plus the queued batches are held. Formats and commits live in
``quackae.layout``, the lock and the provenance header in ``quackae.storejob``, the label selection
in ``quackae.selection``. Glossary: B batch size, H encoding size, T tokens.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from pytorch_lightning.callbacks import BasePredictionWriter

from quackae.atomic import write_atomic
from quackae.errors import QuackError
from quackae.layout import (
    LAYOUTS,
    SHARDS,
    item_path,
    layout_of,
    npz_bytes,
    read_manifest,
    shard_table,
    write_shard,
)
from quackae.selection import is_labelled, keep_item
from quackae.storejob import StoreJob, fresh_job, remove_staging, stored_ids_checked, write_manifest

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 16_384

__all__ = [
    "AutoencoderWriter",
    "clean_temporary",
    "is_labelled",
    "item_path",
    "keep_item",
    "npz_bytes",
    "stored_ids",
    "write_atomic",
]


def clean_temporary(store: Path) -> int:
    """Delete the staging files stopped jobs left in ``store`` (only when no encode is live); returns how many."""
    return remove_staging(Path(store))


def stored_ids(store: str | Path) -> list[int]:
    """Ids of the sound items in ``store``, either layout, in id order (staging never counts)."""
    store = Path(store)
    if not store.is_dir():
        return []
    layout = layout_of(store, read_manifest(store))
    return stored_ids_checked(store, layout, None, None, move=False).tolist()


class AutoencoderWriter(BasePredictionWriter):
    """Stores each predicted item's encoding and metadata in ``storage_path`` (layout ``shards`` or ``files``).

    ``prediction`` is ``(metadata list, encoding (B, H))`` (optionally a third element with the
    attention for ``png="attention"``). Items already stored when the writer starts are skipped.
    ``schema`` gives the metadata columns' Arrow types (else they are inferred per batch);
    ``tokenizer`` with ``text`` adds a ``text`` column decoded from the batch's tokens when the
    metadata has none. An I/O error stops the job with a ``QuackError`` naming the file; every unit
    committed before stays valid. Under DDP each rank writes its own shards; rank 0 completes the
    manifest after every rank has finished.
    """

    def __init__(
        self,
        write_interval: str = "batch",
        storage_path: str | Path = "storage/store",
        filtered: bool = False,
        evaluate: bool = False,
        reduction_threshold: float = 1.0,
        *,
        label_field: str | None = None,
        unlabeled_value: Any = None,
        reduce_label: Any = None,
        seed: int = 0,
        png: str | None = None,
        png_limit: int = 1000,
        threads: int = 2,
        max_pending: int = 8,
        manifest: dict[str, Any] | None = None,
        layout: str = "shards",
        shard_size: int = DEFAULT_SHARD_SIZE,
        schema: Any = None,
        tokenizer: Any = None,
        text: bool = True,
        job: StoreJob | None = None,
        known_ids: np.ndarray | None = None,
    ) -> None:
        if write_interval != "batch":
            raise ValueError(
                "AutoencoderWriter writes per batch (write_interval='batch'); predictions are never gathered in memory"
            )
        if filtered and evaluate:
            raise ValueError(
                "filtered and evaluate exclude each other: filtered keeps labelled items, evaluate "
                "keeps unlabelled ones"
            )
        if (filtered or evaluate) and not label_field:
            raise ValueError("filtered/evaluate need a label field (--label-field)")
        if not 0.0 < reduction_threshold <= 1.0:
            raise ValueError(f"reduction_threshold must be in (0, 1], got {reduction_threshold}")
        if png not in (None, "attention", "encoding"):
            raise ValueError(f"png must be None, 'attention' or 'encoding', got {png!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        super().__init__(write_interval)
        self.storage_path = Path(storage_path)
        self.filtered = filtered
        self.evaluate = evaluate
        self.reduction_threshold = reduction_threshold
        self.label_field = label_field
        self.unlabeled_value = unlabeled_value
        self.reduce_label = reduce_label
        self.seed = seed
        self.png = png
        self.png_limit = png_limit
        self.layout = layout
        self.shard_size = shard_size
        self.threads = 1 if layout == "shards" else threads  # one thread owns the shard buffer
        self.max_pending = max_pending
        self.manifest = dict(manifest or {})
        self.schema = schema
        self.tokenizer = tokenizer
        self.text = text
        self.job = job
        self.written = 0
        self.skipped = 0
        self.filtered_out = 0
        self.shards_written = 0
        self._known = None if known_ids is None else np.sort(np.asarray(known_ids, dtype=np.int64))
        self._pool: ThreadPoolExecutor | None = None
        self._slots = threading.BoundedSemaphore(max_pending)
        self._folders: set[str] = set()
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._rank = 0
        self._job_id = job.job if job is not None else fresh_job()
        self._staging: Path | None = None
        self._buffer: list[tuple[np.ndarray, np.ndarray, Any]] = []
        self._buffered = 0
        self._sequence = 0
        self._size: int | None = None
        self._pngs = 0

    # -- lifecycle
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._rank = trainer.global_rank

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._start()

    def _start(self) -> None:
        if self._pool is not None:
            return
        self.storage_path.mkdir(parents=True, exist_ok=True)
        if self.job is not None:
            self._staging = self.job.staging(self._rank)
        else:
            self._staging = self.storage_path / ".staging" / f"{self._job_id}-{self._rank}"
            self._staging.mkdir(parents=True, exist_ok=True)
        if self.layout == "shards":
            (self.storage_path / SHARDS).mkdir(exist_ok=True)
        if self._known is None:
            self._known = stored_ids_checked(self.storage_path, self.layout, None, None, move=False)
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="quackae-writer")

    def write_on_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._raise_pending_error()
        metadata, encoding = prediction[0], prediction[1]
        extra = prediction[2] if len(prediction) > 2 else None
        matrix = encoding.detach().float().cpu().numpy()  # (B, H), one device-to-host copy per batch
        if extra is not None:
            extra = tuple(t.detach().float().cpu().numpy() for t in extra)
        tokens = None
        if self.text and self.tokenizer is not None and metadata and "text" not in metadata[0]:
            tokens = batch[1].cpu().numpy()  # (B, T) token ids for the text column
        self._submit(list(metadata), matrix, tokens, extra)

    def write_batch(self, metadata: list[dict[str, Any]], encodings: np.ndarray) -> None:
        """Store a batch outside Lightning (benchmarks, scripts): same path as during prediction."""
        self._start()
        self._raise_pending_error()
        self._submit(list(metadata), np.asarray(encodings, dtype=np.float32), None, None)

    def _submit(self, metadata: list[dict[str, Any]], matrix: np.ndarray, tokens: Any, extra: Any) -> None:
        assert self._pool is not None
        self._slots.acquire()  # bounded: at most max_pending batches wait for the disk
        future = self._pool.submit(self._write_batch, metadata, matrix, tokens, extra)
        future.add_done_callback(lambda _: self._slots.release())

    def keeps(self, metadata: dict[str, Any]) -> bool:
        """Whether this writer stores an item with ``metadata`` (``filtered`` / ``evaluate`` selection)."""
        return keep_item(
            metadata,
            filtered=self.filtered,
            evaluate=self.evaluate,
            label_field=self.label_field,
            unlabeled_value=self.unlabeled_value,
            reduce_label=self.reduce_label,
            reduction_threshold=self.reduction_threshold,
            seed=self.seed,
        )

    @property
    def selection(self) -> dict[str, Any]:
        return {
            "filtered": self.filtered,
            "evaluate": self.evaluate,
            "label_field": self.label_field,
            "unlabeled_value": self.unlabeled_value,
            "reduce_label": self.reduce_label,
            "reduction_threshold": self.reduction_threshold,
            "seed": self.seed,
        }

    # -- the background side
    def _write_batch(self, metadata: list[dict[str, Any]], matrix: np.ndarray, tokens: Any, extra: Any) -> None:
        if self._error is not None:
            return
        current = str(self.storage_path)
        try:
            keep = np.ones(len(metadata), dtype=bool)
            if self.label_field is not None and (self.filtered or self.evaluate):
                keep = np.fromiter((self.keeps(m) for m in metadata), dtype=bool, count=len(metadata))
            ids = np.fromiter((int(m["id"]) for m in metadata), dtype=np.int64, count=len(metadata))  # (B,)
            known = self._known
            if known is not None and len(known):
                found = np.searchsorted(known, ids).clip(max=len(known) - 1)
                stored = known[found] == ids
                skipped = int((stored & keep).sum())
                dropped = int((~keep).sum())
                keep &= ~stored
            else:
                skipped, dropped = 0, int((~keep).sum())
            rows = np.flatnonzero(keep)
            with self._lock:
                self.skipped += skipped
                self.filtered_out += dropped
            if not len(rows):
                return
            if len(rows) != len(metadata):
                metadata = [metadata[r] for r in rows]
                matrix = matrix[rows]  # (B', H)
                ids = ids[rows]
                tokens = None if tokens is None else tokens[rows]
                extra = None if extra is None else tuple(e[rows] for e in extra)
            texts = None
            if tokens is not None:
                texts = self.tokenizer.decode_batch(tokens.tolist(), skip_special_tokens=True)
            self._size = int(matrix.shape[1])
            self._write_pngs(ids, matrix, extra)
            if self.layout == "shards":
                current = str(self.storage_path / SHARDS)
                self._buffer_rows(ids, matrix, metadata, texts)
            else:
                self._write_items(ids, matrix, metadata, texts)
        except (OSError, QuackError) as error:
            with self._lock:
                if self._error is None:
                    where = getattr(error, "filename", None) or current
                    reason = getattr(error, "strerror", None) or error
                    self._error = QuackError(
                        f"writing {where} failed: {reason}; items committed so far are complete, "
                        "rerun the same command to finish"
                    )
        except BaseException as error:  # a bug: it stops the job and surfaces with its own traceback
            with self._lock:
                if self._error is None:
                    self._error = error

    def _buffer_rows(self, ids: np.ndarray, matrix: np.ndarray, metadata: list[dict[str, Any]], texts: Any) -> None:
        import pyarrow as pa

        if self.schema is not None:  # one typed array per column (from_pylist with a schema is 100x slower)
            columns = pa.table({f.name: pa.array([m.get(f.name) for m in metadata], type=f.type) for f in self.schema})
        else:
            columns = pa.Table.from_pylist(metadata)
        if texts is not None:
            columns = columns.append_column("text", pa.array(texts, type=pa.string()))
        if not self.text and "text" in columns.column_names:
            columns = columns.drop_columns(["text"])
        self._buffer.append((ids, matrix, columns))
        self._buffered += len(ids)
        while self._buffered >= self.shard_size:
            self._commit_shard(self.shard_size)

    def _commit_shard(self, count: int) -> None:
        """Commit the first ``count`` buffered rows as one shard; the rest stays buffered."""
        import pyarrow as pa

        ids = np.concatenate([b[0] for b in self._buffer])  # (N,)
        matrix = np.concatenate([b[1] for b in self._buffer])  # (N, H)
        columns = pa.concat_tables([b[2] for b in self._buffer], promote_options="permissive")
        table = shard_table(ids[:count], matrix[:count], columns.slice(0, count), self.manifest or None)
        self._sequence += 1
        name = f"{self._job_id}-{self._rank:05d}-{self._sequence:06d}.arrow"
        assert self._staging is not None
        write_shard(table, self._staging, self.storage_path / SHARDS, name)
        self._buffer = [(ids[count:], matrix[count:], columns.slice(count))] if len(ids) > count else []
        self._buffered = len(ids) - count
        with self._lock:
            self.written += count
            self.shards_written += 1

    def _write_items(self, ids: np.ndarray, matrix: np.ndarray, metadata: list[dict[str, Any]], texts: Any) -> None:
        assert self._staging is not None
        written = 0
        for row, meta in enumerate(metadata):
            index = int(ids[row])
            folder = f"{self.storage_path}/{item_path(index, dir_only=True)}"
            if folder not in self._folders:
                os.makedirs(folder, exist_ok=True)
                self._folders.add(folder)
            if texts is not None:
                meta = {**meta, "text": texts[row]}
            elif not self.text and "text" in meta:
                meta = {k: v for k, v in meta.items() if k != "text"}
            payload = npz_bytes(matrix[row], json.dumps(meta, ensure_ascii=False, default=str))
            write_atomic(f"{folder}/{index}.npz", payload, self._staging, durable=False)
            written += 1
        with self._lock:
            self.written += written

    def _write_pngs(self, ids: np.ndarray, matrix: np.ndarray, extra: Any) -> None:
        if self.png is None:
            return
        with self._lock:  # writer threads share the limit: reserve this batch's share first
            count = max(0, min(len(ids), self.png_limit - self._pngs))
            self._pngs += count
        if not count:
            return
        from quackae.render import encoding_image, item_attention_image, save_png
        from quackae.tokenizer import special_ids

        assert self._staging is not None
        for row in range(count):
            index = int(ids[row])
            if self.png == "attention" and extra is not None and self.tokenizer is not None:
                weights, output_ids, input_ids = (e[row] for e in extra)  # (S, T), (S,), (T,)
                special = special_ids(self.tokenizer)
                image = item_attention_image(self.tokenizer, weights, input_ids, output_ids, special.pad, special.eos)
            else:
                image = encoding_image(matrix[row])
            buffer = io.BytesIO()
            save_png(image, buffer)
            folder = self.storage_path / item_path(index, dir_only=True)
            folder.mkdir(parents=True, exist_ok=True)
            write_atomic(folder / f"{index}.png", buffer.getvalue(), self._staging, durable=False)

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            self._shutdown(wait=True)
            raise self._error

    def _shutdown(self, wait: bool) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=not wait)
            self._pool = None

    def _drop_staging(self) -> None:
        if self._staging is None:
            return
        if self.job is not None:
            self.job.drop_staging(self._rank)
        else:
            import shutil

            shutil.rmtree(self._staging, ignore_errors=True)
            try:
                self._staging.parent.rmdir()
            except OSError:
                pass
        self._staging = None

    def flush(self) -> None:
        """Wait for every queued write, commit the last partial shard, remove staging; raises the first I/O error."""
        self._shutdown(wait=True)
        if self._error is None and self._buffered:
            try:
                self._commit_shard(self._buffered)
            except (OSError, QuackError) as error:
                self._error = QuackError(
                    f"writing the last shard of {self.storage_path} failed: {error}; rerun the same command to finish"
                )
        self._drop_staging()
        if self._error is not None:
            raise self._error

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        self.flush()
        trainer.strategy.barrier("quackae-writer-done")
        if trainer.is_global_zero:
            self.write_manifest()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._shutdown(wait=True)
        self._drop_staging()

    def write_manifest(self) -> dict[str, Any]:
        """Mark the store complete: ``manifest.json`` with the item count, provenance and selection."""
        previous = read_manifest(self.storage_path) or {}
        ids = stored_ids_checked(self.storage_path, self.layout, None, None, move=False)
        size = self._size or previous.get("encoding_size") or self.manifest.get("encoding_size")
        manifest = {
            **previous,
            "format": "quackae-store-2",
            "layout": self.layout,
            "dtype": "float32",
            "encoding_size": size,
            **self.manifest,
            "items": int(len(ids)),
            "complete": True,
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        manifest.setdefault("selection", self.selection)
        if self.layout == "files":
            manifest["item_path"] = "{id // 100000}/{id % 100000 // 1000}/{id}.npz"
        staging = self.storage_path / ".staging" / f"{self._job_id}-manifest"
        staging.mkdir(parents=True, exist_ok=True)
        try:
            write_manifest(self.storage_path, manifest, staging)
        finally:
            staging.rmdir()
            try:
                staging.parent.rmdir()
            except OSError:
                pass
        return manifest
