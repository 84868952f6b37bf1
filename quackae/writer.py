"""``AutoencoderWriter``: the Lightning callback that stores each predicted item exactly once.

Batches (metadata as Arrow columns, encodings after one device-to-host copy, overlapped on a GPU:
``quackae.transfer``) leave the prediction thread through a bounded queue (``max_pending`` batches), each
when the next batch starts, so the writer thread's Python overlaps the model rather than the loader.
``shards``: the writer thread checks each batch (selection, finite encodings) and keeps it in a shard buffer
without copying; each full one goes to ``COMMITTERS`` threads that put its rows in id order (the one copy)
and write and fsync it, so memory stays flat (``COMMITTERS + 1`` shards and the queue). When the model
computes on every CPU core that check runs on the prediction thread between batches (``background``): a
writer thread there would stall the model. ``files``: ``threads`` threads write one ``.npz`` per item.
Formats and commits: ``quackae.layout``; lock and provenance: ``quackae.storejob``. Glossary: B batch, H encoding.
"""

from __future__ import annotations

import logging
import threading
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
    ShardBuffer,
    column_names,
    item_path,
    metadata_table,
    npz_bytes,
    shard_table,
    write_items,
    write_shard,
)
from quackae.selection import is_labelled, keep_item, selected_mask
from quackae.storejob import StoreJob, clean_temporary, complete_manifest, fresh_job, stored_ids, stored_ids_checked
from quackae.tokenizer import BatchDecoder
from quackae.transfer import host_array, non_finite_error, to_host

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 16_384
COMMITTERS = 2  # threads that write and fsync full shards

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


