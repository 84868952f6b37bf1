"""What a classifier's figures are measured against: the split, the report and the baselines.

``stratified_split`` orders each class by the keyed id hash (``selection.id_hash``) and deals out
test, validation and training items; ``classification_report`` gives accuracy, macro-F1, per-class
figures and the confusion matrix; ``linear_probe`` is softmax regression (L-BFGS) on standardised
features, and ``tuned_linear_probe`` picks its weight decay on the validation split (``choose_decay``:
one rule for every feature set), run on the stored encodings; ``tuned_sparse_probe`` is the same on
sparse bags of tokens of the same items (``sparse``), read by ``store_tokens``. ``few_label_draw``
deals out 5, 10, 25 or 50 training items per class in the split's keyed hash order (``hash_order``),
and ``few_label_curve`` scores a probe over several such draws.

Shape glossary: N items, F features, C classes, V vocabulary.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quackae.errors import QuackError
from quackae.selection import id_hashes
from quackae.sparse import Csr, SparseProbe, bag_csr, token_columns, varying

log = logging.getLogger(__name__)


def hash_order(ids: np.ndarray, labels: list[str], key: str) -> dict[str, list[int]]:
    """Positions of each label's items, ordered by the keyed id hash (``selection.id_hash``): the one order
    the split and the few-label draws deal items out in."""
    by_class: dict[str, list[int]] = {}
    for position, label in enumerate(labels):
        by_class.setdefault(label, []).append(position)
    hashes = id_hashes(ids, key.encode())
    return {label: sorted(positions, key=hashes.__getitem__) for label, positions in sorted(by_class.items())}


def stratified_split(
    ids: np.ndarray, labels: list[str], seed: int, val_fraction: float, test_fraction: float
) -> tuple[np.ndarray, list[str]]:
    """0/1/2 (train/val/test) per item, stratified by label and ordered by a keyed hash of the id."""
    split = np.zeros(len(ids), dtype=np.int8)
    small = []
    for label, positions in hash_order(ids, labels, str(seed)).items():
        if len(positions) < 3:
            small.append(label)
            continue
        n_test = max(1, round(len(positions) * test_fraction))
        n_val = max(1, round(len(positions) * val_fraction))
        for rank, position in enumerate(positions):
            split[position] = 2 if rank < n_test else 1 if rank < n_test + n_val else 0
    return split, small


FEW_LABELS = (5, 10, 25, 50)  # labelled items per class in the few-label regime
FEW_LABEL_DRAWS = 3  # seeded draws of those items for each size


def few_label_draw(
    ids: np.ndarray, labels: list[str], train: np.ndarray, per_class: int, draw: int, seed: int
) -> np.ndarray:
    """Positions of the first ``per_class`` training items ``train`` of each label in the keyed hash order of
    draw ``draw`` (key ``few:SEED:DRAW``); a label with fewer training items gives all of them. One draw's
    items for a size are among its items for every larger size."""
    chosen = hash_order(ids[train], [labels[p] for p in train], f"few:{seed}:{draw}")
    return np.sort(np.concatenate([train[positions[:per_class]] for positions in chosen.values()]))


def few_label_curve(
    probe: Callable[[np.ndarray, float | None], tuple[float, float]], ids: np.ndarray, labels: list[str],
    train: np.ndarray, seed: int, sizes: tuple[int, ...] = FEW_LABELS, draws: int = FEW_LABEL_DRAWS,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Per size in ``sizes``: ``probe(training positions, weight decay) -> (test accuracy, weight decay)`` over
    ``draws`` draws (``few_label_draw``): mean, sample standard deviation, every draw's accuracy, and the
    weight decay. The first draw of a size chooses the decay on validation (``probe`` given None); the
    other draws of that size reuse it, which halves the fits."""
    figures = {}
    for per_class in sizes:
        first, decay = probe(few_label_draw(ids, labels, train, per_class, 0, seed), None)
        scores = np.asarray(
            [first] + [probe(few_label_draw(ids, labels, train, per_class, d, seed), decay)[0] for d in range(1, draws)]
        )
        figures[str(per_class)] = {
            "mean": round(float(scores.mean()), 4),
            "std": round(float(scores.std(ddof=1)), 4) if len(scores) > 1 else 0.0,
            "draws": [round(float(a), 4) for a in scores],
            "weight_decay": decay,
        }
    return figures


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
    """Softmax regression on standardised features (full-batch L-BFGS); returns test predictions.

    Columns constant over the training rows are left out (``sparse.varying``); ``sparse.SparseProbe`` is
    this model on sparse features."""
    torch.manual_seed(seed)
    # standardised in float64: the sum and the squares of large features overflow float32
    mean, variance = train_x.mean(axis=0, dtype=np.float64), train_x.var(axis=0, dtype=np.float64)
    std = np.where(varying(mean, variance), np.sqrt(variance) + 1e-6, np.inf)  # a constant column becomes 0
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
    """``linear_probe`` with its weight decay chosen on validation (``choose_decay``): its test predictions
    and that decay."""
    both = np.concatenate([val_x, test_x])  # (Nv + Nt, F): one fit scores validation and test alike

    def fit(decay: float) -> tuple[np.ndarray, np.ndarray]:
        predicted = linear_probe(train_x, train_y, both, classes, seed, weight_decay=decay)
        return predicted[: len(val_y)], predicted[len(val_y) :]

    return choose_decay(fit, val_y, decays)


