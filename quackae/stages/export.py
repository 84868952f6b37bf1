"""``quackae export``: a complete, sound store (either layout) as one Parquet file: id, encoding, text, metadata.

The file appears whole or not at all (a temporary name beside it, renamed at the end); the temporaries
of an export that was killed are removed by the next export to the same file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from quackae.core.atomic import remove_stale_temporaries
from quackae.core.errors import QuackError
from quackae.core.results import StageResult
from quackae.stages.configs import ExportConfig
from quackae.store.reader import EncodingStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportResult(StageResult):
    """How many items of ``store`` the Parquet file ``out`` holds."""

    out: str
    store: str
    rows: int

    def lines(self) -> list[str]:
        return [f"exported {self.rows} items from {self.store} to {self.out}"]


def export(config: ExportConfig) -> ExportResult:
    """Run ``quackae export``: refuses a store that is not complete and sound (``EncodingStore.check_usable``)."""
    store = EncodingStore(config.store, warn=False)
    out = Path(config.out)
    if Path(os.path.realpath(store.path)) in Path(os.path.realpath(out)).parents:
        raise QuackError(f"--out {out} is inside the store {store.path}; write the Parquet file outside it")
    store.check_usable()
    if out.parent.is_dir():
        stale = remove_stale_temporaries(out)
        if stale:
            log.info("removed %d temporary files a stopped export of %s left", stale, out)
    try:
        rows = store.export(out)
    except OSError as error:
        raise QuackError(
            f"writing {out} failed ({error.strerror or error}); nothing was written there, free space or choose "
            "another --out"
        ) from None
    return ExportResult(out=str(config.out), store=str(config.store), rows=rows)
