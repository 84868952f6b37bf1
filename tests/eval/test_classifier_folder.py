"""A classifier folder appears whole or not at all, ``--predict`` uses only one whose parts belong together,
and the bag-of-tokens baseline reads the prepared data only while it is the data the store was encoded from."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import write_hand_made_store

from quackae.cli.command import main
from quackae.core.errors import QuackError
from quackae.stages.classify import ClassifyConfig, classify
from quackae.stages.encode import EncodeConfig, encode
from quackae.stages.prepare import PrepareConfig, prepare
from quackae.stages.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]
CPU = ["--accelerator", "cpu", "--devices", "1"]


def write_store(path: Path, classes: int, count: int = 90, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, 8)) * 4
    labels = np.arange(count) % classes
    matrix = (centres[labels] + rng.standard_normal((count, 8))).astype(np.float32)
    return write_hand_made_store(path, matrix, [{"id": i, "label": "abcdef"[k]} for i, k in enumerate(labels)])


def fit(store: Path, out: Path, *flags: str) -> int:
    return main(["classify", str(store), "--out", str(out), "--max-epochs", "3", *CPU, *flags])


def one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clf")
    write_store(root / "two", 2)
    write_store(root / "three", 3, seed=1)
    assert main(["classify", str(root / "two"), "--out", str(root / "clf"), "--max-epochs", "3", *CPU]) == 0
    assert (
        main(["classify", str(root / "two"), "--out", str(root / "other"), "--max-epochs", "3", "--seed", "1", *CPU])
        == 0
    )
    return root


def test_a_classifier_folder_names_the_checkpoint_its_parts_belong_to(stores):
    import hashlib

    folder = stores / "clf"
    assert sorted(p.name for p in folder.iterdir()) == [
        "checkpoints", "classes.json", "confusion.png", "predictions.parquet", "report.json"
    ]  # fmt: skip
    sha = hashlib.sha256((folder / "checkpoints" / "best.ckpt").read_bytes()).hexdigest()
    assert json.loads((folder / "classes.json").read_text()) == {
        "label_field": "label", "classes": ["a", "b"], "checkpoint_sha256": sha
    }  # fmt: skip
    report = json.loads((folder / "report.json").read_text())
    assert report["checkpoint_sha256"] == sha and report["checkpoint"] == str(folder / "checkpoints" / "best.ckpt")
    assert not list(stores.glob(".clf*")), "no staging folder is left behind"


def test_a_classify_killed_before_its_folder_is_whole_leaves_the_previous_one(stores, tmp_path, capsys):
    out = tmp_path / "clf"
    shutil.copytree(stores / "clf", out)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code = (
        "import os, signal, sys\nimport quackae.stages.classify as c\n"
        "def killed(*args, **kwargs):\n    os.kill(os.getpid(), signal.SIGKILL)\n"
        "c.write_predictions = killed  # after the new checkpoint is written, before the rest\n"
        f"c.classify(c.ClassifyConfig(store={str(stores / 'three')!r}, out={str(out)!r}, max_epochs=2, "
        "accelerator='cpu', devices='1'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == -signal.SIGKILL
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert main(["classify", str(stores / "three"), "--predict", str(out), "--out", str(tmp_path / "p")]) == 0
    predicted = set(pq.read_table(tmp_path / "p" / "predictions.parquet").column("predicted_label").to_pylist())
    assert predicted <= {"a", "b"}
    capsys.readouterr()
    assert list(tmp_path.glob(".clf.classify-*")), "the killed classify left its staging folder"
    assert fit(stores / "three", out) == 0
    assert json.loads((out / "classes.json").read_text())["classes"] == ["a", "b", "c"]
    assert not list(tmp_path.glob(".clf.classify-*")), "the next classify removes what a killed one left"


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _loop(path: Path) -> None:
    path.unlink()
    os.symlink(path.name, path)


def _classes(value) -> callable:
    def write(path: Path) -> None:
        path.write_text(json.dumps(value))

    return write


BROKEN = [
    ("classes.json", _classes([1, 2]), "class list .*classes.json holds a JSON array, not a JSON object; train it"),
    (
        "classes.json",
        _classes({"classes": [1, 2]}),
        "must name at least two distinct classes as strings, got \\[1, 2\\]",
    ),
    ("classes.json", _classes({"classes": ["a"]}), "must name at least two distinct classes"),
    ("classes.json", _classes({"classes": ["a", "a"]}), "must name at least two distinct classes"),
    ("classes.json", _classes({"classes": ["a", "b"]}), "does not name the checkpoint it belongs to"),
    ("classes.json", lambda p: p.write_bytes(b"\xff\xfe{}"), "classes.json is not UTF-8 text"),
    ("classes.json", lambda p: p.write_text('{"classes": ["a", '), "classes.json is not valid JSON"),
    ("classes.json", lambda p: p.write_bytes(b""), "classes.json is empty"),
    ("classes.json", _fifo, "classes.json is a FIFO, not a file"),
    ("classes.json", _loop, "classes.json cannot be read \\(a symbolic-link loop\\)"),
    ("classes.json", lambda p: (p.unlink(), p.mkdir()), "classes.json is a directory, not a file"),
    ("report.json", lambda p: p.unlink(), "has no report.json: the classify that wrote it did not finish"),
    ("report.json", lambda p: p.write_text("[]"), "report.json holds a JSON array, not a JSON object"),
    ("report.json", "other", "report.json and .*classes.json come from different classifiers"),
    ("checkpoints/best.ckpt", "other", "best.ckpt is not the checkpoint classes.json and report.json were written"),
    ("checkpoints/best.ckpt", lambda p: p.write_bytes(pickle.dumps({"a": 1})), "best.ckpt is not a torch checkpoint"),
    ("checkpoints/best.ckpt", lambda p: p.write_bytes(p.read_bytes()[:300]), "best.ckpt is not a torch checkpoint"),
    ("checkpoints/best.ckpt", lambda p: p.write_bytes(b""), "best.ckpt is empty \\(0 bytes\\)"),
    ("checkpoints/best.ckpt", _fifo, "best.ckpt is a FIFO, not a file"),
    ("checkpoints/best.ckpt", lambda p: (p.unlink(), p.mkdir()), "best.ckpt is a directory, not a file"),
]


@pytest.mark.parametrize(("name", "damage", "message"), BROKEN, ids=[f"{n}-{m[:30]}" for n, _, m in BROKEN])
def test_predict_refuses_a_folder_whose_parts_do_not_belong_together(stores, tmp_path, capsys, name, damage, message):
    folder = tmp_path / "clf"
    shutil.copytree(stores / "clf", folder)
    if damage == "other":
        shutil.copyfile(stores / "other" / name, folder / name)
    else:
        damage(folder / name)
    code = main(["classify", str(stores / "two"), "--predict", str(folder), "--out", str(tmp_path / "p")])
    line = one_line(capsys)
    assert code == 2, line
    assert re.search(message, line), line
    assert "weights_only" not in line
    assert not (tmp_path / "p").exists()


def test_predict_and_classify_refuse_outs_that_are_not_theirs(stores, tmp_path, capsys):
    folder = tmp_path / "clf"
    shutil.copytree(stores / "clf", folder)
    assert main(["classify", str(stores / "two"), "--predict", str(folder), "--out", str(folder)]) == 2
    assert "is the classifier folder --predict reads" in one_line(capsys)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert fit(stores / "two", mine) == 2
    assert re.search("--out .*mine holds files classify did not write \\(notes.txt\\)", one_line(capsys))
    assert (mine / "notes.txt").read_text() == "keep me"


def test_a_refused_store_and_a_full_disk_are_one_line_and_leave_nothing(stores, tmp_path, capsys, monkeypatch):
    import quackae.stages.classify

    def refused(source):
        raise QuackError(f"store {source} holds non-finite encodings; encode it again")

    with monkeypatch.context() as patch:
        patch.setattr(quackae.stages.classify, "load_encodings", refused)
        assert fit(stores / "two", tmp_path / "c") == 2
        assert one_line(capsys).endswith("holds non-finite encodings; encode it again")
        assert main(["classify", str(stores / "two"), "--predict", str(stores / "clf"), "--out", str(tmp_path / "p")])
        assert one_line(capsys).endswith("holds non-finite encodings; encode it again")
    import quackae.core.atomic

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(quackae.core.atomic.os, "fsync", full)
    assert fit(stores / "two", tmp_path / "c") == 2
    assert re.search(r"error: writing checkpoint .*best.ckpt failed \(No space left on device\)", one_line(capsys))
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".c*"))


def test_classifier_training_that_goes_non_finite_is_one_line(stores, tmp_path, capsys):
    assert fit(stores / "two", tmp_path / "c", "--lr", "1e30") == 2
    line = [line for line in capsys.readouterr().err.splitlines() if line.strip()][-1]
    assert re.search("the classifier's training went non-finite at step \\d+ .*lower --lr \\(it is 1e\\+30\\)", line)
    assert not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match="--lr must be a finite number"):
        ClassifyConfig(lr=float("inf"))


# ---------------------------------------------------------------------------------------------- the baseline
WORDS = "duck goose swan heron crane stork apple pear plum cherry grape lemon".split()


def labelled_corpus(path: Path, shift: int) -> Path:
    with path.open("w") as handle:
        for i in range(90):
            words = [WORDS[(i * 5 + k * 3 + shift) % len(WORDS)] for k in range(3 + i % 3)]
            handle.write(json.dumps({"id": i, "text": " ".join(words), "label": "xy"[i % 2]}) + "\n")
    return path


def test_the_bag_of_tokens_baseline_reads_only_the_data_the_store_was_encoded_from(tmp_path, capsys):
    prepared, run = tmp_path / "p", tmp_path / "run"
    prepare(PrepareConfig(inputs=(str(labelled_corpus(tmp_path / "a.jsonl", 0)),), out=str(prepared), vocab_size=300))
    train(TrainConfig(data=str(prepared), out=str(run), embed_size=8, hidden_size=8, batch_size=16, max_steps=2,
                      accelerator="cpu", devices="1"))  # fmt: skip
    for name, text in (("store", True), ("bare", False)):
        encode(EncodeConfig(data=str(prepared), model=str(run), out=str(tmp_path / name), text=text, devices="1",
                            accelerator="cpu"))  # fmt: skip

    def baseline(store: str) -> tuple[dict, str]:
        summary = classify(ClassifyConfig(store=str(tmp_path / store), out=str(tmp_path / f"c-{store}"), max_epochs=2,
                                          accelerator="cpu", devices="1"))  # fmt: skip
        report = json.loads((tmp_path / f"c-{store}" / "report.json").read_text())
        return report["baselines"]["bag_of_tokens_probe"], summary.lines()[0]

    bag, _ = baseline("store")
    assert bag["source"] == f"{prepared.resolve()}/dataset input_ids" and bag["accuracy"] is not None
    # the same ids, other texts, the same tokenizer: a silently wrong baseline if it were read
    prepare(PrepareConfig(inputs=(str(labelled_corpus(tmp_path / "b.jsonl", 5)),), out=str(prepared), overwrite=True,
                          tokenizer=str(run / "tokenizer.json")))  # fmt: skip
    bag, _ = baseline("store")
    assert bag["accuracy"] is not None and bag["source"].startswith("text metadata tokenized with"), bag
    assert "changed since the store was encoded" in bag["source"]
    bag, line = baseline("bare")
    assert bag["accuracy"] is None and "changed since the store was encoded" in bag["source"]
    assert re.search("bag-of-tokens probe skipped \\(the prepared data in .* changed since the store was enc", line)
    # another tokenizer of another size in the prepared folder (its ids run past the run's vocabulary)
    prepare(PrepareConfig(inputs=(str(labelled_corpus(tmp_path / "b.jsonl", 5)),), out=str(prepared), overwrite=True,
                          vocab_size=400, min_frequency=1))  # fmt: skip
    bag, _ = baseline("bare")
    assert bag["accuracy"] is None and "changed since the store was encoded" in bag["source"]
    (run / "tokenizer.json").write_bytes((prepared / "tokenizer.json").read_bytes())
    bag, _ = baseline("store")
    assert bag["accuracy"] is None and "is no longer the one the store was encoded with" in bag["source"]
    capsys.readouterr()


def test_finite_but_extreme_encodings_are_classified_without_overflow(tmp_path):
    rng = np.random.default_rng(0)
    matrix = (rng.standard_normal((90, 8)) * 1e38).clip(-3e38, 3e38).astype(np.float32)  # float32's range
    labels = np.arange(90) % 3
    matrix[:, 0] = labels * 1e38  # one column separates the classes
    write_hand_made_store(tmp_path / "s", matrix, [{"id": i, "label": "abc"[k]} for i, k in enumerate(labels)])
    summary = classify(ClassifyConfig(store=str(tmp_path / "s"), out=str(tmp_path / "c"), max_epochs=3,
                                      accelerator="cpu", devices="1"))  # fmt: skip
    assert summary["linear_probe_accuracy"] > 0.9  # standardised without overflow, the probe sees the column