def tuned_sparse_probe(
    train: Csr, train_y: np.ndarray, val: Csr, val_y: np.ndarray, test: Csr, classes: int, seed: int,
    decays: tuple[float, ...] = PROBE_DECAYS,
) -> tuple[np.ndarray, float]:  # fmt: skip
    """``tuned_linear_probe`` on sparse features (``sparse.SparseProbe``, the same model): the same choice of
    weight decay, the training matrix scaled and indexed once for every decay tried."""
    probe = SparseProbe(train, train_y, classes, seed)

    def fit(decay: float) -> tuple[np.ndarray, np.ndarray]:
        val_predicted, test_predicted = probe.fit(decay, [val, test])
        return val_predicted, test_predicted

    return choose_decay(fit, val_y, decays)


def choose_decay(
    fit: Callable[[float], tuple[np.ndarray, np.ndarray]], val_y: np.ndarray, decays: tuple[float, ...]
) -> tuple[np.ndarray, float]:
    """The weight decay rule every probe follows: ``fit(decay)`` gives ``(validation, test)`` predictions for
    each of ``decays``; keep the one with the best validation accuracy (ties: the larger decay) and return
    its test predictions and that decay. Without validation items the middle of the grid is used."""
    if len(val_y) == 0:
        decay = decays[len(decays) // 2]
        return fit(decay)[1], decay
    best: tuple[float, float, np.ndarray] | None = None
    for decay in sorted(decays):
        val_predicted, test_predicted = fit(decay)
        accuracy = float((val_predicted == val_y).mean())
        log.debug("probe weight decay %g: validation accuracy %.4f", decay, accuracy)
        if best is None or accuracy >= best[0]:
            best = (accuracy, decay, test_predicted)
    assert best is not None
    return best[2], best[1]


def bag_of_tokens(sequences: list[list[int]], vocab_size: int) -> np.ndarray:
    """Token counts (N, V) float32 of token id lists: row n, column v counts id v in item n."""
    counts = np.zeros((len(sequences), vocab_size), dtype=np.float32)
    rows = np.repeat(np.arange(len(sequences)), [len(s) for s in sequences])
    columns = np.fromiter((t for s in sequences for t in s), dtype=np.int64, count=len(rows))
    np.add.at(counts, (rows, columns), 1.0)
    return counts


def store_tokens(source: str | Path, ids: np.ndarray, metadata: list[dict[str, Any]]) -> tuple[Any, str]:
    """Token ids of each item ``ids`` of a store, as the run's tokenizer gives them: ``((offsets (N + 1,),
    values (T,)), vocab size)`` (item n holds ``values[offsets[n]:offsets[n + 1]]``, ``sparse.token_columns``)
    and where they came from, or ``(None, why not)``.

    The tokenizer the store's ``manifest.json`` names must still be the one it records (``tokenizer_sha256``).
    The prepared dataset it names (``dataset``: the exact ids the encoder saw) is used only while its
    fingerprint is the store's ``dataset_fingerprint`` (a prepare into that folder since then replaced it);
    its ``input_ids`` Arrow column is read as flat arrays. Otherwise the items' ``text`` metadata is
    tokenized. An exported Parquet file carries no manifest, so it gets ``None``. Nothing here raises for a
    folder or file that is gone or damaged: the reason is returned.
    """
    from quackae.files import read_json

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
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e.ids) for e in encoded], out=offsets[1:])
        values = np.fromiter((t for e in encoded for t in e.ids), dtype=np.int64, count=int(offsets[-1]))
        return ((offsets, values), vocab), f"text metadata tokenized with {manifest.get('tokenizer')}" + (
            f" ({why})" if why else ""
        )
    return None, why or f"the prepared dataset {manifest_file} names is gone and the items have no text"


