"""kill -9 at random points of prepare (over an existing output), train (then --resume) and export: what a
later stage reads is the old complete output or the new complete one, never a mix."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from quackae.data.prepared import COMPLETE, load_prepared
from quackae.data.tokenizer import decode
from quackae.model.checkpoints import load_model
from quackae.stages.prepare import PrepareConfig, prepare
from quackae.stages.train import TrainConfig, train

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--embed-size", "8", "--hidden-size", "8", "--batch-size", "8", "--accelerator", "cpu", "--devices", "1"]


def write_corpus(path: Path, rows: int, words: list[str]) -> dict[int, str]:
    texts = {}
    with path.open("w") as handle:
        for i in range(rows):
            texts[i] = " ".join(words[(i * 5 + k * 3) % len(words)] for k in range(2 + i % 4))
            handle.write(json.dumps({"id": i, "text": texts[i]}) + "\n")
    return texts


def quackae(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, "-m", "quackae", "--log-level", "WARNING", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def python(code: str) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode


def which(out: Path, corpora: dict[str, dict[int, str]]) -> str:
    """The name of the corpus the prepared folder holds whole; fails on anything else."""
    dataset, tokenizer, info = load_prepared(out)
    for name, texts in corpora.items():
        if dataset.num_rows == len(texts) and info["rows_kept"] == len(texts):
            rows = dataset.select(range(0, dataset.num_rows, 7))
            pairs = zip(rows["id"], rows["input_ids"], strict=True)
            if all(decode(tokenizer, ids[:-1]) == texts[i] for i, ids in pairs):
                return name
    raise AssertionError(f"{out} holds neither corpus whole")


def test_prepare_killed_anywhere_leaves_old_or_new_whole(tmp_path):
    corpora = {
        "a": write_corpus(tmp_path / "a.jsonl", 40, "duck goose swan heron crane stork".split()),
        "b": write_corpus(tmp_path / "b.jsonl", 64, "apple pear plum cherry grape lemon lime".split()),
    }
    out = tmp_path / "out"
    flags = ["--out", str(out), "--vocab-size", "300", "--min-frequency", "1"]
    prepare(PrepareConfig(inputs=(str(tmp_path / "a.jsonl"),), out=str(out), vocab_size=300, min_frequency=1))
    assert which(out, corpora) == "a"
    started = time.time()
    assert quackae("prepare", str(tmp_path / "b.jsonl"), *flags).wait() == 0
    full = time.time() - started
    assert which(out, corpora) == "b"
    rng = random.Random(11)
    for _ in range(4):
        current = which(out, corpora)
        other = "a" if current == "b" else "b"
        process = quackae("prepare", str(tmp_path / f"{other}.jsonl"), *flags)
        time.sleep(rng.uniform(0.3, full))
        process.send_signal(signal.SIGKILL)
        process.wait()
        which(out, corpora)
    # the two instants that matter, hit on purpose: just before and just after the exchange of folders
    for target, hook in (
        ("prepare.replace_folder", "def hook(staging, out):\n    os.kill(os.getpid(), signal.SIGKILL)\n"),
        (
            "atomic.exchange",
            "real = atomic.exchange\ndef hook(a, b):\n    real(a, b)\n    os.kill(os.getpid(), signal.SIGKILL)\n",
        ),
    ):
        current = which(out, corpora)
        other = "a" if current == "b" else "b"
        code = (
            "import os, signal\nimport quackae.stages.prepare as prepare\nimport quackae.core.atomic as atomic\n"
            + hook
            + f"{target} = hook\n"
            + f"prepare.prepare(prepare.PrepareConfig(inputs=({str(tmp_path / (other + '.jsonl'))!r},), "
            + f"out={str(out)!r}, vocab_size=300, min_frequency=1))\n"
        )
        assert python(code) == -signal.SIGKILL
        expected = current if target == "prepare.replace_folder" else other
        assert which(out, corpora) == expected, target
        assert (out / COMPLETE).is_file()
    assert list(tmp_path.glob(".out.prepare-*")), "the killed runs left their staging folders"
    prepare(PrepareConfig(inputs=(str(tmp_path / "a.jsonl"),), out=str(out), vocab_size=300, min_frequency=1))
    assert which(out, corpora) == "a"
    assert not list(tmp_path.glob(".out.prepare-*")), "the next prepare removes what killed runs left"


def best_record(path: Path) -> float:
    saved = torch.load(path, weights_only=True)
    (record,) = [v for k, v in saved["callbacks"].items() if k.startswith("ModelCheckpoint")]
    return float(record["best_model_score"])


def test_train_killed_then_resumed_into_the_same_run(tmp_path):
    write_corpus(tmp_path / "c.jsonl", 60, "duck goose swan heron crane apple pear plum saw drill".split())
    prepare(PrepareConfig(inputs=(str(tmp_path / "c.jsonl"),), out=str(tmp_path / "p"), vocab_size=300))
    run = tmp_path / "run"
    process = quackae("train", str(tmp_path / "p"), "--out", str(run), "--max-steps", "400", "--max-epochs", "-1",
                      *TINY, "--val-check-interval", "2", "--log-every-n-steps", "1")  # fmt: skip
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.is_file() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    time.sleep(random.Random(5).uniform(0.0, 3.0))
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert last.is_file()
    step = torch.load(last, weights_only=True)["global_step"]  # a whole checkpoint, whatever the kill hit
    summary = train(
        TrainConfig(
            data=str(tmp_path / "p"),
            out=str(run),
            resume=str(last),
            max_steps=step + 4,
            max_epochs=-1,  # on an idle machine the killed run may already be past any epoch limit
            val_check_interval=2,
            embed_size=8,
            hidden_size=8,
            batch_size=8,
            accelerator="cpu",
            devices="1",
            log_every_n_steps=1,
        )
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert torch.load(last, weights_only=True)["global_step"] == step + 4
    assert summary["best_val_loss"] == pytest.approx(best_record(run / "checkpoints/best.ckpt"))
    load_model(run / "checkpoints/best.ckpt")
    assert len(list((run / "logs").glob("attempt-*.json"))) == 2
    assert (run / "metrics.csv").read_text().count("\n") > 4
