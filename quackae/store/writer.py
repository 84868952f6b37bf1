"""``AutoencoderWriter``: the Lightning callback that stores each predicted item exactly once.

Batches (metadata as Arrow columns, encodings after one device-to-host copy, overlapped on a GPU:
``quackae.store.transfer``) leave the prediction thread through a bounded queue (``max_pending`` batches), each
when the next batch starts, so the writer thread's Python overlaps the model rather than the loader.
The writer stores each row not stored yet that its selection keeps (``quackae.data.selection``).
A buffered layout (``shards``): the writer thread checks each batch (finite encodings) and keeps it in a shard
buffer without copying; each full one goes to ``COMMITTERS`` threads that put its rows in id order (the one
copy) and commit it, so memory stays flat (``COMMITTERS + 1`` shards and the queue). When the model computes
on every CPU core that check runs on the prediction thread between batches (``background``): a writer thread
there would stall the model. Other layouts (``files``): ``threads`` threads commit each batch as it comes.
Units and commits: the layout (``quackae.store.layout``); lock, provenance: ``quackae.store.job``. B batch, H encoding.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from pytorch_lightning.callbacks import BasePredictionWriter

from quackae.core.errors import QuackError
from quackae.data.selection import batch_selection
from quackae.data.tokenizer import BatchDecoder
from quackae.store.items import write_pngs
from quackae.store.job import complete_manifest, every_rank_done, stored_ids_checked
from quackae.store.layout import layout_named
from quackae.store.manifest import staging_folder
from quackae.store.options import WRITER_FIELDS, WriterOptions
from quackae.store.shards import ShardBuffer, column_names, metadata_table
from quackae.store.transfer import host_array, non_finite_error, to_host

log = logging.getLogger(__name__)

COMMITTERS = 2  # threads that write and fsync full shards


class AutoencoderWriter(BasePredictionWriter):
    """Stores each predicted item's encoding and metadata in ``storage_path`` (in the layout ``layout`` names).

    ``prediction`` is ``(metadata, encoding (B, H))`` (optionally a third element with the attention for
    ``png="attention"``); ``metadata`` is a ``pyarrow.Table`` (what ``TokenizedDataModule`` gives), a
    dict of columns or a list of per-item dicts, each with an ``id``. Items already stored when the writer
    starts are skipped. ``schema`` gives the metadata columns' Arrow types (else they are inferred per batch);
    ``tokenizer`` with ``text`` adds a ``text`` column decoded from the batch's tokens when the metadata has
    none. The selection (``filtered``, ``evaluate``, ...) is recorded in the manifest; the rows predicted
    are the ones stored. ``png_ids``: draw only these items' pictures (at most ``png_limit``). An I/O error
    stops the job with a ``QuackError`` naming the file; every unit committed before stays valid. Under DDP
    each rank writes its own units; rank 0 completes the manifest after every rank has finished.
    """

    def __init__(
        self,
        write_interval: str = "batch",
        storage_path: str | Path = "storage/store",
        filtered: bool = False,
        evaluate: bool = False,
        reduction_threshold: float = 1.0,
        *,
        options: WriterOptions | None = None,
        **settings: Any,
    ) -> None:
        """``settings``: the fields of ``WriterOptions`` by name (or the whole ``options``), checked there."""
        if write_interval != "batch":
            raise ValueError(
                "AutoencoderWriter writes per batch (write_interval='batch'); predictions are never gathered in memory"
            )
        options = dataclasses.replace(options or WriterOptions(), **settings)
        given = {"filtered": filtered, "evaluate": evaluate, "reduction_threshold": reduction_threshold}
        if given != {"filtered": False, "evaluate": False, "reduction_threshold": 1.0}:  # the positional ones
            options = dataclasses.replace(options, **given)
        super().__init__(write_interval)
        self.storage_path = Path(storage_path)
        self.options = options
        for name in WRITER_FIELDS:  # the options, as the attributes the writer's threads read
            setattr(self, name, getattr(options, name))
        self.png_ids = None if options.png_ids is None else np.unique(np.asarray(options.png_ids, dtype=np.int64))
        self._layout = layout_named(options.layout)
        self.threads = 1 if self._layout.buffered else options.threads  # one thread owns the shard buffer
        self.manifest = dict(options.manifest or {})
        # batches are stored by a writer thread (True) or on the calling thread between batches (False); None:
        # a thread, unless a buffered layout runs with the model computing on every core
        # (``runtime.cores_to_spare``), decided when prediction starts (``write_batch`` alone: a thread).
        # Shards are written and fsynced by their own threads either way.
        self._inline = options.background is False
        self.written = 0
        self.skipped = 0
        self.filtered_out = 0  # rows of the batches given that the selection leaves out
        self.shards_written = 0
        known_ids = options.known_ids
        self._known = None if known_ids is None else np.sort(np.asarray(known_ids, dtype=np.int64))
        self._pool: ThreadPoolExecutor | None = None
        self._slots = threading.BoundedSemaphore(options.max_pending)
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._rank = 0
        self._job_id = options.job.job if options.job is not None else uuid.uuid4().hex[:12]
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
            from quackae.core.cores import cores_to_spare

            self._inline = self._layout.buffered and not cores_to_spare(trainer)
        self._start()

    def _start(self) -> None:
        if self._pool is not None:
            return
        self.storage_path.mkdir(parents=True, exist_ok=True)
        if self.job is not None:
            self._staging = self.job.staging(self._rank)
        else:
            self._staging = staging_folder(self.storage_path, self._job_id, self._rank)
            self._staging.mkdir(parents=True, exist_ok=True)
        self._layout.prepare(self.storage_path)
        if self._known is None:
            self._known = stored_ids_checked(self.storage_path, self._layout, None, None, move=False)
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="quackae-writer")
        if self._layout.buffered:
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
            selected = batch_selection(ids, columns, self.options.selection)  # encode gives selected rows only
            error = non_finite_error(ids, matrix, self.manifest.get("checkpoint"))
            if error is not None:  # nothing of the batch is stored, nor the rest of its shard
                self._fail(error)
                return
            fresh = self._not_stored(ids)  # (B,) not stored yet
            with self._lock:
                self.skipped += int((selected & ~fresh).sum())  # kept by the selection, stored already
                self.filtered_out += int((~selected).sum())
            rows = np.flatnonzero(selected & fresh)
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
            columns = self._text_column(columns, texts)
            if self._layout.buffered:
                self._buffer_rows(ids, matrix, columns)
            else:
                self._commit_rows(ids, matrix, columns)
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

    def _not_stored(self, ids: np.ndarray) -> np.ndarray:
        """Which of the batch's ``ids`` (B,) are not among the ids stored when the job started (B,) bool."""
        known = self._known
        if known is None or not len(known):
            return np.ones(len(ids), dtype=bool)
        found = np.searchsorted(known, ids).clip(max=len(known) - 1)
        return known[found] != ids

    def _text_column(self, columns: Any, texts: Any) -> Any:
        """The batch's metadata with its decoded ``texts`` (strings, or None) as ``text``; none if no text kept."""
        if texts is not None:
            columns = columns.append_column("text", texts)
        if not self.text and "text" in columns.column_names:
            columns = columns.drop_columns(["text"])
        return columns

    def _buffer_rows(self, ids: np.ndarray, matrix: np.ndarray, columns: Any) -> None:
        """Copy a batch's rows into the filling shard buffer; a full buffer goes to the committer."""
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
        """A committer thread puts ``buffer``'s rows in id order, writes one shard, then ``buffer.wait()`` returns."""
        count, pieces = buffer.fill, buffer.detach()
        self._sequence += 1
        name = f"{self._job_id}-{self._rank:05d}-{self._sequence:06d}.arrow"
        assert self._staging is not None and self._committer is not None
        staging, header = self._staging, self.manifest

        def commit() -> None:
            ids, matrix, columns = buffer.rows(pieces)  # in id order, in the buffer's own memory
            self._layout.commit(self.storage_path, staging, name, ids, matrix, columns, header)
            with self._lock:
                self.written += count
                self.shards_written += 1

        buffer.pending = self._committer.submit(commit)

    def _commit_rows(self, ids: np.ndarray, matrix: np.ndarray, columns: Any) -> None:
        assert self._staging is not None
        written = self._layout.commit(self.storage_path, self._staging, "", ids, matrix, columns, self.manifest)
        with self._lock:
            self.written += written

    def _write_pngs(self, ids: np.ndarray, matrix: np.ndarray, extra: Any) -> None:
        if self.png is None:
            return
        rows = np.arange(len(ids)) if self.png_ids is None else np.flatnonzero(np.isin(ids, self.png_ids))
        with self._lock:  # writer threads share the limit: reserve this batch's share first
            count = max(0, min(len(rows), self.png_limit - self._pngs))
            self._pngs += count
        if count:
            assert self._staging is not None
            chosen = rows[:count]  # (count,) positions in the batch
            extra = None if extra is None else tuple(e[chosen] for e in extra)
            write_pngs(self.storage_path, self._staging, ids[chosen], matrix[chosen], extra, self.png, self.tokenizer)

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
        every_rank_done(trainer)
        if trainer.is_global_zero:
            self.write_manifest()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._held = None
        self._shutdown(wait=True)
        self._stop_committer()
        self._drop_staging()

    def _stop_committer(self) -> None:  # the shards being written finish whole; nothing new starts
        if self._committer is not None:
            self._committer.shutdown(wait=True)
            self._committer = None

    def write_manifest(self) -> dict[str, Any]:
        """Mark the store complete: ``manifest.json`` with the item count, provenance and selection; under a job,
        only once the store holds each id encode's selection keeps exactly once (``job.expected``)."""
        expected = None if self.job is None else self.job.expected
        return complete_manifest(
            self.storage_path, self._layout, self._size, self.manifest, self.options.selection, self._job_id, expected
        )
