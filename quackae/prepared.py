"""Reading a prepared directory (what ``quackae prepare --out`` writes) for every later stage.

A prepared directory holds ``dataset/`` (Arrow: id, input_ids, length, metadata columns),
``tokenizer.json``, ``prepare.json`` and, written last, the ``COMPLETE`` marker: a folder without
the marker is a stopped prepare and is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quackae.errors import QuackError
from quackae.tokenizer import load_tokenizer

COMPLETE = "COMPLETE"  # written last into a prepared folder; readers require it


def load_prepared(path: str | Path) -> tuple[Any, Any, dict[str, Any]]:
    """Open a prepared directory: ``(dataset, tokenizer, prepare.json)``; ``QuackError`` when it is not one.

    The folder must carry the ``COMPLETE`` marker that ``prepare`` writes last.
    """
    import datasets

    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise QuackError(f"prepared data directory {directory} is a file; give the folder quackae prepare --out wrote")
    if not directory.is_dir():
        raise QuackError(f"prepared data directory {directory} does not exist; run quackae prepare first")
    for name in ("dataset", "tokenizer.json"):
        if not (directory / name).exists():
            raise QuackError(
                f"{directory} is not a prepared directory (no {name}); run quackae prepare --out {directory}"
            )
    if not (directory / COMPLETE).is_file():
        raise QuackError(
            f"{directory} is not a complete prepared directory (no {COMPLETE} marker: a prepare into it was "
            f"stopped, or an older quackae wrote it); run quackae prepare --out {directory} again"
        )
    dataset = datasets.load_from_disk(str(directory / "dataset"))
    tokenizer = load_tokenizer(directory / "tokenizer.json")
    info_file = directory / "prepare.json"
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    return dataset, tokenizer, info
