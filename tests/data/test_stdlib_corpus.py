"""The demo's corpus (standard-library docstrings) and the demo pipeline file that uses it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from quackae.data.corpus import CorpusConfig, build_corpus, stdlib_docstrings
from quackae.stages.pipeline import load_pipeline

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return stdlib_docstrings(min_per_label=40, max_labels=16)


def test_corpus_is_deterministic_and_well_formed(rows):
    assert len(rows) > 1000
    assert [row["id"] for row in rows] == list(range(len(rows)))
    texts = [row["text"] for row in rows]
    assert len(set(texts)) == len(texts), "duplicate texts must be dropped"
    assert all(20 <= len(t) <= 400 and "\n" not in t and t == " ".join(t.split()) for t in texts)
    assert stdlib_docstrings(min_per_label=40, max_labels=16) == rows


def test_labels_are_the_biggest_modules_and_the_rest_unlabelled(rows):
    per_module = Counter(row["module"] for row in rows)
    labels = {row["label"] for row in rows if row["label"] is not None}
    assert 2 <= len(labels) <= 16
    assert all(per_module[label] >= 40 for label in labels)
    smallest_label = min(per_module[label] for label in labels)
    assert all(n <= smallest_label for module, n in per_module.items() if module not in labels)
    assert all(row["label"] in (None, row["module"]) for row in rows)


def test_build_corpus_writes_jsonl(tmp_path, rows):
    summary = build_corpus(CorpusConfig(out=str(tmp_path / "c.jsonl"), min_per_label=40, max_labels=16))
    lines = (tmp_path / "c.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows
    assert summary["rows"] == len(rows) and summary["labelled"] == sum(row["label"] is not None for row in rows)


def test_corpus_config_rejects_bad_values():
    with pytest.raises(ValueError, match="max_labels"):
        CorpusConfig(max_labels=1)


def test_demo_pipeline_parses_into_every_stage(tmp_path):
    root, plan = load_pipeline(ROOT / "pipelines" / "demo.yaml", root=str(tmp_path))
    names = [name for name, _, _ in plan]
    assert names == ["corpus", "prepare", "train", "encode", "classify"]
    configs = {name: config for name, config, _ in plan}
    assert configs["train"].data == configs["encode"].data == configs["prepare"].out
    assert configs["encode"].model == configs["train"].out
    assert configs["classify"].store == configs["encode"].out
    assert all(str(path).startswith(str(tmp_path)) for path in (configs["corpus"].out, configs["classify"].out))