def _store_tokenizer(manifest: dict[str, Any], manifest_file: Path) -> tuple[Any, int]:
    """``(tokenizer, vocabulary size)`` the manifest names, checked against the hash it records."""
    from quackae.tokenizer import load_tokenizer, tokenizer_hash

    file = manifest.get("tokenizer")
    if not isinstance(file, str) or not Path(file).is_file():
        raise QuackError(f"the tokenizer {manifest_file} names ({file}) is gone")
    tokenizer = load_tokenizer(file)
    if manifest.get("tokenizer_sha256") != tokenizer_hash(tokenizer):
        raise QuackError(f"the tokenizer {file} is no longer the one the store was encoded with")
    return tokenizer, tokenizer.get_vocab_size()


def _dataset_tokens(
    directory: Path, fingerprint: Any, ids: np.ndarray, vocab: int
) -> tuple[tuple[np.ndarray, np.ndarray] | None, str]:
    """``(offsets, values)`` of the ``input_ids`` of items ``ids`` in a prepared folder whose dataset has
    ``fingerprint``, else why not; the rows are found and gathered with numpy and Arrow, not item by item."""
    from quackae.prepared import load_prepared
    from quackae.runrecord import dataset_fingerprint

    try:
        dataset, _, _ = load_prepared(directory)
        if fingerprint is None:
            return None, f"the store records no fingerprint of the prepared data in {directory} to check it by"
        if dataset_fingerprint(dataset) != fingerprint:
            return None, f"the prepared data in {directory} changed since the store was encoded"
        stored = dataset.data.column("id").to_numpy().astype(np.int64, copy=False)  # (R,)
        order = np.argsort(stored, kind="stable")
        wanted = np.asarray(ids, dtype=np.int64)
        at = np.minimum(np.searchsorted(stored, wanted, sorter=order), max(len(stored) - 1, 0))
        if len(wanted) and (not len(stored) or (stored[order[at]] != wanted).any()):
            return None, f"the prepared data in {directory} lacks some of the store's ids"
        offsets, values = token_columns(dataset.data.column("input_ids").take(order[at]))
    except Exception as error:  # noqa: BLE001 - a damaged dataset is a reason to skip, whatever Arrow raises
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]
        return None, f"the prepared data in {directory} cannot be read ({reason})"
    if len(values) and (values.min() < 0 or values.max() >= vocab):
        return None, f"the prepared data in {directory} holds token ids outside the tokenizer's vocabulary"
    return (offsets, values), ""


