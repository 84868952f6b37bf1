"""``LatentClassifier`` and ``quackae classify``: a classifier over stored encodings.

The split is stratified and deterministic: within each class, items are ordered by a keyed hash
of their id and the first ``test_fraction`` go to test, the next ``val_fraction`` to validation.
Classes too small for all three splits are warned about and kept in training only. The report
sets the classifier beside three baselines measured on the same split: the majority class, a
linear probe (softmax regression on the same standardised encodings, its weight decay chosen on
the validation split) and the same probe, chosen the same way, on bags of tokens (log(1 + count)
of each token id the run's own tokenizer gives the item, sparse at any corpus size), which says
whether the encodings beat counting tokens. The few-label curve sets the probe on the encodings
beside the probe on bags of tokens when only 5, 10, 25 or 50 training items per class are labelled
(``probes.few_label_report``): where, if anywhere, the encodings win.

Shape glossary: N items, H encoding size, C classes.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from quackae.core.atomic import atomic_file, write_atomic
from quackae.core.errors import QuackError
from quackae.data.selection import is_labelled
from quackae.eval.folder import (
    CHECKPOINT,
    check_out,
    commit,
    file_sha256,
    read_classifier,
    staging_for,
    write_predictions,
)
from quackae.eval.probes import (
    bag_baseline,
    classification_report,
    few_label_report,
    stratified_split,
    tuned_linear_probe,
)
from quackae.eval.report import ClassifyResult, PredictResult
from quackae.model.checkpoints import AtomicCheckpointIO, load_torch_file
from quackae.model.classifier import LatentClassifier
from quackae.model.guard import FiniteGuard, NonFiniteTraining
from quackae.stages.configs import ClassifyConfig
from quackae.viz.render import confusion_image, save_png

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- data
def load_encodings(source: str | Path) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """``(ids (N,), encodings (N, H), metadata list)`` from a complete, sound ``EncodingStore`` folder or an exported
    Parquet file; anything else is refused in one line (``quackae.store.read_encodings``)."""
    from quackae.store.reader import read_encodings

    return read_encodings(source)


def _labels_of(metadata: list[dict[str, Any]], field_name: str, unlabeled: str | None, source: str) -> list[str | None]:
    if not any(field_name in m for m in metadata):
        known = sorted({k for m in metadata[:1000] for k in m})
        raise QuackError(
            f"--label-field {field_name!r} is not in the metadata of {source} (fields: {', '.join(known)})"
        )
    labels = []
    for m in metadata:
        value = m.get(field_name)
        labels.append(str(value) if is_labelled(value, unlabeled) else None)
    return labels


@dataclass
class _Labelled:
    """The store's items, their labels and the stratified split of the labelled ones (l_: labelled only)."""

    ids: np.ndarray  # (N,)
    matrix: np.ndarray  # (N, H)
    metadata: list[dict[str, Any]]
    labels: list[str | None]
    labelled: np.ndarray  # (N,) bool
    classes: list[str]
    l_y: np.ndarray  # (L,) class index
    split: np.ndarray  # (L,) 0/1/2: train/val/test
    parts: dict[str, np.ndarray]  # name -> (L,) bool
    small: list[str]  # classes too small for a validation and a test item, kept in training only

    @property
    def l_ids(self) -> np.ndarray:
        return self.ids[self.labelled]

    @property
    def l_x(self) -> np.ndarray:
        return self.matrix[self.labelled]

    @property
    def l_labels(self) -> list[str]:
        return [label for label in self.labels if label is not None]

    def rows(self) -> tuple[np.ndarray, ...]:
        """The (train, validation, test) positions among the labelled items."""
        return tuple(np.flatnonzero(self.parts[name]) for name in ("train", "val", "test"))


