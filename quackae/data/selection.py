"""Which items a store keeps: one ``is_labelled`` rule and one keyed id hash, shared by every stage.

``filtered`` keeps labelled items only (and keeps an item of the majority class ``reduce_label``
with probability ``reduction_threshold``, decided by a hash of seed and id so a rerun makes the
same choice); ``evaluate`` keeps unlabelled items only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from quackae.core.ids import id_hash


def is_labelled(value: Any, unlabeled_value: Any = None) -> bool:
    """Whether a label value counts as a label: not null and not ``unlabeled_value`` (compared as text too)."""
    return value is not None and value != unlabeled_value and str(value) != str(unlabeled_value)


def keep_item(
    metadata: dict[str, Any],
    *,
    filtered: bool,
    evaluate: bool,
    label_field: str | None,
    unlabeled_value: Any = None,
    reduce_label: Any = None,
    reduction_threshold: float = 1.0,
    seed: int = 0,
) -> bool:
    """Whether a store keeps the item with ``metadata`` (see the module docstring)."""
    if label_field is None or not (filtered or evaluate):
        return True
    value = metadata.get(label_field)
    labelled = is_labelled(value, unlabeled_value)
    if evaluate:
        return not labelled
    if not labelled:
        return False
    if reduction_threshold < 1.0 and reduce_label is not None and str(value) == str(reduce_label):
        return id_hash(metadata["id"], f"reduce:{seed}") < reduction_threshold
    return True


def selected_mask(ids: Sequence[int], labels: Sequence[Any] | None, selection: dict[str, Any]) -> np.ndarray:
    """Boolean mask (N,) of the items ``selection`` (a manifest's ``selection``) keeps."""
    field = selection.get("label_field")
    if labels is None or not field or not (selection.get("filtered") or selection.get("evaluate")):
        return np.ones(len(ids), dtype=bool)
    options = {k: selection.get(k) for k in ("filtered", "evaluate", "unlabeled_value", "reduce_label")}
    options["reduction_threshold"] = selection.get("reduction_threshold", 1.0)
    options["seed"] = selection.get("seed", 0)
    return np.fromiter(
        (keep_item({"id": i, field: v}, label_field=field, **options) for i, v in zip(ids, labels, strict=True)),
        dtype=bool,
        count=len(ids),
    )


def batch_selection(ids: np.ndarray, columns: Any, selection: dict[str, Any]) -> np.ndarray:
    """Which rows (B,) of a batch (``ids`` (B,), its metadata ``columns``, a pyarrow table) ``selection`` keeps: a
    writer given every row (a caller driving it itself) keeps what the store's selection says."""
    field = selection.get("label_field")
    if field is None or not (selection.get("filtered") or selection.get("evaluate")):
        return np.ones(len(ids), dtype=bool)
    labels = columns.column(field).to_pylist() if field in columns.column_names else [None] * len(ids)
    return selected_mask(ids.tolist(), labels, selection)


def selected_rows(dataset: Any, selection: dict[str, Any]) -> np.ndarray:
    """Row indices of the items a store with ``selection`` keeps: the others are not worth encoding."""
    field_name = selection.get("label_field")
    labels = None
    if field_name and (selection.get("filtered") or selection.get("evaluate")):
        labels = dataset.data.column(field_name).to_pylist()
    ids = dataset.data.column("id").to_numpy()
    return np.flatnonzero(selected_mask(ids.tolist() if labels is not None else ids, labels, selection))
