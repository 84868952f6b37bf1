"""A classifier folder (``quackae classify --out``): written whole or not at all, read back only whole.

``classify`` writes everything (``checkpoints/best.ckpt``, ``classes.json``, ``report.json``,
``predictions.parquet``, ``confusion.png``) into a hidden staging folder beside ``--out``; once all
of it is fsynced the folder takes ``--out``'s place in one step (``atomic.replace_folder``). A kill
leaves the previous classifier as it was and a staging folder that the next classify removes.
``classes.json`` and ``report.json`` name the sha256 of the checkpoint they were written with, and
``read_classifier`` (``classify --predict``) refuses a folder whose parts do not belong together.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from quackae.core.atomic import atomic_file, replace_folder, sibling_staging
from quackae.core.errors import QuackError
from quackae.core.files import read_json, regular_file
from quackae.model.checkpoints import load_torch_file

CHECKPOINT = Path("checkpoints") / "best.ckpt"
CLASSES, REPORT = "classes.json", "report.json"
OWN_NAMES = {"checkpoints", CLASSES, REPORT, "predictions.parquet", "confusion.png"}
_STAGING = "classify"
_RETRAIN = "train it again with quackae classify"


def check_out(out: Path) -> None:
    """``--out`` must be new, empty or a classifier folder: classify replaces the whole folder."""
    if os.path.lexists(out) and not out.is_dir():
        raise QuackError(f"--out {out} is a file; give the classifier a directory")
    if not out.is_dir():
        return
    foreign = sorted({p.name for p in out.iterdir()} - OWN_NAMES)
    if foreign:
        raise QuackError(
            f"--out {out} holds files classify did not write ({', '.join(foreign[:5])}); choose a new or empty "
            "directory, classify replaces the whole folder"
        )


def staging_for(out: Path) -> Path:
    """A fresh staging folder beside ``out`` for this process (``atomic.sibling_staging``), ready for a checkpoint."""
    staging = sibling_staging(out, _STAGING)
    (staging / CHECKPOINT.parent).mkdir(parents=True)
    return staging


def commit(staging: Path, out: Path) -> None:
    """Put the complete classifier in ``staging`` at ``out`` in one step."""
    replace_folder(staging, out)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(regular_file(path, "checkpoint"), "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_classifier(directory: Path) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """``(hyper-parameters, state_dict, class names)`` of a classifier folder whose parts belong together.

    The checkpoint is read safely (``load_torch_file``); ``classes.json`` must name at least two distinct
    class names and the checkpoint's sha256, ``report.json`` (written last) the same checkpoint and
    classes, and the checkpoint file must be that one. Anything else is one ``QuackError`` naming the file.
    """
    if not directory.is_dir():
        raise QuackError(f"--predict {directory} is not a classifier directory; train one with quackae classify")
    checkpoint_file = directory / CHECKPOINT
    if not os.path.lexists(checkpoint_file) or not os.path.lexists(directory / CLASSES):
        raise QuackError(
            f"{directory} is not a classifier directory (no {CHECKPOINT} and {CLASSES}); "
            "train one with quackae classify"
        )
    checkpoint = load_torch_file(checkpoint_file, "classifier checkpoint", _RETRAIN)
    if (
        not isinstance(checkpoint, dict)
        or not isinstance(checkpoint.get("state_dict"), dict)
        or not isinstance(checkpoint.get("hyper_parameters"), dict)
    ):
        raise QuackError(f"{checkpoint_file} is not a classifier checkpoint (no state_dict / hyper_parameters)")
    saved = read_json(directory / CLASSES, "class list", _RETRAIN)
    classes = saved.get("classes")
    if (
        not isinstance(classes, list)
        or len(classes) < 2
        or not all(isinstance(c, str) for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise QuackError(
            f"class list {directory / CLASSES} must name at least two distinct classes as strings, got "
            f"{str(classes)[:80]}; {_RETRAIN}"
        )
    sha = saved.get("checkpoint_sha256")
    if not isinstance(sha, str):
        raise QuackError(
            f"class list {directory / CLASSES} does not name the checkpoint it belongs to (written by an older "
            f"quackae, or edited); {_RETRAIN}"
        )
    if not os.path.lexists(directory / REPORT):
        raise QuackError(f"{directory} has no {REPORT}: the classify that wrote it did not finish; {_RETRAIN}")
    report = read_json(directory / REPORT, "classifier report", _RETRAIN)
    if report.get("checkpoint_sha256") != sha or report.get("classes") != classes:
        raise QuackError(f"{directory / REPORT} and {directory / CLASSES} come from different classifiers; {_RETRAIN}")
    if file_sha256(checkpoint_file) != sha:
        raise QuackError(
            f"{checkpoint_file} is not the checkpoint {CLASSES} and {REPORT} were written with (its files were "
            f"replaced or mixed); {_RETRAIN}"
        )
    return dict(checkpoint["hyper_parameters"]), checkpoint["state_dict"], classes


def write_predictions(
    file: Path,
    ids: np.ndarray,
    labels: list[str | None],
    predicted: np.ndarray,
    probabilities: np.ndarray,
    classes: list[str],
    splits: Any,
) -> None:
    """``predictions.parquet``: id, true and predicted label, each class's probability and (when given) the split;
    the classes in order in the schema's metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, Any] = {
        "id": pa.array(ids, type=pa.int64()),
        "true_label": pa.array(labels, type=pa.string()),
        "predicted_label": pa.array([classes[k] for k in predicted], type=pa.string()),
        "probabilities": pa.FixedSizeListArray.from_arrays(
            pa.array(probabilities.astype(np.float32).reshape(-1), type=pa.float32()), len(classes)
        ),
    }
    if splits is not None:
        columns["split"] = pa.array(list(splits), type=pa.string())
    table = pa.table(columns)
    table = table.replace_schema_metadata({"classes": json.dumps(classes)})
    with atomic_file(file, "wb") as handle:
        pq.write_table(table, handle)
