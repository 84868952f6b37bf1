"""``EncodingStore``: read a store that ``quackae encode`` wrote, and ``quackae export`` it to Parquet.

Items are read with ``numpy.load(..., allow_pickle=False)``: reading a store never executes code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quackae.errors import QuackError
from quackae.writer import item_path, stored_ids

log = logging.getLogger(__name__)


def read_item(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """``(encoding float32 (H,), metadata dict)`` of one ``.npz`` item."""
    with np.load(path, allow_pickle=False) as item:
        return item["encoding"].astype(np.float32, copy=False), json.loads(str(item["metadata"]))


class EncodingStore:
    """A folder of items at ``item_path(id, "npz")`` plus ``manifest.json``.

    ``len``, ``store[id] -> (encoding, metadata)`` (``KeyError`` for an unknown id), iteration over
    ``(id, encoding, metadata)`` in id order, ``ids()``, ``to_numpy() -> (ids, matrix)``,
    ``torch_dataset()``, ``to_dataset()`` (HF ``datasets``) and ``export(file.parquet)``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise QuackError(f"encoding store {self.path} does not exist; run quackae encode --out {self.path}")
        manifest = self.path / "manifest.json"
        self.manifest: dict[str, Any] = json.loads(manifest.read_text()) if manifest.is_file() else {}
        self._ids = stored_ids(self.path)
        self._known = set(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, index: object) -> bool:
        return index in self._known

    def ids(self) -> list[int]:
        return list(self._ids)

    def __getitem__(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        if index not in self._known:
            raise KeyError(f"id {index} is not in the store {self.path}")
        return read_item(self.path / item_path(index, "npz"))

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, dict[str, Any]]]:
        for index in self._ids:
            encoding, metadata = self[index]
            yield index, encoding, metadata

    @property
    def encoding_size(self) -> int | None:
        if self.manifest.get("encoding_size"):
            return int(self.manifest["encoding_size"])
        return int(self[self._ids[0]][0].shape[0]) if self._ids else None

    def load_all(self) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """``(ids (N,) int64, encodings (N, H) float32, metadata list)`` in id order, reading each item once."""
        matrix = np.empty((len(self._ids), self.encoding_size or 0), dtype=np.float32)
        metadata = []
        for row, (_, encoding, meta) in enumerate(self):
            matrix[row] = encoding
            metadata.append(meta)
        return np.asarray(self._ids, dtype=np.int64), matrix, metadata

    def to_numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids (N,) int64, encodings (N, H) float32)`` in id order."""
        ids, matrix, _ = self.load_all()
        return ids, matrix

    def records(self) -> dict[str, list[Any]]:
        """Columns ``id``, ``encoding`` and one per metadata field (None where an item lacks it), in id order."""
        ids, matrix, metadata = self.load_all()
        names = list(dict.fromkeys(k for meta in metadata for k in meta if k != "id"))
        columns: dict[str, list[Any]] = {"id": ids.tolist(), "encoding": list(matrix)}
        for name in names:
            columns[name] = [meta.get(name) for meta in metadata]
        return columns

    def to_dataset(self) -> Any:
        """A HF ``datasets.Dataset`` with ``id``, ``encoding`` (float32 list) and the metadata columns."""
        import datasets

        columns = self.records()
        size = self.encoding_size or 0
        features = None
        if size:
            inferred = datasets.Dataset.from_dict({k: v[:1] for k, v in columns.items()}).features
            inferred["encoding"] = datasets.Sequence(datasets.Value("float32"), length=size)
            features = inferred
        return datasets.Dataset.from_dict(columns, features=features)

    def export(self, file: str | Path) -> int:
        """Write one Parquet table (id, encoding, metadata columns); returns its row count."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = self.records()
        size = self.encoding_size or 0
        matrix = np.stack(columns.pop("encoding")) if columns["id"] else np.empty((0, size), dtype=np.float32)
        encoding = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), type=pa.float32()), size)
        table = pa.table(
            {
                "id": pa.array(columns.pop("id"), type=pa.int64()),
                "encoding": encoding,
                **{k: _arrow_column(k, v) for k, v in columns.items()},
            }
        )
        out = Path(file)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        pq.write_table(table, tmp)
        tmp.replace(out)
        return table.num_rows

    def torch_dataset(self, label_field: str | None = None, classes: list[Any] | None = None) -> Any:
        """A torch ``Dataset`` of ``(encoding tensor (H,), metadata)`` or, with ``label_field``,
        ``(encoding, class index)`` (``classes`` fixes the order; default sorted labels)."""
        return _TorchView(self, label_field, classes)


def _arrow_column(name: str, values: list[Any]) -> Any:
    import pyarrow as pa

    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        log.warning("metadata column %r mixes value types; exported as JSON strings", name)
        return pa.array([None if v is None else json.dumps(v) for v in values], type=pa.string())


class _TorchView:
    def __init__(self, store: EncodingStore, label_field: str | None, classes: list[Any] | None) -> None:
        import torch

        self._torch = torch
        self.store = store
        self.ids = store.ids()
        self.label_field = label_field
        if label_field is not None:
            labels = [store[i][1].get(label_field) for i in self.ids]
            self.classes = classes if classes is not None else sorted({str(v) for v in labels if v is not None})
            self._index = {c: k for k, c in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, position: int) -> tuple[Any, Any]:
        encoding, metadata = self.store[self.ids[position]]
        tensor = self._torch.from_numpy(encoding)
        if self.label_field is None:
            return tensor, metadata
        return tensor, self._index[str(metadata.get(self.label_field))]


@dataclass(frozen=True)
class ExportConfig:
    store: str = field(
        default="storage/store",
        metadata={"positional": True, "path": True, "help": "store directory (quackae encode --out)"},
    )
    out: str = field(default="storage/encodings.parquet", metadata={"path": True, "help": "Parquet file to write"})

    def __post_init__(self) -> None:
        if not str(self.out).endswith(".parquet"):
            raise ValueError(f"--out must name a .parquet file, got {self.out}")


def export(config: ExportConfig) -> dict[str, Any]:
    """Run ``quackae export``."""
    store = EncodingStore(config.store)
    rows = store.export(config.out)
    print(f"exported {rows} items from {config.store} to {config.out}")
    return {"out": config.out, "rows": rows}
