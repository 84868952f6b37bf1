"""``quackae export``: a complete, sound store (either layout) as one Parquet file: id, encoding, text, metadata.

The file appears whole or not at all (a temporary name beside it, renamed at the end); the temporaries
of an export that was killed are removed by the next export to the same file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from quackae.core.atomic import remove_stale_temporaries
from quackae.core.errors import QuackError
from quackae.stages.configs import ExportConfig
from quackae.store.reader import EncodingStore

log = logging.getLogger(__name__)


def export(config: ExportConfig) -> dict[str, Any]:
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
    return {"out": config.out, "rows": rows, "lines": [f"exported {rows} items from {config.store} to {config.out}"]}
