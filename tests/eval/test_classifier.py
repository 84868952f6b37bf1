from __future__ import annotations

import numpy as np
import pytest
from conftest import write_hand_made_store

from quackae.cli.command import main
from quackae.eval.probes import classification_report, stratified_split
from quackae.stages.classify import ClassifyConfig, classify


def write_store(path, matrix, metas):
    write_hand_made_store(path, matrix, metas)
    return path


def separable(count=600, classes=3, size=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, size)) * 4
    labels = np.arange(count) % classes
    matrix = (centres[labels] + rng.standard_normal((count, size))).astype(np.float32)
    metas = [{"id": i, "label": f"c{k}"} for i, k in enumerate(labels)]
    return matrix, metas


def test_separable_encodings_reach_high_accuracy(tmp_path):
    matrix, metas = separable()
    store = write_store(tmp_path / "store", matrix, metas)
    summary = classify(
        ClassifyConfig(
            store=str(store), out=str(tmp_path / "clf"), accelerator="cpu", devices="1", max_epochs=40, seed=0
        )
    )
    assert summary["accuracy"] >= 0.95
    assert summary["majority_accuracy"] < 0.5


def test_stratified_split_is_deterministic_and_keeps_small_classes_in_training():
    ids = np.arange(100, 400)
    labels = ["a"] * 200 + ["b"] * 98 + ["tiny"] * 2
    split, small = stratified_split(ids, labels, seed=3, val_fraction=0.2, test_fraction=0.1)
    again, _ = stratified_split(ids[::-1], labels[::-1], seed=3, val_fraction=0.2, test_fraction=0.1)
    assert np.array_equal(split, again[::-1])
    assert small == ["tiny"] and (split[-2:] == 0).all()
    a = split[:200]
    assert (a == 2).sum() == 20 and (a == 1).sum() == 40


def test_report_figures_match_a_hand_count():
    true = np.array([0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 1, 1, 1, 2, 0])
    report = classification_report(true, predicted, ["x", "y", "z"])
    assert report["accuracy"] == pytest.approx(4 / 6, abs=1e-4)
    assert report["per_class"]["y"] == {"precision": 0.6667, "recall": 1.0, "f1": 0.8, "support": 2}
    assert report["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert report["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3, abs=1e-4)


@pytest.mark.parametrize(
    ("metas", "flags", "message"),
    [
        ([{"id": i, "label": "only"} for i in range(30)], [], "one class \\('only'\\)"),
        ([{"id": i, "topic": "x"} for i in range(30)], [], "--label-field 'label' is not in the metadata .*topic"),
        ([{"id": i, "label": None} for i in range(30)], [], "no item .* has a 'label' label"),
    ],
)
def test_bad_stores_are_one_line_errors(tmp_path, capsys, metas, flags, message):
    store = write_store(tmp_path / "s", np.ones((len(metas), 4), dtype=np.float32), metas)
    code = main(["classify", str(store), "--out", str(tmp_path / "c"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    import re

    assert re.search(message, err[0]), err[0]