def classify(config: ClassifyConfig) -> ClassifyResult | PredictResult | None:
    """Run ``quackae classify`` (train, pick the best on validation, test) or, with ``--predict``, apply one.

    The classifier folder is written whole in a staging folder beside ``--out`` and then takes its place
    (see ``quackae.eval.folder``): a stopped classify leaves the previous one as it was. Returns None on the
    ranks of a DDP job other than 0.
    """
    if config.predict:
        return predict_with(config)
    out = Path(config.out)
    check_out(out)
    staging = staging_for(out)
    try:
        return _classify_into(config, staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once committed


def _classify_into(config: ClassifyConfig, staging: Path, out: Path) -> ClassifyResult | None:
    started = time.time()
    data = _labelled_split(config)
    pl.seed_everything(config.seed, workers=True, verbose=False)
    trainer = _fit(config, data, staging)
    if not trainer.is_global_zero:
        return None
    best_file = staging / CHECKPOINT
    best = _classifier_from(load_torch_file(best_file, "classifier checkpoint"), best_file)
    with torch.no_grad():
        probabilities = F.softmax(best(torch.from_numpy(data.matrix)), dim=-1).numpy()  # (N, C)
    predicted = probabilities.argmax(axis=1)
    test_y = data.l_y[data.parts["test"]]
    report = classification_report(test_y, predicted[np.flatnonzero(data.labelled)[data.parts["test"]]], data.classes)
    report = {**_head(config, data), **report, **_baselines(config, data)}
    report.update(checkpoint=str(out / CHECKPOINT), config=asdict(config), seconds=round(time.time() - started, 1))
    _write_folder(staging, data, report, predicted, probabilities, config.label_field)
    commit(staging, out)  # the whole classifier takes --out's place at once
    baselines = report["baselines"]
    return ClassifyResult(
        out=str(out),
        test_items=report["items"]["test"],
        accuracy=report["accuracy"],
        macro_f1=report["macro_f1"],
        majority_accuracy=baselines["majority_class"]["accuracy"],
        linear_probe_accuracy=baselines["linear_probe"]["accuracy"],
        bag_of_tokens_accuracy=baselines["bag_of_tokens_probe"]["accuracy"],
        bag_of_tokens_skipped=baselines["bag_of_tokens_probe"].get("source"),
        few_label=report["few_label"],
    )


def _labelled_split(config: ClassifyConfig) -> _Labelled:
    """The store's encodings and labels, split: refuses a store with no labels, one class, or too few items."""
    ids, matrix, metadata = load_encodings(config.store)
    labels = _labels_of(metadata, config.label_field, config.unlabeled_value, config.store)
    labelled = np.asarray([label is not None for label in labels])
    if not labelled.any():
        raise QuackError(f"no item in {config.store} has a {config.label_field!r} label; nothing to learn from")
    classes = sorted({label for label in labels if label is not None})
    if len(classes) < 2:
        raise QuackError(
            f"{config.store} has one class ({classes[0]!r}) in {config.label_field!r}; a classifier needs at least two"
        )
    if (~labelled).any():
        log.info("%d unlabelled items are left out of training and get predictions only", int((~labelled).sum()))
    index = {c: k for k, c in enumerate(classes)}
    l_labels = [label for label in labels if label is not None]
    l_y = np.asarray([index[label] for label in l_labels], dtype=np.int64)
    split, small = stratified_split(ids[labelled], l_labels, config.seed, config.val_fraction, config.test_fraction)
    if small:
        log.warning("classes with fewer than 3 items stay in training only (no val/test score): %s", ", ".join(small))
    parts = {name: split == code for code, name in enumerate(("train", "val", "test"))}
    if not parts["val"].any() or not parts["test"].any():
        raise QuackError(f"too few labelled items in {config.store} for validation and test splits")
    return _Labelled(ids, matrix, metadata, labels, labelled, classes, l_y, split, parts, small)


def _fit(config: ClassifyConfig, data: _Labelled, staging: Path) -> pl.Trainer:
    """Train the classifier on the train split, its best checkpoint by validation loss kept in ``staging``."""
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

    parts, l_x, l_y, classes = data.parts, data.l_x, data.l_y, data.classes
    counts = np.bincount(l_y[parts["train"]], minlength=len(classes))
    weights = (counts.sum() / np.maximum(counts, 1) / len(classes)).tolist() if config.class_weights else None
    model = LatentClassifier(
        data.matrix.shape[1],
        len(classes),
        config.hidden_sizes,
        config.dropout,
        config.lr,
        weight_decay=config.weight_decay,
        max_epochs=config.max_epochs,
        class_weights=weights,
    )
    model.set_standardisation(l_x[parts["train"]])

    def loader(mask: np.ndarray, shuffle: bool) -> DataLoader:
        tensors = TensorDataset(torch.from_numpy(l_x[mask]), torch.from_numpy(l_y[mask]))
        return DataLoader(tensors, batch_size=config.batch_size, shuffle=shuffle, num_workers=config.num_workers)

    checkpoint = ModelCheckpoint(
        dirpath=staging / CHECKPOINT.parent,
        filename=CHECKPOINT.stem,
        monitor="val_loss",
        mode="min",
        save_top_k=1,
        enable_version_counter=False,
    )
    trainer = pl.Trainer(
        max_epochs=config.max_epochs,
        logger=False,
        enable_model_summary=False,
        callbacks=[
            FiniteGuard(every=10, monitor="val_loss"),
            checkpoint,
            EarlyStopping(monitor="val_loss", patience=config.patience),
        ],
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(staging),
        log_every_n_steps=1,
        **config.trainer_kwargs(),
    )
    try:
        trainer.fit(model, loader(parts["train"], True), loader(parts["val"], False))
    except NonFiniteTraining as error:
        raise QuackError(
            f"the classifier's {error}; lower --lr (it is {config.lr}) or look for extreme values in the "
            f"encodings of {config.store}"
        ) from None
    return trainer


def _head(config: ClassifyConfig, data: _Labelled) -> dict[str, Any]:
    """The report's first keys: what was classified and how many items each split holds."""
    return {
        "store": config.store,
        "label_field": config.label_field,
        "classes": data.classes,
        "items": {
            "labelled": int(data.labelled.sum()),
            "unlabelled": int((~data.labelled).sum()),
            **{name: int(mask.sum()) for name, mask in data.parts.items()},
        },
        "small_classes": data.small,
    }


def _baselines(config: ClassifyConfig, data: _Labelled) -> dict[str, Any]:
    """The majority class, the linear probe and the bag-of-tokens probe on the same split, and the few-label
    curve of the probes (``baselines`` and ``few_label`` of the report)."""
    classes, l_y, parts, rows = data.classes, data.l_y, data.parts, data.rows()
    majority = int(np.argmax(np.bincount(l_y[parts["train"]], minlength=len(classes))))
    test_y = l_y[parts["test"]]
    baseline_majority = classification_report(test_y, np.full(len(test_y), majority), classes)
    l_x = data.l_x
    probe_predicted, probe_decay = tuned_linear_probe(
        l_x[rows[0]], l_y[rows[0]], l_x[rows[1]], l_y[rows[1]], l_x[rows[2]], len(classes), config.seed
    )
    baseline_probe = classification_report(test_y, probe_predicted, classes)
    labelled_metadata = [m for m, label in zip(data.metadata, data.labels, strict=True) if label is not None]
    bag, baseline_bag = bag_baseline(config.store, data.l_ids, labelled_metadata, l_y, rows, classes, config.seed)
    few_label = few_label_report(l_x, bag, data.l_ids, data.l_labels, l_y, rows, len(classes), config.seed)
    return {
        "baselines": {
            "majority_class": {
                "class": classes[majority],
                "accuracy": baseline_majority["accuracy"],
                "macro_f1": baseline_majority["macro_f1"],
            },
            "linear_probe": {
                "accuracy": baseline_probe["accuracy"],
                "macro_f1": baseline_probe["macro_f1"],
                "weight_decay": probe_decay,
            },
            "bag_of_tokens_probe": baseline_bag,
        },
        "few_label": few_label,
    }


def _write_folder(
    staging: Path,
    data: _Labelled,
    report: dict[str, Any],
    predicted: np.ndarray,
    probabilities: np.ndarray,
    label_field: str,
) -> None:
    """Write the predictions, the confusion picture, ``classes.json`` and ``report.json`` (last) into ``staging``."""
    split_names = np.full(len(data.ids), "unlabelled", dtype=object)
    split_names[np.flatnonzero(data.labelled)] = np.asarray(["train", "val", "test"], dtype=object)[data.split]
    classes = data.classes
    write_predictions(
        staging / "predictions.parquet", data.ids, data.labels, predicted, probabilities, classes, split_names
    )
    with atomic_file(staging / "confusion.png", "wb") as handle:
        save_png(confusion_image(report["confusion_matrix"], classes), handle)
    sha = file_sha256(staging / CHECKPOINT)  # classes.json and report.json name the checkpoint they belong to
    report["checkpoint_sha256"] = sha
    names = {"label_field": label_field, "classes": classes, "checkpoint_sha256": sha}
    write_atomic(staging / "classes.json", json.dumps(names) + "\n")
    write_atomic(staging / "report.json", json.dumps(report, indent=2) + "\n")


def predict_with(config: ClassifyConfig) -> PredictResult:
    """Apply the classifier in ``config.predict`` to ``config.store``; writes ``OUT/predictions.parquet``."""
    directory, out = Path(config.predict), Path(config.out)
    if out.resolve() == directory.resolve():
        raise QuackError(
            f"--out {out} is the classifier folder --predict reads, whose predictions belong to its training; "
            "choose another --out"
        )
    if out.exists() and not out.is_dir():
        raise QuackError(f"--out {out} is a file; give the predictions a directory")
    hparams, state, classes = read_classifier(directory)
    model = _classifier_from({"hyper_parameters": hparams, "state_dict": state}, directory / CHECKPOINT)
    if model.hparams.num_classes != len(classes):
        raise QuackError(
            f"the classifier in {directory} has {model.hparams.num_classes} outputs and its classes.json "
            f"{len(classes)} classes; train it again"
        )
    ids, matrix, metadata = load_encodings(config.store)
    if matrix.shape[1] != model.hparams.input_size:
        raise QuackError(
            f"{config.store} holds {matrix.shape[1]}-d encodings, the classifier in {directory} "
            f"expects {model.hparams.input_size}"
        )
    values = [m.get(config.label_field) for m in metadata]
    labels = [str(v) if is_labelled(v, config.unlabeled_value) else None for v in values]
    with torch.no_grad():
        probabilities = F.softmax(model(torch.from_numpy(matrix)), dim=-1).numpy()
    predicted = probabilities.argmax(axis=1)
    out.mkdir(parents=True, exist_ok=True)
    write_predictions(out / "predictions.parquet", ids, labels, predicted, probabilities, classes, None)
    counts = Counter(classes[k] for k in predicted)
    return PredictResult(out=str(out), store=config.store, items=len(ids), predicted=dict(counts.most_common()))


def _classifier_from(checkpoint: dict[str, Any], file: Path) -> LatentClassifier:
    """A ``LatentClassifier`` in eval mode from a checkpoint's hyper-parameters and weights, each mismatch one
    ``QuackError`` naming ``file``."""
    hparams, state = checkpoint["hyper_parameters"], checkpoint["state_dict"]
    try:
        model = LatentClassifier(**hparams)
        model.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError) as error:
        reason = " ".join(str(error).split())[:200]
        raise QuackError(f"classifier checkpoint {file} does not match its own hyper-parameters: {reason}") from None
    return model.eval()
