"""What a classifier's figures are measured against: the split, the report and the baselines.

``stratified_split`` orders each class by the keyed id hash (``selection.id_hash``) and deals out
test, validation and training items; ``classification_report`` gives accuracy, macro-F1, per-class
figures and the confusion matrix; ``linear_probe`` is softmax regression (L-BFGS) on standardised
features, and ``tuned_linear_probe`` picks its weight decay on the validation split (one rule for
every feature set), run on the stored encodings and on ``bag_of_tokens`` of the same items.

Shape glossary: N items, F features, C classes, V vocabulary.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quackae.core.errors import QuackError
from quackae.core.ids import id_hash

log = logging.getLogger(__name__)


def stratified_split(
    ids: np.ndarray, labels: list[str], seed: int, val_fraction: float, test_fraction: float
) -> tuple[np.ndarray, list[str]]:
    """0/1/2 (train/val/test) per item, stratified by label and ordered by a keyed hash of the id."""
    split = np.zeros(len(ids), dtype=np.int8)
    small = []
    key = str(seed).encode()
    by_class: dict[str, list[int]] = {}
    for position, label in enumerate(labels):
        by_class.setdefault(label, []).append(position)
    for label, positions in sorted(by_class.items()):
        if len(positions) < 3:
            small.append(label)
            continue
        positions.sort(key=lambda p: id_hash(ids[p], key))
        n_test = max(1, round(len(positions) * test_fraction))
        n_val = max(1, round(len(positions) * val_fraction))
        for rank, position in enumerate(positions):
            split[position] = 2 if rank < n_test else 1 if rank < n_test + n_val else 0
    return split, small


# ---------------------------------------------------------------------------------------------- metrics
def classification_report(true: np.ndarray, predicted: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix (rows: true)."""
    count = len(classes)
    confusion = np.zeros((count, count), dtype=np.int64)
    np.add.at(confusion, (true, predicted), 1)
    per_class, f1s = {}, []
    for k, name in enumerate(classes):
        tp = int(confusion[k, k])
        precision = tp / max(int(confusion[:, k].sum()), 1)
        recall = tp / max(int(confusion[k].sum()), 1)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "f1": round(f1, 4),
            "support": int(confusion[k].sum()),
        }
        if confusion[k].sum():
            f1s.append(f1)
    accuracy = float((true == predicted).mean()) if len(true) else float("nan")
    return {
        "accuracy": round(accuracy, 4),
        "macro_f1": round(float(np.mean(f1s)) if f1s else 0.0, 4),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
    }


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    classes: int,
    seed: int,
    weight_decay: float = 1e-3,
    steps: int = 300,
) -> np.ndarray:
    """Softmax regression on standardised features (full-batch L-BFGS); returns test predictions."""
    torch.manual_seed(seed)
    # standardised in float64: the sum and the squares of large features overflow float32
    mean, std = train_x.mean(axis=0, dtype=np.float64), train_x.std(axis=0, dtype=np.float64) + 1e-6
    x = torch.from_numpy(((train_x - mean) / std).astype(np.float32))
    y = torch.from_numpy(train_y)
    layer = nn.Linear(x.size(1), classes)
    optimizer = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(layer(x), y) + weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return layer(torch.from_numpy(((test_x - mean) / std).astype(np.float32))).argmax(-1).numpy()


# The probe's L2 weight decay grid; ``tuned_linear_probe`` picks one on validation for each feature set.
PROBE_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)


