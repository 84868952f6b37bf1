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
import math
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from quackae.atomic import atomic_file, write_atomic
from quackae.checkpoints import AtomicCheckpointIO, load_torch_file
from quackae.classifierdir import CHECKPOINT, check_out, commit, file_sha256, read_classifier, staging_for
from quackae.divergence import FiniteGuard, NonFiniteTraining
from quackae.errors import QuackError
from quackae.probes import (
    FEW_LABELS,
    bag_baseline,
    classification_report,
    few_label_report,
    stratified_split,
    tuned_linear_probe,
)
from quackae.render import confusion_image, save_png
from quackae.runtime import TrainerFlags
from quackae.selection import is_labelled

log = logging.getLogger(__name__)


class LatentClassifier(pl.LightningModule):
    """MLP over encodings (H,) -> logits (C,), with standardisation stored in the checkpoint."""

    def __init__(
        self,
        input_size: int,
        num_classes: int,
        hidden_sizes: tuple[int, ...] = (256,),
        dropout: float = 0.2,
        learning_rate: float = 1e-3,
        learning_rate_min: float = 1e-5,
        weight_decay: float = 1e-2,
        max_epochs: int = 100,
        class_weights: list[float] | None = None,
    ) -> None:
        super().__init__()
        if input_size <= 0 or num_classes < 2:
            raise ValueError(f"need input_size > 0 and at least 2 classes, got {input_size} and {num_classes}")
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = input_size
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), nn.GELU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        self.register_buffer("mean", torch.zeros(input_size))
        self.register_buffer("std", torch.ones(input_size))
        weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights else torch.ones(num_classes)
        self.register_buffer("class_weights", weights)

    def set_standardisation(self, features: np.ndarray) -> None:
        # in float64: the squares of large encodings overflow float32
        self.mean.copy_(torch.from_numpy(features.mean(axis=0, dtype=np.float64)))
        self.std.copy_(torch.from_numpy(features.std(axis=0, dtype=np.float64) + 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encodings (N, H) -> logits (N, C)."""
        return self.net((x - self.mean) / self.std)

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)  # (N, C)
        loss = F.cross_entropy(logits, y, weight=self.class_weights)
        accuracy = (logits.argmax(-1) == y).float().mean()
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log(f"{stage}_acc", accuracy, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, self.hparams.max_epochs), eta_min=self.hparams.learning_rate_min
        )
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


# ---------------------------------------------------------------------------------------------- data
def load_encodings(source: str | Path) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """``(ids (N,), encodings (N, H), metadata list)`` from a complete, sound ``EncodingStore`` folder or an exported
    Parquet file; anything else is refused in one line (``quackae.store.read_encodings``)."""
    from quackae.store import read_encodings

    return read_encodings(source)


# ---------------------------------------------------------------------------------------------- the stage
@dataclass(frozen=True)
class ClassifyConfig(TrainerFlags):
    store: str = field(
        default="storage/store",
        metadata={"positional": True, "path": True, "help": "encoding store directory or exported .parquet"},
    )
    label_field: str = field(default="label", metadata={"help": "metadata field holding the class"})
    out: str = field(default="storage/classifier", metadata={"path": True, "help": "output directory"})
    predict: str | None = field(
        default=None, metadata={"path": True, "help": "apply the classifier in this directory instead of training one"}
    )
    unlabeled_value: str | None = field(default=None, metadata={"help": "label value meaning unlabelled"})
    seed: int = field(default=0, metadata={"help": "seed for the split and initialisation"})
    max_epochs: int = field(default=100, metadata={"help": "maximum epochs"})
    hidden_sizes: tuple[int, ...] = field(default=(256,), metadata={"help": "MLP hidden layer sizes"})
    dropout: float = field(default=0.2, metadata={"help": "dropout after each hidden layer"})
    lr: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    class_weights: bool = field(default=False, metadata={"help": "weight the loss by inverse class frequency"})
    val_fraction: float = field(default=0.15, metadata={"help": "share of each class for validation"})
    test_fraction: float = field(default=0.15, metadata={"help": "share of each class for the test"})
    patience: int = field(default=10, metadata={"help": "early-stopping patience in epochs"})

    def __post_init__(self) -> None:
        self.check_trainer_flags()
        for name in ("dropout", "lr", "weight_decay", "val_fraction", "test_fraction"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must not be negative, got {self.weight_decay}")
        if self.max_epochs < 1 or self.patience < 1:
            raise ValueError("--max-epochs and --patience must be at least 1")
        if any(h <= 0 for h in self.hidden_sizes):
            raise ValueError(f"--hidden-sizes must be positive, got {self.hidden_sizes}")
        if not 0 <= self.dropout < 1 or self.lr <= 0:
            raise ValueError("--dropout must be in [0, 1) and --lr positive")
        if not (
            0 < self.val_fraction < 1 and 0 < self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1
        ):
            raise ValueError("--val-fraction and --test-fraction must be in (0, 1) with a sum below 1")


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


def classify(config: ClassifyConfig) -> dict[str, Any]:
    """Run ``quackae classify`` (train, pick the best on validation, test) or, with ``--predict``, apply one.

    The classifier folder is written whole in a staging folder beside ``--out`` and then takes its place
    (see ``quackae.classifierdir``): a stopped classify leaves the previous one as it was.
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


def _classify_into(config: ClassifyConfig, staging: Path, out: Path) -> dict[str, Any]:
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

    started = time.time()
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
    l_ids, l_x = ids[labelled], matrix[labelled]
    l_labels = [label for label in labels if label is not None]
    l_y = np.asarray([index[label] for label in l_labels], dtype=np.int64)
    split, small = stratified_split(l_ids, l_labels, config.seed, config.val_fraction, config.test_fraction)
    if small:
        log.warning("classes with fewer than 3 items stay in training only (no val/test score): %s", ", ".join(small))
    parts = {name: split == code for code, name in enumerate(("train", "val", "test"))}
    if not parts["val"].any() or not parts["test"].any():
        raise QuackError(f"too few labelled items in {config.store} for validation and test splits")
    pl.seed_everything(config.seed, workers=True, verbose=False)
    counts = np.bincount(l_y[parts["train"]], minlength=len(classes))
    weights = (counts.sum() / np.maximum(counts, 1) / len(classes)).tolist() if config.class_weights else None
    model = LatentClassifier(
        matrix.shape[1],
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
        data = TensorDataset(torch.from_numpy(l_x[mask]), torch.from_numpy(l_y[mask]))
        return DataLoader(data, batch_size=config.batch_size, shuffle=shuffle, num_workers=config.num_workers)

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
    if not trainer.is_global_zero:
        return {}
    best_file = staging / CHECKPOINT
    best = _classifier_from(load_torch_file(best_file, "classifier checkpoint"), best_file)
    with torch.no_grad():
        probabilities = F.softmax(best(torch.from_numpy(matrix)), dim=-1).numpy()  # (N, C)
    predicted = probabilities.argmax(axis=1)
    test = np.flatnonzero(labelled)[parts["test"]]
    report = classification_report(l_y[parts["test"]], predicted[test], classes)
    majority = int(np.argmax(counts))
    baseline_majority = classification_report(l_y[parts["test"]], np.full(int(parts["test"].sum()), majority), classes)

    rows = tuple(np.flatnonzero(parts[name]) for name in ("train", "val", "test"))
    probe_predicted, probe_decay = tuned_linear_probe(
        l_x[rows[0]], l_y[rows[0]], l_x[rows[1]], l_y[rows[1]], l_x[rows[2]], len(classes), config.seed
    )
    baseline_probe = classification_report(l_y[parts["test"]], probe_predicted, classes)
    labelled_metadata = [m for m, label in zip(metadata, labels, strict=True) if label is not None]
    bag, baseline_bag = bag_baseline(config.store, l_ids, labelled_metadata, l_y, rows, classes, config.seed)
    few_label = few_label_report(l_x, bag, l_ids, l_labels, l_y, rows, len(classes), config.seed)
    del bag
    report = {
        "store": config.store,
        "label_field": config.label_field,
        "classes": classes,
        "items": {
            "labelled": int(labelled.sum()),
            "unlabelled": int((~labelled).sum()),
            **{name: int(mask.sum()) for name, mask in parts.items()},
        },
        "small_classes": small,
        **report,
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
        "checkpoint": str(out / CHECKPOINT),
        "config": asdict(config),
        "seconds": round(time.time() - started, 1),
    }
    split_names = np.full(len(ids), "unlabelled", dtype=object)
    split_names[np.flatnonzero(labelled)] = np.asarray(["train", "val", "test"], dtype=object)[split]
    _write_predictions(staging / "predictions.parquet", ids, labels, predicted, probabilities, classes, split_names)
    with atomic_file(staging / "confusion.png", "wb") as handle:
        save_png(confusion_image(report["confusion_matrix"], classes), handle)
    sha = file_sha256(best_file)  # classes.json and report.json name the checkpoint they belong to
    report["checkpoint_sha256"] = sha
    names = {"label_field": config.label_field, "classes": classes, "checkpoint_sha256": sha}
    write_atomic(staging / "classes.json", json.dumps(names) + "\n")
    write_atomic(staging / "report.json", json.dumps(report, indent=2) + "\n")
    commit(staging, out)  # the whole classifier takes --out's place at once
    line = (
        f"test accuracy {report['accuracy']:.3f} (macro-F1 {report['macro_f1']:.3f}) on "
        f"{report['items']['test']} items; majority class {report['baselines']['majority_class']['accuracy']:.3f}, "
        f"linear probe {report['baselines']['linear_probe']['accuracy']:.3f}, bag-of-tokens probe "
        + (
            f"skipped ({baseline_bag['source']})"
            if baseline_bag["accuracy"] is None
            else f"{baseline_bag['accuracy']:.3f}"
        )
    )
    return {
        "out": str(out),
        "accuracy": report["accuracy"],
        "macro_f1": report["macro_f1"],
        "majority_accuracy": report["baselines"]["majority_class"]["accuracy"],
        "linear_probe_accuracy": report["baselines"]["linear_probe"]["accuracy"],
        "bag_of_tokens_accuracy": baseline_bag["accuracy"],
        "lines": [line, _few_label_line(few_label)],
    }


def _few_label_line(few_label: dict[str, Any]) -> str:
    """``few labels (5/10/25/50 per class, mean of 3 draws): encodings 0.31/..., bag of tokens 0.33/...``."""

    def curve(figures: dict[str, Any] | None) -> str:
        return "n/a" if figures is None else "/".join(f"{figures[str(n)]['mean']:.2f}" for n in FEW_LABELS)

    return (
        f"few labels ({'/'.join(map(str, FEW_LABELS))} per class, mean of {few_label['draws']} draws): "
        f"encodings {curve(few_label['encodings'])}, bag of tokens {curve(few_label['bag_of_tokens'])}"
    )


def _write_predictions(
    file: Path,
    ids: np.ndarray,
    labels: list[str | None],
    predicted: np.ndarray,
    probabilities: np.ndarray,
    classes: list[str],
    splits: Any,
) -> None:
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


def predict_with(config: ClassifyConfig) -> dict[str, Any]:
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
    _write_predictions(out / "predictions.parquet", ids, labels, predicted, probabilities, classes, None)
    counts = Counter(classes[k] for k in predicted)
    line = f"predicted {len(ids)} items of {config.store} into {out / 'predictions.parquet'}: " + ", ".join(
        f"{c} {n}" for c, n in counts.most_common()
    )
    return {"out": str(out), "items": len(ids), "lines": [line]}


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