# ---------------------------------------------------------------------------------------------- classify's baselines
def bag_baseline(
    store: str | Path, ids: np.ndarray, metadata: list[dict[str, Any]], y: np.ndarray,
    rows: tuple[np.ndarray, np.ndarray, np.ndarray], classes: list[str], seed: int,
) -> tuple[Csr | None, dict[str, Any]]:  # fmt: skip
    """The linear probe on bags of tokens (sparse log(1 + count), ``tuned_sparse_probe``) of the labelled
    items ``ids`` with labels ``y``, fitted on ``rows`` = (train, validation, test) positions: the bag and
    its figures, with the time and the process's peak memory; ``(None, figures of None)`` with the reason
    under ``source`` when the tokens cannot be had as the encoder saw them (``store_tokens``)."""
    started = time.perf_counter()
    tokens, source = store_tokens(store, ids, metadata)
    if tokens is None:
        log.warning("no bag-of-tokens baseline: %s", source)
        return None, {"accuracy": None, "macro_f1": None, "source": source}
    (offsets, values), vocab = tokens
    bag = bag_csr(offsets, values, vocab)
    del offsets, values
    train, val, test = rows
    predicted, decay = tuned_sparse_probe(
        bag.take(train), y[train], bag.take(val), y[val], bag.take(test), len(classes), seed
    )
    report = classification_report(y[test], predicted, classes)
    return bag, {
        "accuracy": report["accuracy"],
        "macro_f1": report["macro_f1"],
        "weight_decay": decay,
        "source": source,
        "path": f"sparse: {bag.rows} items x {vocab} tokens, {len(bag.data)} non-zero cells",
        "seconds": round(time.perf_counter() - started, 2),
        "peak_rss_mb": peak_rss_mb(),
    }


def peak_rss_mb() -> int:
    """This process's peak resident memory so far, in MB (the high-water mark, whatever reached it)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)


def few_label_report(
    encodings: np.ndarray, bag: Csr | None, ids: np.ndarray, labels: list[str], y: np.ndarray,
    rows: tuple[np.ndarray, np.ndarray, np.ndarray], classes: int, seed: int,
) -> dict[str, Any]:  # fmt: skip
    """The few-label curve (``few_label_curve``) of the linear probe on ``encodings`` (N, F) and on ``bag``
    (None: no bag), each draw taken from the training positions, the weight decay chosen on the whole
    validation split (once per size), scored on the whole test split; ``short_classes`` names, per size,
    the labels with fewer training items than that size (they take part with all they have)."""
    started = time.perf_counter()
    train, val, test = rows

    def on_encodings(chosen: np.ndarray, decay: float | None) -> tuple[float, float]:
        if decay is not None:
            predicted = linear_probe(encodings[chosen], y[chosen], encodings[test], classes, seed, weight_decay=decay)
            return float((predicted == y[test]).mean()), decay
        predicted, decay = tuned_linear_probe(
            encodings[chosen], y[chosen], encodings[val], y[val], encodings[test], classes, seed
        )
        return float((predicted == y[test]).mean()), decay

    bag_val, bag_test = (bag.take(val), bag.take(test)) if bag is not None else (None, None)

    def on_bag(chosen: np.ndarray, decay: float | None) -> tuple[float, float]:
        assert bag is not None and bag_val is not None and bag_test is not None
        if decay is not None:
            (predicted,) = SparseProbe(bag.take(chosen), y[chosen], classes, seed).fit(decay, [bag_test])
            return float((predicted == y[test]).mean()), decay
        predicted, decay = tuned_sparse_probe(bag.take(chosen), y[chosen], bag_val, y[val], bag_test, classes, seed)
        return float((predicted == y[test]).mean()), decay

    counts = {label: 0 for label in labels}
    for position in train:
        counts[labels[position]] += 1
    return {
        "per_class": list(FEW_LABELS),
        "draws": FEW_LABEL_DRAWS,
        "encodings": few_label_curve(on_encodings, ids, labels, train, seed),
        "bag_of_tokens": None if bag is None else few_label_curve(on_bag, ids, labels, train, seed),
        "short_classes": {str(n): sorted(c for c, k in counts.items() if k < n) for n in FEW_LABELS},
        "seconds": round(time.perf_counter() - started, 2),
    }