def tuned_linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    test_x: np.ndarray,
    classes: int,
    seed: int,
    decays: tuple[float, ...] = PROBE_DECAYS,
) -> tuple[np.ndarray, float]:
    """``linear_probe`` with its weight decay chosen on validation: fit on train with each of ``decays``,
    keep the one with the best validation accuracy (ties: the larger decay), and return its test
    predictions and that decay. Without validation items the middle of the grid is used."""
    if len(val_y) == 0:
        decay = decays[len(decays) // 2]
        return linear_probe(train_x, train_y, test_x, classes, seed, weight_decay=decay), decay
    both = np.concatenate([val_x, test_x])  # (Nv + Nt, F): one fit scores validation and test alike
    best: tuple[float, float, np.ndarray] | None = None
    for decay in sorted(decays):
        predicted = linear_probe(train_x, train_y, both, classes, seed, weight_decay=decay)
        accuracy = float((predicted[: len(val_y)] == val_y).mean())
        log.debug("probe weight decay %g: validation accuracy %.4f", decay, accuracy)
        if best is None or accuracy >= best[0]:
            best = (accuracy, decay, predicted[len(val_y) :])
    assert best is not None
    return best[2], best[1]


def bag_of_tokens(sequences: list[list[int]], vocab_size: int) -> np.ndarray:
    """Token counts (N, V) float32 of token id lists: row n, column v counts id v in item n."""
    counts = np.zeros((len(sequences), vocab_size), dtype=np.float32)
    rows = np.repeat(np.arange(len(sequences)), [len(s) for s in sequences])
    columns = np.fromiter((t for s in sequences for t in s), dtype=np.int64, count=len(rows))
    np.add.at(counts, (rows, columns), 1.0)
    return counts


def store_token_sequences(source: str | Path, ids: np.ndarray, metadata: list[dict[str, Any]]) -> tuple[Any, str]:
    """Token ids of each item ``ids`` of a store, as the run's tokenizer gives them: ``(lists, vocab size)``
    and where they came from, or ``(None, why not)``.

    The tokenizer the store's ``manifest.json`` names must still be the one it records (``tokenizer_sha256``).
    The prepared dataset it names (``dataset``: the exact ids the encoder saw) is used only while its
    fingerprint is the store's ``dataset_fingerprint`` (a prepare into that folder since then replaced it);
    otherwise the items' ``text`` metadata is tokenized. An exported Parquet file carries no manifest, so it
    gets ``None``. Nothing here raises for a folder or file that is gone or damaged: the reason is returned.
    """
    from quackae.core.files import read_json

    manifest_file = Path(source) / "manifest.json"
    if not manifest_file.is_file():
        return None, f"{source} has no manifest.json naming the run's tokenizer"
    try:
        manifest = read_json(manifest_file, "store manifest")
        tokenizer, vocab = _store_tokenizer(manifest, manifest_file)
    except QuackError as error:
        return None, str(error)
    dataset_dir, why = manifest.get("dataset"), ""
    if isinstance(dataset_dir, str) and (Path(dataset_dir) / "dataset").exists():
        found, why = _dataset_tokens(Path(dataset_dir), manifest.get("dataset_fingerprint"), ids, vocab)
        if found is not None:
            return (found, vocab), f"{dataset_dir}/dataset input_ids"
    if all(isinstance(m.get("text"), str) for m in metadata):
        encoded = tokenizer.encode_batch([m["text"] for m in metadata], add_special_tokens=False)
        return ([e.ids for e in encoded], vocab), f"text metadata tokenized with {manifest.get('tokenizer')}" + (
            f" ({why})" if why else ""
        )
    return None, why or f"the prepared dataset {manifest_file} names is gone and the items have no text"


def _store_tokenizer(manifest: dict[str, Any], manifest_file: Path) -> tuple[Any, int]:
    """``(tokenizer, vocabulary size)`` the manifest names, checked against the hash it records."""
    from quackae.data.tokenizer import load_tokenizer, tokenizer_hash

    file = manifest.get("tokenizer")
    if not isinstance(file, str) or not Path(file).is_file():
        raise QuackError(f"the tokenizer {manifest_file} names ({file}) is gone")
    tokenizer = load_tokenizer(file)
    if manifest.get("tokenizer_sha256") != tokenizer_hash(tokenizer):
        raise QuackError(f"the tokenizer {file} is no longer the one the store was encoded with")
    return tokenizer, tokenizer.get_vocab_size()


def _dataset_tokens(
    directory: Path, fingerprint: Any, ids: np.ndarray, vocab: int
) -> tuple[list[list[int]] | None, str]:
    """The ``input_ids`` of items ``ids`` in a prepared folder whose dataset has ``fingerprint``, else why not."""
    from quackae.data.prepared import load_prepared

    try:
        dataset, _, _ = load_prepared(directory)
        if fingerprint is None:
            return None, f"the store records no fingerprint of the prepared data in {directory} to check it by"
        if dataset.fingerprint != fingerprint:
            return None, f"the prepared data in {directory} changed since the store was encoded"
        columns = dataset.select_columns(["id", "input_ids"]).to_dict()
    except Exception as error:  # noqa: BLE001 - a damaged dataset is a reason to skip, whatever datasets raises
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]
        return None, f"the prepared data in {directory} cannot be read ({reason})"
    position = {int(i): k for k, i in enumerate(columns["id"])}
    if not all(int(i) in position for i in ids):
        return None, f"the prepared data in {directory} lacks some of the store's ids"
    rows = [columns["input_ids"][position[int(i)]] for i in ids]
    if any(t < 0 or t >= vocab for row in rows for t in row):
        return None, f"the prepared data in {directory} holds token ids outside the tokenizer's vocabulary"
    return rows, ""
