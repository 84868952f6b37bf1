"""Where stored items live (``item_path``) and how they get there (``AutoencoderWriter``).

Each item is one ``.npz`` at ``STORE/item_path(id, "npz")`` holding ``encoding`` (float32, (H,))
and ``metadata`` (a 0-d unicode array with a JSON string); ``numpy.load(path, allow_pickle=False)``
reads it, so a store can never execute code. Writes are atomic (a hidden temporary file in the
same folder, then ``os.replace``), happen on a bounded background thread pool, and skip items
already present, so a rerun of a killed job completes it without duplicating or losing items.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np
from pytorch_lightning.callbacks import BasePredictionWriter

from quackae.errors import QuackError

log = logging.getLogger(__name__)

STAGING = ".staging"  # STORE/.staging/{rank}-{pid}-{thread}/{id}.npz.part while an item is written


def item_path(index: int, suffix: str = "png", dir_only: bool = False, is_collection: bool = False) -> str:
    """Relative path of item ``index``: ``f"{index // 100000}/{index % 100000 // 1000}/{index}.{suffix}"``.

    At most 1000 items share a folder. With ``is_collection`` the item gets a folder of its own
    (``.../{index}/{index}.{suffix}``); ``dir_only`` returns only the enclosing folder. Raises
    ``ValueError`` for a negative or non-integer index.
    """
    if isinstance(index, bool) or not isinstance(index, Integral) or index < 0:
        raise ValueError(f"item index must be a non-negative integer, got {index!r}")
    index = int(index)
    folder = f"{index // 100000}/{index % 100000 // 1000}"
    if is_collection:
        folder = f"{folder}/{index}"
    if dir_only:
        return folder
    return f"{folder}/{index}.{suffix}"


# ---------------------------------------------------------------------------------------------- npz bytes
_DOS_DATE = (1 << 5) | 1  # 1980-01-01, a fixed timestamp keeps identical items byte-identical


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    )
    return buffer.getvalue()


_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}


def _cached_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    key = (dtype.str, shape)
    header = _HEADERS.get(key)
    if header is None:
        header = _HEADERS[key] = _npy_header(dtype, shape)
    return header


def npz_bytes(encoding: np.ndarray, metadata_json: str) -> bytes:
    """The bytes of an uncompressed ``.npz`` with ``encoding`` and ``metadata`` (as ``numpy.savez`` would store).

    Built directly (zip local headers, data, central directory) instead of through ``zipfile``:
    the writer's hot path. ``tests/test_writer.py`` checks it against ``numpy.savez``.
    """
    encoding = np.ascontiguousarray(encoding, dtype=np.float32)
    text = metadata_json.encode("utf-32-le")
    members = (
        (b"encoding.npy", _cached_header(encoding.dtype, encoding.shape) + encoding.tobytes()),
        (
            b"metadata.npy",
            _cached_header(np.dtype(f"<U{max(len(text) // 4, 1)}"), ()) + (text if text else b"\0\0\0\0"),
        ),
    )
    local, central, offset = [], [], 0
    for name, data in members:
        crc = zlib.crc32(data)
        size = len(data)
        header = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, _DOS_DATE, crc, size, size, len(name), 0)
        local.append(header + name + data)
        central.append(
            struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50,
                20,
                20,
                0,
                0,
                0,
                _DOS_DATE,
                crc,
                size,
                size,
                len(name),
                0,
                0,
                0,
                0,
                0o600 << 16,
                offset,
            )
            + name
        )
        offset += len(header) + len(name) + size
    directory = b"".join(central)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(directory), offset, 0)
    return b"".join(local) + directory + end


def write_atomic(path: str | Path, data: bytes, staging: str | Path) -> None:
    """Write ``data`` to ``path`` atomically: a file in the ``staging`` folder (same file system), then
    ``os.replace``. Readers see the whole item or nothing; a killed writer leaves only staging files.

    Staging folders are per writer thread, so file creation never contends for the lock of the
    item's folder (one rename touches it): on this project's disks that is faster than creating
    the item in place, as the original writer did.
    """
    tmp = os.path.join(staging, os.path.basename(path) + ".part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)


def clean_temporary(store: Path) -> int:
    """Delete the staging files a killed run left in ``store``; returns how many."""
    staging = Path(store) / STAGING
    if not staging.is_dir():
        return 0
    removed = sum(len(files) for _, _, files in os.walk(staging))
    shutil.rmtree(staging)
    return removed


def stored_ids(store: Path, suffix: str = "npz") -> list[int]:
    """Ids of the complete items in ``store`` (temporary files never count)."""
    ids = []
    if not store.is_dir():
        return ids
    end = f".{suffix}"
    for _, folders, files in os.walk(store):
        folders[:] = [f for f in folders if not f.startswith(".")]  # staging never holds items
        for name in files:
            if name.endswith(end) and not name.startswith("."):
                stem = name[: -len(end)]
                if stem.isdigit():
                    ids.append(int(stem))
    ids.sort()
    return ids


# ---------------------------------------------------------------------------------------------- selection
def is_labelled(metadata: dict[str, Any], label_field: str, unlabeled_value: Any) -> bool:
    value = metadata.get(label_field)
    return value is not None and value != unlabeled_value and str(value) != str(unlabeled_value)


def keep_item(
    metadata: dict[str, Any],
    *,
    filtered: bool,
    evaluate: bool,
    label_field: str | None,
    unlabeled_value: Any = None,
    reduce_label: Any = None,
    reduction_threshold: float = 1.0,
    seed: int = 0,
) -> bool:
    """Whether the writer stores this item.

    ``evaluate`` keeps only unlabelled items; ``filtered`` keeps only labelled ones, and keeps an
    item of class ``reduce_label`` with probability ``reduction_threshold`` (a hash of seed and id,
    so a rerun makes the same choice).
    """
    if label_field is None or not (filtered or evaluate):
        return True
    labelled = is_labelled(metadata, label_field, unlabeled_value)
    if evaluate:
        return not labelled
    if not labelled:
        return False
    if reduction_threshold < 1.0 and reduce_label is not None and str(metadata.get(label_field)) == str(reduce_label):
        digest = hashlib.blake2b(f"{seed}:{metadata['id']}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64 < reduction_threshold
    return True


# ---------------------------------------------------------------------------------------------- the writer
class AutoencoderWriter(BasePredictionWriter):
    """Stores each predicted item's encoding and metadata at ``storage_path/item_path(id, "npz")``.

    ``prediction`` is ``(metadata list, encoding (B, H))`` (optionally a third element with greedy
    tokens and attention for ``png="attention"``). Items already stored are skipped. Writing runs on
    ``threads`` background threads with at most ``max_pending`` batches queued; an I/O error stops
    the job with a ``QuackError`` naming the file, and every item written before stays valid. Under
    DDP each rank writes only the items of its own batches; rank 0 writes ``manifest.json`` after
    every rank has finished.
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
        threads: int = 2,
        max_pending: int = 8,
        manifest: dict[str, Any] | None = None,
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
        self.threads = threads
        self.max_pending = max_pending
        self.manifest = dict(manifest or {})
        self.written = 0
        self.skipped = 0
        self.filtered_out = 0
        self._pool: ThreadPoolExecutor | None = None
        self._slots = threading.BoundedSemaphore(max_pending)
        self._folders: set[str] = set()
        self._local = threading.local()
        self._staging_folders: list[str] = []
        self._root = str(self.storage_path)
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._rank = 0
        self._started = time.time()

    # -- lifecycle
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._rank = trainer.global_rank
        self.storage_path.mkdir(parents=True, exist_ok=True)

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="quackae-writer")
        self._started = time.time()

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
        self._submit(list(metadata), matrix, extra)

    def write_batch(self, metadata: list[dict[str, Any]], encodings: np.ndarray) -> None:
        """Store a batch outside Lightning (benchmarks, scripts): same path as during prediction."""
        if self._pool is None:
            self.storage_path.mkdir(parents=True, exist_ok=True)
            self.on_predict_start(None, None)
        self._raise_pending_error()
        self._submit(metadata, np.asarray(encodings, dtype=np.float32), None)

    def _submit(self, metadata: list[dict[str, Any]], matrix: np.ndarray, extra: Any) -> None:
        assert self._pool is not None
        self._slots.acquire()  # bounded: at most max_pending batches wait for the disk
        future = self._pool.submit(self._write_items, metadata, matrix, extra)
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

    def _staging(self) -> str:
        """This thread's staging folder (created once)."""
        folder = getattr(self._local, "staging", None)
        if folder is None:
            folder = os.path.join(self._root, STAGING, f"{self._rank}-{os.getpid()}-{threading.get_ident()}")
            os.makedirs(folder, exist_ok=True)
            self._local.staging = folder
            with self._lock:
                self._staging_folders.append(folder)
        return folder

    def _remove_staging(self) -> None:
        """Drop this writer's (empty) staging folders, and the staging root once nothing is left in it."""
        with self._lock:
            folders, self._staging_folders = self._staging_folders, []
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
        self._local = threading.local()
        try:
            os.rmdir(os.path.join(self._root, STAGING))
        except OSError:
            pass  # another rank still writes there, or it is already gone

    def _write_items(self, metadata: list[dict[str, Any]], matrix: np.ndarray, extra: Any) -> None:
        if self._error is not None:
            return
        written = skipped = dropped = 0
        current = None
        selecting = self.label_field is not None and (self.filtered or self.evaluate)
        try:
            staging = self._staging()
            for row, meta in enumerate(metadata):
                if selecting and not self.keeps(meta):
                    dropped += 1
                    continue
                index = int(meta["id"])
                folder = f"{self._root}/{item_path(index, dir_only=True)}"
                current = f"{folder}/{index}.npz"
                if folder not in self._folders:
                    os.makedirs(folder, exist_ok=True)
                    self._folders.add(folder)
                if os.path.exists(current):
                    skipped += 1
                    continue
                if self.png is not None:
                    item_extra = None if extra is None else tuple(e[row] for e in extra)
                    self._write_png(index, folder, matrix[row], item_extra, staging)
                payload = npz_bytes(matrix[row], json.dumps(meta, ensure_ascii=False, default=str))
                write_atomic(current, payload, staging)
                written += 1
        except OSError as error:
            with self._lock:
                if self._error is None:
                    where = error.filename or current
                    self._error = QuackError(
                        f"writing {where} failed: {error.strerror or error}; items written "
                        "so far are complete, rerun the same command to finish"
                    )
        finally:
            with self._lock:
                self.written += written
                self.skipped += skipped
                self.filtered_out += dropped

    def _write_png(self, index: int, folder: str, encoding: np.ndarray, extra: Any, staging: str) -> None:
        from quackae.render import attention_image, encoding_image

        if self.png == "attention" and extra is not None:
            image = attention_image(extra[0])
        else:
            image = encoding_image(encoding)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        write_atomic(f"{folder}/{index}.png", buffer.getvalue(), staging)

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            self._shutdown(wait=True)
            raise self._error

    def _shutdown(self, wait: bool) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=not wait)
            self._pool = None

    def flush(self) -> None:
        """Wait for every queued write and remove the staging folders; raises the first I/O error."""
        self._shutdown(wait=True)
        self._remove_staging()
        if self._error is not None:
            raise self._error

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        self.flush()
        trainer.strategy.barrier("quackae-writer-done")
        if trainer.is_global_zero:
            self.write_manifest()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._shutdown(wait=True)
        self._remove_staging()

    def write_manifest(self) -> dict[str, Any]:
        ids = stored_ids(self.storage_path)
        size = None
        if ids:
            with np.load(self.storage_path / item_path(ids[0], "npz"), allow_pickle=False) as first:
                size = int(first["encoding"].shape[0])
        manifest = {
            "format": "quackae-store-1",
            "items": len(ids),
            "encoding_size": size,
            "dtype": "float32",
            "item_path": "{id // 100000}/{id % 100000 // 1000}/{id}.npz",
            **self.manifest,
            "selection": {
                "filtered": self.filtered,
                "evaluate": self.evaluate,
                "label_field": self.label_field,
                "unlabeled_value": self.unlabeled_value,
                "reduce_label": self.reduce_label,
                "reduction_threshold": self.reduction_threshold,
                "seed": self.seed,
            },
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_atomic(
            self.storage_path / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode(), self._staging()
        )
        self._remove_staging()
        return manifest
