"""What a RUN was trained on, recorded where it is needed and checked before it is mixed with other data.

The record is the sha256 of the tokenizer (``tokenizer_hash``, as a store's ``tokenizer_sha256``), the
prepared dataset's fingerprint (as a store's ``dataset_fingerprint``) and the prepared folder's path.
``quackae train`` writes it into ``RUN/run.json`` before anything else and into every checkpoint
(``checkpoints.TRAINED_ON``), so a train into a RUN of other data, a resume from a checkpoint of
other data, and a checkpoint beside another run's tokenizer are each refused in one line.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from pytorch_lightning.callbacks import Callback

from quackae.core.atomic import write_atomic
from quackae.core.errors import QuackError
from quackae.core.files import read_json
from quackae.model.checkpoints import TRAINED_ON, trained_on

log = logging.getLogger(__name__)

RUN_RECORD = "run.json"
KEYS = {"tokenizer_sha256": "another tokenizer", "dataset_fingerprint": "another dataset"}


def data_record(dataset: Any, tokenizer: Any, data: str | Path, max_length: int | None = None) -> dict[str, Any]:
    """``{"tokenizer_sha256", "dataset_fingerprint", "data", "max_length"}`` of a prepared folder opened with
    ``load_prepared`` (its fingerprint is the one the folder's marker records) and its ``--max-length``, which
    ``QuackEncoder`` truncates texts to."""
    from quackae.data.tokenizer import tokenizer_hash

    record = {
        "tokenizer_sha256": tokenizer_hash(tokenizer),
        "dataset_fingerprint": dataset.fingerprint,
        "data": str(Path(data).resolve()),
    }
    if max_length is not None:
        record["max_length"] = max_length
    return record


def differences(saved: dict[str, Any], record: dict[str, Any]) -> list[str]:
    """What differs between two records, in words ("another tokenizer", ...)."""
    return [words for key, words in KEYS.items() if saved.get(key) != record.get(key)]


def read_run_record(run: Path) -> dict[str, Any] | None:
    """``RUN/run.json``, None when the RUN has none (a new RUN, or one an older quackae wrote)."""
    file = run / RUN_RECORD
    if not file.exists() and not file.is_symlink():
        return None
    return read_json(file, "run record", "it is written by quackae train; choose another --out")


def write_run_record(run: Path, record: dict[str, Any]) -> None:
    write_atomic(
        run / RUN_RECORD,
        json.dumps({**record, "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2) + "\n",
    )


def check_run(run: Path, record: dict[str, Any], data: str) -> None:
    """Refuse to train ``record``'s data into a RUN that records other data (or, written by an older
    quackae, holds checkpoints beside another tokenizer)."""
    saved = read_run_record(run)
    if saved is None:
        tokenizer = run / "tokenizer.json"
        if any((run / "checkpoints").glob("*.ckpt")) and tokenizer.is_file():
            if _tokenizer_sha256(tokenizer) != record["tokenizer_sha256"]:
                raise QuackError(
                    f"{run} was trained with another tokenizer ({tokenizer}) than the one of {data}; "
                    "choose another --out"
                )
        return
    changed = differences(saved, record)
    if changed:
        raise QuackError(
            f"{run} trains on other data ({' and '.join(changed)}: it was started on {saved.get('data')}), "
            f"not on {data}; choose another --out"
        )


def check_resume(resume: Path, checkpoint: dict[str, Any], record: dict[str, Any], data: str) -> None:
    """Refuse to continue a checkpoint on other data than it was trained on."""
    saved = trained_on(checkpoint)
    if saved is None:  # written before checkpoints carried the record: the tokenizer beside it tells
        run = resume.parent.parent if resume.parent.name == "checkpoints" else resume.parent
        tokenizer = run / "tokenizer.json"
        if not tokenizer.is_file():
            log.warning("cannot tell which data --resume %s was trained on; continuing on %s", resume, data)
            return
        saved = {"tokenizer_sha256": _tokenizer_sha256(tokenizer), "dataset_fingerprint": record["dataset_fingerprint"]}
    changed = differences(saved, record)
    if changed:
        where = f" ({saved['data']})" if saved.get("data") else ""
        raise QuackError(
            f"--resume {resume} was trained on other data{where}: {' and '.join(changed)} than {data}; resume "
            "on the data it was trained on, or start a new run"
        )


def _tokenizer_sha256(file: Path) -> str:
    from quackae.data.tokenizer import load_tokenizer, tokenizer_hash

    return tokenizer_hash(load_tokenizer(file))


class RecordTrainedOn(Callback):
    """Writes the run's record into every checkpoint under ``checkpoints.TRAINED_ON``."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = dict(record)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint[TRAINED_ON] = dict(self.record)
