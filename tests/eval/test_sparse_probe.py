"""The bag-of-tokens probe at any size (sparse features, the same model and decay choice as the dense probe)
and the few-label curve ``classify`` reports, each against a slow reference written here."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from quackae.core.ids import id_hash
from quackae.eval.probes import (
    FEW_LABELS,
    few_label_draw,
    linear_probe,
    stratified_split,
    tuned_linear_probe,
    tuned_sparse_probe,
)
from quackae.eval.sparse import SparseProbe, bag_csr, token_columns
from quackae.stages.classify import ClassifyConfig, classify


def topical_tokens(count: int, vocab: int, classes: int, seed: int = 0) -> tuple[list[list[int]], np.ndarray]:
    """Token id lists whose ids partly come from a band of ids per class, and the classes (N,)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, count)
    lists = []
    for k in labels:
        common = rng.integers(0, vocab, rng.integers(2, 12))
        topical = rng.integers(k * 10, k * 10 + 10, rng.integers(1, 4))
        lists.append([int(t) for t in np.concatenate([common, topical])])
    return lists, labels


def dense_bag(lists: list[list[int]], vocab: int) -> np.ndarray:
    """The slow reference: log(1 + count) of each id, item by item."""
    out = np.zeros((len(lists), vocab), dtype=np.float32)
    for row, tokens in enumerate(lists):
        for token, count in Counter(tokens).items():
            out[row, token] = np.log1p(count)
    return out


def flat(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in lists])]).astype(np.int64)
    return offsets, np.asarray([t for tokens in lists for t in tokens], dtype=np.int64)


def test_the_sparse_bag_and_its_rows_equal_the_dense_bag():
    lists, _ = topical_tokens(120, 50, 3)
    lists[7] = []  # an empty item has an empty row
    bag = bag_csr(*flat(lists), 50)
    np.testing.assert_allclose(bag.dense(), dense_bag(lists, 50), rtol=1e-6)
    positions = np.asarray([5, 7, 0, 119, 5])
    np.testing.assert_allclose(bag.take(positions).dense(), dense_bag(lists, 50)[positions], rtol=1e-6)


def test_token_columns_read_an_arrow_list_column_as_flat_arrays():
    lists = [[3, 1, 4], [], [1, 5, 9, 2, 6], None, [5]]
    column = pa.array(lists, type=pa.list_(pa.int32()))
    chunked = pa.chunked_array([column.slice(0, 2), column.slice(2)])  # sliced chunks: offsets not from 0
    for source in (column, chunked, chunked.take(pa.array([4, 2, 0]))):
        offsets, values = token_columns(source)
        expected = [t or [] for t in source.to_pylist()]
        assert [values[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:], strict=True)] == expected


@pytest.mark.parametrize("decay", [1e-4, 1e-3, 1e-2, 1e-1])
def test_the_sparse_probe_predicts_what_the_dense_probe_predicts(decay):
    lists, labels = topical_tokens(300, 60, 4, seed=1)
    for row in (210, 250, 290):
        lists[row] += [61, 61]  # an id no training item has
    features = dense_bag(lists, 62)
    bag = bag_csr(*flat(lists), 62)
    train, test = np.arange(200), np.arange(200, 300)
    # some test items hold ids no training item has: the columns constant over training
    assert (features[test][:, features[train].std(axis=0) == 0] > 0).any()
    dense = linear_probe(features[train], labels[train], features[test], 4, seed=0, weight_decay=decay)
    (sparse,) = SparseProbe(bag.take(train), labels[train], 4, seed=0).fit(decay, [bag.take(test)])
    np.testing.assert_array_equal(sparse, dense)


def test_the_probe_leaves_out_columns_constant_over_training():
    rng = np.random.default_rng(0)
    labels = np.arange(90) % 3
    x = (rng.standard_normal((90, 6)) + labels[:, None]).astype(np.float32)
    x[:60, 5] = 0.0  # never seen in training, huge on the test items
    x[60:, 5] = 50.0 * (2 - labels[60:])
    without = linear_probe(x[:60, :5], labels[:60], x[60:, :5], 3, seed=0)
    with_it = linear_probe(x[:60], labels[:60], x[60:], 3, seed=0)
    np.testing.assert_array_equal(with_it, without)
    assert (with_it == labels[60:]).mean() > 0.8


def test_the_sparse_probe_chooses_the_dense_probes_weight_decay():
    lists, labels = topical_tokens(400, 80, 5, seed=2)
    features, bag = dense_bag(lists, 80), bag_csr(*flat(lists), 80)
    train, val, test = np.arange(260), np.arange(260, 330), np.arange(330, 400)
    dense, dense_decay = tuned_linear_probe(
        features[train], labels[train], features[val], labels[val], features[test], 5, seed=0
    )
    sparse, sparse_decay = tuned_sparse_probe(
        bag.take(train), labels[train], bag.take(val), labels[val], bag.take(test), 5, seed=0
    )
    assert sparse_decay == dense_decay
    np.testing.assert_array_equal(sparse, dense)


