"""``quackae export``: a store (either layout) as one Parquet file: id, encoding, text, metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from quackae.store import EncodingStore


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
    return {"out": config.out, "rows": rows, "lines": [f"exported {rows} items from {config.store} to {config.out}"]}