class AutoencoderWriter(BasePredictionWriter):
    """Stores each predicted item's encoding and metadata in ``storage_path`` (layout ``shards`` or ``files``).

    ``prediction`` is ``(metadata, encoding (B, H))`` (optionally a third element with the attention for
    ``png="attention"``); ``metadata`` is a ``pyarrow.Table`` (what ``TokenizedDataModule`` gives), a
    dict of columns or a list of per-item dicts, each with an ``id``. Items already stored when the writer
    starts are skipped. ``schema`` gives the metadata columns' Arrow types (else they are inferred per batch);
    ``tokenizer`` with ``text`` adds a ``text`` column decoded from the batch's tokens when the metadata has
    none. ``png_ids``: draw only these items' pictures (at most ``png_limit``). An I/O error stops the job with
    a ``QuackError`` naming the file; every unit committed before stays valid. Under DDP each rank writes its
    own shards; rank 0 completes the manifest after every rank has finished.
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
        png_ids: Any = None,
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
        background: bool | None = None,
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
        self.png_ids = None if png_ids is None else np.unique(np.asarray(png_ids, dtype=np.int64))  # None: any
        self.layout = layout
        self.shard_size = shard_size
        self.threads = 1 if layout == "shards" else threads  # one thread owns the shard buffer
        self.max_pending = max_pending
        self.manifest = dict(manifest or {})
        self.schema = schema
        self.tokenizer = tokenizer
        self.text = text
        self.job = job
        # batches are stored by a writer thread (True) or on the calling thread between batches (False); None:
        # a thread, unless the shards layout runs with the model computing on every core
        # (``runtime.cores_to_spare``), decided when prediction starts (``write_batch`` alone: a thread).
        # Shards are written and fsynced by their own threads either way.
        self.background = background
        self._inline = background is False
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
        # COMMITTERS + 1 shard buffers, filled in turn: one fills while the others' shards are written and
        # fsynced by COMMITTERS threads (one shard's fsync waits on the disk while the next is written)
        self._buffers: list[ShardBuffer] = []
        self._active = 0
        self._committer: ThreadPoolExecutor | None = None
        self._sequence = 0
        self._size: int | None = None
        self._pngs = 0
        self._held: tuple[Any, ...] | None = None  # a finished batch, queued when the next one starts
        self._decoder: BatchDecoder | None = None  # the text column's decoder, built at the first batch

    # -- lifecycle
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._rank = trainer.global_rank

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        if self.background is None:
            from quackae.runtime import cores_to_spare

            self._inline = self.layout == "shards" and not cores_to_spare(trainer)
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
        if self.layout == "shards":
            self._committer = ThreadPoolExecutor(max_workers=COMMITTERS, thread_name_prefix="quackae-commit")

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
        matrix = to_host(encoding)  # (B, H): one device-to-host copy per batch, waited for on the writer's side
        if extra is not None:
            extra = tuple(t.detach().float().cpu().numpy() for t in extra)
        tokens = None
        if self.text and self.tokenizer is not None and "text" not in column_names(metadata):
            tokens = batch[1].cpu().numpy()  # (B, T) token ids for the text column
        self._hand_over()
        self._held = (metadata, matrix, tokens, extra)

    def on_predict_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._hand_over()

    def _hand_over(self) -> None:
        """Queue the batch held back since the last batch ended.

        A finished batch is queued when the next one starts, after the loader has fetched and padded it:
        the writer thread's Python then runs while the model computes (torch holds no GIL there), not
        while the prediction thread fetches, which it would slow down waiting on the GIL.
        """
        if self._held is not None:
            held, self._held = self._held, None
            self._submit(*held)

    def write_batch(self, metadata: Any, encodings: np.ndarray) -> None:
        """Store a batch outside Lightning (benchmarks, scripts): same path as during prediction.

        ``metadata``: a ``pyarrow.Table``/``RecordBatch``, a dict of columns or a list of dicts, with ``id``.
        """
        self._start()
        self._raise_pending_error()
        if isinstance(metadata, (list, tuple)):
            metadata = list(metadata)
        self._submit(metadata, np.array(encodings, dtype=np.float32), None, None)  # a copy: the caller may reuse its

    def _submit(self, metadata: Any, matrix: np.ndarray, tokens: Any, extra: Any) -> None:
        if self._inline:
            self._write_batch(metadata, matrix, tokens, extra)
            self._raise_pending_error()
            return
        assert self._pool is not None
        self._slots.acquire()  # bounded: at most max_pending batches wait for the disk
        future = self._pool.submit(self._write_batch, metadata, matrix, tokens, extra)
        future.add_done_callback(lambda _: self._slots.release())

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
    def _write_batch(self, metadata: Any, matrix: np.ndarray, tokens: Any, extra: Any) -> None:
        if self._error is not None:
            return
        current = str(self.storage_path)
        try:
            matrix = host_array(matrix)  # (B, H) float32, once its device-to-host copy is done
            columns = metadata_table(metadata, self.schema)  # pyarrow.Table, one row per item
            if "id" not in columns.column_names:
                raise ValueError("every item's metadata needs an 'id'")
            if columns.num_rows != len(matrix):
                raise ValueError(f"{columns.num_rows} metadata rows for {len(matrix)} encodings")
            ids = columns.column("id").to_numpy().astype(np.int64, copy=False)  # (B,)
            keep = np.ones(len(ids), dtype=bool)
            if self.label_field is not None and (self.filtered or self.evaluate):
                labels = (
                    columns.column(self.label_field).to_pylist()
                    if self.label_field in columns.column_names
                    else [None] * len(ids)
                )
                keep = selected_mask(ids.tolist(), labels, self.selection)
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
            error = non_finite_error(ids, matrix, self.manifest.get("checkpoint"))
            if error is not None:  # nothing of the batch is stored, nor the rest of its shard
                self._fail(error)
                return
            with self._lock:
                self.skipped += skipped
                self.filtered_out += dropped
            if not len(rows):
                return
            if len(rows) != len(ids):
                columns = columns.take(rows)
                matrix = matrix[rows]  # (B', H)
                ids = ids[rows]
                tokens = None if tokens is None else tokens[rows]
                extra = None if extra is None else tuple(e[rows] for e in extra)
            texts = None
            if tokens is not None:
                if self._decoder is None:
                    self._decoder = BatchDecoder(self.tokenizer)
                texts = self._decoder(tokens)  # pyarrow string array (B',)
            self._size = int(matrix.shape[1])
            self._write_pngs(ids, matrix, extra)
            if self.layout == "shards":
                current = str(self.storage_path / SHARDS)
                self._buffer_rows(ids, matrix, columns, texts)
            else:
                self._write_items(ids, matrix, columns.to_pylist(), texts)
        except (OSError, QuackError) as error:
            where = getattr(error, "filename", None) or current
            reason = getattr(error, "strerror", None) or error
            self._fail(
                QuackError(
                    f"writing {where} failed: {reason}; items committed so far are complete, "
                    "rerun the same command to finish"
                )
            )
        except BaseException as error:  # a bug: it stops the job and surfaces with its own traceback
            self._fail(error)

    def _fail(self, error: BaseException) -> None:
        """Keep the job's first error; the prediction thread raises it at its next batch (or at the end)."""
        with self._lock:
            if self._error is None:
                self._error = error

    def _buffer_rows(self, ids: np.ndarray, matrix: np.ndarray, columns: Any, texts: Any) -> None:
        """Copy a batch's rows into the filling shard buffer; a full buffer goes to the committer."""
        if texts is not None:
            columns = columns.append_column("text", texts)
        if not self.text and "text" in columns.column_names:
            columns = columns.drop_columns(["text"])
        if not self._buffers:
            self._buffers = [ShardBuffer(self.shard_size, matrix.shape[1]) for _ in range(COMMITTERS + 1)]
        start = 0
        while start < len(ids):
            buffer = self._buffers[self._active]
            buffer.wait()  # its previous shard must be on disk before its memory is reused
            take = buffer.add(ids, matrix, columns, start)
            start += take
            if buffer.fill == self.shard_size:
                self._commit_buffer(buffer)
                self._active = (self._active + 1) % len(self._buffers)

    def _commit_buffer(self, buffer: ShardBuffer) -> None:
        """Hand ``buffer``'s rows to a committer thread, which puts them in id order and writes them as one shard;
        ``buffer.wait()`` returns once it is committed."""
        count, pieces = buffer.fill, buffer.detach()
        self._sequence += 1
        name = f"{self._job_id}-{self._rank:05d}-{self._sequence:06d}.arrow"
        assert self._staging is not None and self._committer is not None
        staging, shards, provenance = self._staging, self.storage_path / SHARDS, self.manifest or None

        def commit() -> None:
            ids, matrix, columns = buffer.rows(pieces)  # in id order, in the buffer's own memory
            write_shard(shard_table(ids, matrix, columns, provenance), staging, shards, name)
            with self._lock:
                self.written += count
                self.shards_written += 1

        buffer.pending = self._committer.submit(commit)

    def _write_items(self, ids: np.ndarray, matrix: np.ndarray, metadata: list[dict[str, Any]], texts: Any) -> None:
        assert self._staging is not None
        written = write_items(
            self.storage_path, ids, matrix, metadata, texts, self.text, self._staging, self._folders, self.manifest
        )
        with self._lock:
            self.written += written

    def _write_pngs(self, ids: np.ndarray, matrix: np.ndarray, extra: Any) -> None:
        if self.png is None:
            return
        rows = np.arange(len(ids)) if self.png_ids is None else np.flatnonzero(np.isin(ids, self.png_ids))
        with self._lock:  # writer threads share the limit: reserve this batch's share first
            count = max(0, min(len(rows), self.png_limit - self._pngs))
            self._pngs += count
        if not count:
            return
        from quackae.render import item_png

        assert self._staging is not None
        for row in rows[:count].tolist():
            index = int(ids[row])
            attention = tuple(e[row] for e in extra) if self.png == "attention" and extra is not None else None
            payload = item_png(matrix[row], attention, self.tokenizer)
            folder = self.storage_path / item_path(index, dir_only=True)
            folder.mkdir(parents=True, exist_ok=True)
            write_atomic(folder / f"{index}.png", payload, self._staging, durable=False)

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            self._shutdown(wait=True)
            self._stop_committer()
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
        if self._pool is not None and self._error is None:
            self._hand_over()
        self._shutdown(wait=True)
        try:
            if self._error is None and self._buffers and self._buffers[self._active].fill:
                self._commit_buffer(self._buffers[self._active])
            for buffer in self._buffers:
                buffer.wait()
        except (OSError, QuackError) as error:
            if self._error is None:
                self._error = QuackError(
                    f"writing a shard of {self.storage_path} failed: {error}; rerun the same command to finish"
                )
        self._buffers = []
        self._stop_committer()
        self._drop_staging()
        if self._error is not None:
            raise self._error

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        self.flush()
        trainer.strategy.barrier("quackae-writer-done")
        if trainer.is_global_zero:
            self.write_manifest()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._held = None
        self._shutdown(wait=True)
        self._stop_committer()
        self._drop_staging()

    def _stop_committer(self) -> None:
        """Let the shards being written finish whole; nothing new starts."""
        if self._committer is not None:
            self._committer.shutdown(wait=True)
            self._committer = None

    def write_manifest(self) -> dict[str, Any]:
        """Mark the store complete: ``manifest.json`` with the item count, provenance and selection."""
        return complete_manifest(
            self.storage_path, self.layout, self._size, self.manifest, self.selection, self._job_id
        )