def test_few_label_draws_take_the_first_items_of_each_class_in_a_keyed_hash_order():
    ids = np.arange(1000, 1300)
    labels = ["a"] * 150 + ["b"] * 120 + ["rare"] * 30
    split, _ = stratified_split(ids, labels, 0, 0.15, 0.15)
    train = np.flatnonzero(split == 0)
    for draw in range(3):
        chosen = few_label_draw(ids, labels, train, 25, draw, seed=7)
        for label in ("a", "b", "rare"):
            pool = [p for p in train if labels[p] == label]
            expected = sorted(pool, key=lambda p: id_hash(ids[p], f"few:7:{draw}"))[:25]
            assert sorted(p for p in chosen if labels[p] == label) == sorted(expected)
        assert set(few_label_draw(ids, labels, train, 10, draw, seed=7)) <= set(chosen)  # nested sizes
    counts = Counter(labels[p] for p in few_label_draw(ids, labels, train, 25, 0, seed=7))
    assert counts == {"a": 25, "b": 25, "rare": 22}  # a class with fewer training items gives all it has
    first, second = (set(few_label_draw(ids, labels, train, 5, draw, seed=7)) for draw in (0, 1))
    assert first != second and first == set(few_label_draw(ids, labels, train, 5, 0, seed=7))


def topical_store(tmp_path, count: int = 240, classes: int = 4):
    """A store whose items' text is their tokens, with a run's tokenizer, and encodings that carry the class."""
    from conftest import STORE_HEADER

    from quackae.data.tokenizer import tokenizer_hash, train_tokenizer
    from quackae.store.writer import AutoencoderWriter

    words = [f"w{k}" for k in range(60)]
    lists, labels = topical_tokens(count, 60, classes, seed=3)
    texts = [" ".join(words[t] for t in tokens) for tokens in lists]
    tokenizer = train_tokenizer(iter(texts), vocab_size=300, min_frequency=1, show_progress=False)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    rng = np.random.default_rng(0)
    matrix = (np.eye(classes)[labels] * 2 + rng.standard_normal((count, classes))).astype(np.float32)
    metas = [{"id": i, "label": f"c{k}", "text": text} for i, (k, text) in enumerate(zip(labels, texts, strict=True))]
    header = {**STORE_HEADER, "layout": "shards", "encoding_size": classes, "selection": {}, "text": True,
              "tokenizer": str(tmp_path / "tokenizer.json"), "tokenizer_sha256": tokenizer_hash(tokenizer)}  # fmt: skip
    writer = AutoencoderWriter(storage_path=tmp_path / "store", manifest=header)
    writer.write_batch(metas, matrix)
    writer.flush()
    writer.write_manifest()
    return tmp_path / "store"


def test_classify_reports_the_bag_at_any_size_and_the_few_label_curve(tmp_path, monkeypatch):
    import quackae.stages.classify

    monkeypatch.setattr(quackae.stages.classify, "MAX_BAG_CELLS", 1000, raising=False)  # no cap reads it any more
    store = topical_store(tmp_path)
    summary = classify(ClassifyConfig(store=str(store), out=str(tmp_path / "c"), max_epochs=2, accelerator="cpu",
                                      devices="1"))  # fmt: skip
    report = json.loads((tmp_path / "c/report.json").read_text())
    bag = report["baselines"]["bag_of_tokens_probe"]
    assert bag["accuracy"] is not None and bag["path"].startswith("sparse: 240 items x "), bag
    assert bag["source"].startswith("text metadata tokenized with")
    assert bag["seconds"] >= 0 and bag["peak_rss_mb"] > 0
    few = report["few_label"]
    assert few["per_class"] == list(FEW_LABELS) and few["draws"] >= 2
    for name in ("encodings", "bag_of_tokens"):
        for n in FEW_LABELS:
            figures = few[name][str(n)]
            assert len(figures["draws"]) == few["draws"] and all(0 <= a <= 1 for a in figures["draws"])
            assert figures["mean"] == pytest.approx(np.mean(figures["draws"]), abs=1e-4)
            assert figures["std"] == pytest.approx(np.std(figures["draws"], ddof=1), abs=1e-4)
    # 240 items in 4 classes: about 42 training items each, fewer than 50
    assert set(few["short_classes"]["50"]) == {"c0", "c1", "c2", "c3"} and few["short_classes"]["5"] == []
    line = summary.lines()[1]
    means = [[few[name][str(n)]["mean"] for n in FEW_LABELS] for name in ("encodings", "bag_of_tokens")]
    assert line == (
        f"few labels (5/10/25/50 per class, mean of {few['draws']} draws): "
        f"encodings {'/'.join(f'{m:.2f}' for m in means[0])}, bag of tokens {'/'.join(f'{m:.2f}' for m in means[1])}"
    )
    # the draws are seeded: a second run gives the same curve
    classify(ClassifyConfig(store=str(store), out=str(tmp_path / "c2"), max_epochs=2, accelerator="cpu", devices="1"))
    assert json.loads((tmp_path / "c2/report.json").read_text())["few_label"]["encodings"] == few["encodings"]


def test_the_few_label_curve_chooses_each_sizes_decay_once_and_sums_up_the_draws():
    from quackae.eval.probes import few_label_curve

    ids = np.arange(200)
    labels = ["a", "b"] * 100
    calls = []

    def probe(chosen, decay):
        calls.append((len(chosen), decay))
        return len(chosen) / 1000 + (0.0 if decay is None else 0.001 * len(calls)), 0.01 if decay is None else decay

    figures = few_label_curve(probe, ids, labels, np.arange(150), seed=0, sizes=(5, 10), draws=3)
    assert calls == [(10, None), (10, 0.01), (10, 0.01), (20, None), (20, 0.01), (20, 0.01)]
    assert figures["5"]["draws"] == [0.01, 0.012, 0.013] and figures["5"]["weight_decay"] == 0.01
    assert figures["5"]["mean"] == pytest.approx(np.mean([0.01, 0.012, 0.013]), abs=1e-4)
    assert figures["5"]["std"] == pytest.approx(np.std([0.01, 0.012, 0.013], ddof=1), abs=1e-4)
