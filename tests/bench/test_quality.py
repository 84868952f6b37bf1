"""Representation-quality tools: bag-of-tokens baseline, site-packages corpus, ``bench --what quality``."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from quackae.bench import BenchConfig
from quackae.bench.quality import FEW_LABEL_DRAWS, ProbeSplit, _probe_subset, parse_options, quality_run
from quackae.data.corpus import site_docstrings
from quackae.eval.probes import FEW_LABELS, PROBE_DECAYS, bag_of_tokens, store_tokens, tuned_linear_probe
from quackae.model.config import POOLINGS
from quackae.stages.classify import ClassifyConfig, classify


def test_bag_of_tokens_matches_a_counter():
    sequences = [[3, 4, 3, 2], [5], [2, 2, 2, 7, 1]]
    counts = bag_of_tokens(sequences, 8)
    assert counts.shape == (3, 8) and counts.dtype == np.float32
    for row, sequence in zip(counts, sequences, strict=True):
        expected = Counter(sequence)
        assert {v: int(c) for v, c in enumerate(row) if c} == dict(expected)


def write_package(site: Path, name: str, files: dict[str, str]) -> None:
    for relative, source in {"__init__.py": "", **files}.items():
        path = site / name / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)


def test_site_docstrings_reads_sources_without_importing_them(tmp_path):
    site = tmp_path / "site"
    never_run = "raise SystemExit('imported')\n"
    functions = "".join(
        f'def f{i}():\n    """Alpha function number {i} does a thing.\n\n    More."""\n' for i in range(5)
    )
    write_package(
        site,
        "alpha",
        {
            "core.py": never_run + functions + 'class _Hidden:\n    """A private class is skipped entirely."""\n',
            "tests/test_core.py": 'def test_x():\n    """A test docstring that is never a row."""\n',
            "broken.py": "def (:\n",
        },
    )
    write_package(
        site,
        "beta",
        {
            "m.py": never_run
            + 'class Thing:\n    """Beta thing holds values for later."""\n\n'
            + '    def get(self):\n        """Return the value this beta thing holds."""\n'
            + '    def _private(self):\n        """Never a row either, it is private."""\n'
        },
    )
    write_package(site, "_private", {"x.py": 'def f():\n    """Private package docstring skipped."""\n'})
    (site / "notapackage").mkdir()
    rows = site_docstrings(min_per_label=3, max_labels=5, site=site)
    texts = [row["text"] for row in rows]
    assert texts == [f"Alpha function number {i} does a thing." for i in range(5)] + [
        "Beta thing holds values for later.",
        "Return the value this beta thing holds.",
    ]
    assert [row["id"] for row in rows] == list(range(7))
    assert [row["label"] for row in rows] == ["alpha"] * 5 + [None, None]  # beta has 2 < 3 rows
    assert [row["module"] for row in rows] == ["alpha"] * 5 + ["beta"] * 2
    assert site_docstrings(min_per_label=3, max_labels=5, site=site) == rows  # deterministic


def test_probe_subset_caps_each_label_deterministically():
    ids = np.arange(100, 400)
    labels = ["a"] * 200 + ["b"] * 60 + ["c"] * 40
    chosen = _probe_subset(ids, labels, 50, seed=0)
    assert Counter(labels[i] for i in chosen) == {"a": 50, "b": 50, "c": 40}
    assert np.array_equal(chosen, _probe_subset(ids, labels, 50, seed=0))
    assert np.array_equal(_probe_subset(ids, labels, 0, seed=0), np.arange(300))


def toy_split(seed: int = 0) -> tuple[ProbeSplit, np.ndarray]:
    """Three classes of 40, 30 and 8 items (split 70/15/15 by position), features: the class plus noise."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), [40, 30, 8])
    split = np.concatenate(
        [np.repeat([0, 1, 2], [round(n * 0.7), n - round(n * 0.7) - n // 6, n // 6]) for n in (40, 30, 8)]
    )
    features = (np.eye(3)[y] * 2 + rng.normal(size=(len(y), 3))).astype(np.float32)
    return ProbeSplit(np.arange(1000, 1000 + len(y)), y, split, 3, seed), features


def test_few_label_draws_take_n_training_items_per_class_the_same_way_every_time():
    probe, _ = toy_split()
    available = Counter(probe.y[probe.train].tolist())
    assert available == {0: 28, 1: 21, 2: 6}
    for per_class in FEW_LABELS:
        draws = [probe.draw(per_class, n) for n in range(FEW_LABEL_DRAWS)]
        for number, drawn in enumerate(draws):
            assert set(drawn) <= set(probe.train) and len(set(drawn)) == len(drawn)
            assert Counter(probe.y[drawn].tolist()) == {c: min(per_class, available[c]) for c in range(3)}
            assert np.array_equal(drawn, probe.draw(per_class, number))  # the same draw every time
        if per_class <= 10:
            assert len({tuple(d) for d in draws}) == FEW_LABEL_DRAWS  # and different draws differ
    assert not np.array_equal(toy_split(seed=1)[0].draw(5, 0), probe.draw(5, 0))  # the seed keys the draws


def test_few_label_figures_are_the_probe_on_each_draw():
    probe, features = toy_split()
    figures = probe.few_label(features)
    assert list(figures) == [str(n) for n in FEW_LABELS]
    for per_class in (5, 25):
        expected, decay = [], None
        for number in range(FEW_LABEL_DRAWS):  # the first draw chooses the decay on validation, the others reuse it
            drawn = probe.draw(per_class, number)
            predicted, chosen = tuned_linear_probe(
                features[drawn], probe.y[drawn], features[probe.val], probe.y[probe.val], features[probe.test], 3, 0,
                PROBE_DECAYS if decay is None else (decay,),
            )  # fmt: skip
            decay = chosen if decay is None else decay
            expected.append(round(float((predicted == probe.y[probe.test]).mean()), 4))
        entry = figures[str(per_class)]
        assert entry["draws"] == expected
        assert entry["mean"] == pytest.approx(np.mean(expected), abs=1e-4)
        assert entry["std"] == pytest.approx(np.std(expected, ddof=1), abs=1e-4)
        assert entry["weight_decay"] == decay


def test_the_bench_draws_the_few_labelled_items_classify_draws():
    from quackae.eval.probes import few_label_draw

    probe, _ = toy_split()
    labels = [str(c) for c in probe.y.tolist()]
    for per_class, number in ((5, 0), (10, 2), (25, 4)):
        expected = few_label_draw(probe.ids, labels, probe.train, per_class, number, probe.seed)
        assert np.array_equal(probe.draw(per_class, number), expected)


def test_a_column_constant_over_the_training_items_does_not_move_the_probe():
    probe, features = toy_split()
    rare = np.zeros((len(probe.y), 1), dtype=np.float32)
    rare[probe.test[::2]] = 3.0  # a token no training item has, present in test items only
    assert probe.accuracy(np.hstack([features, rare])) == probe.accuracy(features)
    drawn = probe.draw(5, 0)
    assert probe.accuracy(np.hstack([features, rare]), drawn) == probe.accuracy(features, drawn)


def test_parse_options_types_values_and_rejects_unknown_names():
    assert parse_options(("pooling=mean", "dropout=0.2", "hidden_size=64", "bucket=false")) == {
        "pooling": "mean",
        "dropout": 0.2,
        "hidden_size": 64,
        "bucket": False,
    }
    for bad in ("pooling", "nonsense=1", "max_steps=5", "hidden_size=x", "pooling=nope", "bucket=maybe"):
        with pytest.raises(ValueError, match="--option"):
            parse_options((bad,))


def test_an_option_is_read_as_quackae_train_reads_its_flag():
    from quackae.cli.command import build_parser

    options = ("pooling=final+mean", "dropout=0.25", "hidden_size=48", "bucket=no", "denoise=0.1", "gradient_clip=5e-1")
    flags = ["--pooling", "final+mean", "--dropout", "0.25", "--hidden-size", "48", "--no-bucket", "--denoise", "0.1"]
    namespace = build_parser("train").parse_args(["train", "data", *flags, "--gradient-clip", "5e-1"])
    parsed = parse_options(options)
    assert parsed == {name: getattr(namespace, name) for name in parsed}
    assert type(parsed["hidden_size"]) is int and type(parsed["gradient_clip"]) is float


def test_bench_config_accepts_quality():
    assert BenchConfig(what="quality", corpus="site", option=("pooling=mean",)).what == "quality"
    with pytest.raises(ValueError, match="quality"):
        BenchConfig(what="qualty")


# ---------------------------------------------------------------------------------------------- end to end
TOPICS = {
    "birds": "duck goose swan heron crane stork gull owl hawk eagle".split(),
    "fruit": "apple pear plum cherry grape lemon lime mango peach melon".split(),
    "tools": "hammer saw drill chisel wrench plane file rasp clamp level".split(),
}


def write_corpus(path: Path, rows: int = 240) -> Path:
    rng = np.random.default_rng(0)
    names = sorted(TOPICS)
    with path.open("w") as handle:
        for i in range(rows):
            topic = names[i % 3]
            words = rng.choice(TOPICS[topic], size=int(rng.integers(2, 7)))
            handle.write(json.dumps({"id": 7 * i + 1, "text": " ".join(words), "label": topic}) + "\n")
    return path


@pytest.mark.slow
def test_quality_bench_reports_every_figure_on_one_split(tmp_path, monkeypatch):
    import quackae.data.corpus

    corpus = write_corpus(tmp_path / "c.jsonl")
    probe_texts = {json.loads(line)["text"] for line in corpus.read_text().splitlines()}
    site = [{"id": i, "text": text, "label": None} for i, text in enumerate(sorted(probe_texts))]  # the probe's texts
    site += [
        {"id": 1000 + i, "text": f"pretraining text number {i} about {w}", "label": None}
        for i, w in enumerate("ab" * 30)
    ]
    monkeypatch.setattr(quackae.data.corpus, "site_docstrings", lambda: site)
    options = {
        "embed_size": 8, "hidden_size": 16, "batch_size": 16, "pooling": "final+mean", "learning_rate": 0.01,
        "bow_weight": 1.0, "bow_pooling": "mean", "reconstruction_weight": 1.0,  # both terms: reconstruction scored
    }  # fmt: skip
    result = quality_run(str(corpus), 20, options, seed=3, workdir=tmp_path, pretrain=True)
    assert result["steps"] == 20 and result["model"]["pooling"] == "final+mean" and result["seed"] == 3
    assert result["model"]["bow_weight"] == 1.0 and result["model"]["bow_pooling"] == "mean"
    assert result["train_bow_loss"] > 0 and result["val_bow_loss"] > 0
    assert set(result["probe_by_pooling"]) == set(POOLINGS)
    assert set(result["probe_weight_decay"]) >= {"bag of tokens", "trained final+mean", "untrained max", "pretrained"}
    assert result["probe_trained"] == result["probe_by_pooling"]["final+mean"]
    for key in ("token_accuracy", "exact_match", "probe_trained", "probe_untrained", "probe_bag_of_tokens", "majority"):
        assert 0.0 <= result[key] <= 1.0, key
    assert result["probe_bag_of_tokens"] >= 0.9  # topic words are disjoint: counting them separates the topics
    assert result["probe_items"]["classes"] == 3
    assert set(result["few_label"]) == {"trained", "untrained", "bag_of_tokens"}
    for figures in result["few_label"].values():
        assert list(figures) == [str(n) for n in FEW_LABELS]
        assert all(len(entry["draws"]) == FEW_LABEL_DRAWS for entry in figures.values())
    assert result["few_label"]["bag_of_tokens"]["50"]["mean"] >= 0.9
    pretrained = result["pretrained"]
    assert pretrained["items"] == 60  # the probe's own texts are left out of pretraining
    assert pretrained["steps"] == 20 and 0.0 <= pretrained["probe_trained"] <= 1.0
    assert set(pretrained["few_label"]) == {"trained", "untrained"}
    assert not list(tmp_path.glob("quackae-quality-*"))  # its working folder is removed


@pytest.mark.slow
def test_classify_report_has_the_bag_of_tokens_probe_from_the_prepared_dataset(tmp_path):
    from quackae.stages.encode import EncodeConfig, encode
    from quackae.stages.prepare import PrepareConfig, prepare
    from quackae.stages.train import TrainConfig, train

    corpus = write_corpus(tmp_path / "c.jsonl")
    prepare(PrepareConfig(inputs=(str(corpus),), out=str(tmp_path / "prepared"), vocab_size=300, min_frequency=1))
    common = {"accelerator": "cpu", "devices": "1"}
    train(
        TrainConfig(
            data=str(tmp_path / "prepared"),
            out=str(tmp_path / "run"),
            max_steps=5,
            max_epochs=-1,
            embed_size=8,
            hidden_size=16,
            batch_size=32,
            pooling="final+mean",
            **common,
        )
    )
    encode(
        EncodeConfig(
            data=str(tmp_path / "prepared"), model=str(tmp_path / "run"), out=str(tmp_path / "store"), **common
        )
    )
    summary = classify(ClassifyConfig(store=str(tmp_path / "store"), out=str(tmp_path / "clf"), max_epochs=5, **common))
    report = json.loads((tmp_path / "clf/report.json").read_text())
    bag = report["baselines"]["bag_of_tokens_probe"]
    assert bag["accuracy"] >= 0.9 and summary["bag_of_tokens_accuracy"] == bag["accuracy"]
    assert bag["source"].endswith("dataset input_ids")
    manifest = json.loads((tmp_path / "store/manifest.json").read_text())
    assert manifest["model"]["pooling"] == "final+mean" and manifest["encoding_size"] == 32
    assert bag["path"].startswith("sparse: ")  # no size cap: the bag is sparse at every size
    # the same token ids the encoder saw, in the order asked for
    from quackae.data.prepared import load_prepared

    dataset, _, _ = load_prepared(tmp_path / "prepared")
    rows = dataset.select_columns(["id", "input_ids"]).to_dict()
    ids = np.asarray(rows["id"][::-1])
    ((offsets, values), vocab), _ = store_tokens(tmp_path / "store", ids, [{}] * len(ids))
    assert [values[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:], strict=True)] == rows["input_ids"][::-1]
    assert vocab == 300
    # with the prepared dataset gone, the items' text is tokenized with the manifest's tokenizer
    from quackae.data.tokenizer import load_tokenizer

    (tmp_path / "prepared").rename(tmp_path / "moved")
    texts = [{"text": "duck goose swan"}, {"text": "hammer saw"}]
    ((offsets, values), vocab), source = store_tokens(tmp_path / "store", np.asarray([8, 15]), texts)
    tokenizer = load_tokenizer(tmp_path / "run/tokenizer.json")
    expected = [tokenizer.encode(t["text"], add_special_tokens=False).ids for t in texts]
    assert [values[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:], strict=True)] == expected
    assert source.startswith("text metadata")
    assert store_tokens(tmp_path / "store", np.asarray([8]), [{}])[0] is None
    assert store_tokens(tmp_path / "nowhere", np.asarray([8]), [{}])[0] is None
