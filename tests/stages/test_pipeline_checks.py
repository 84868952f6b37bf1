"""Pipeline files are checked before any stage runs; the demo is capped by steps; commands list what they wrote."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from quackae.core.errors import QuackError
from quackae.stages.pipeline import REPO_PIPELINES, RunConfig, estimate_line, load_pipeline, run_pipeline, written_files
from quackae.stages.prepare import PrepareConfig
from quackae.stages.train import TrainConfig


def test_a_missing_input_fails_before_the_first_stage(tmp_path):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(
        f"root: {tmp_path / 'out'}\nstages:\n"
        "  - stage: corpus\n    out: corpus.jsonl\n"
        "  - stage: prepare\n    inputs: [corpus.jsonl, extra.jsonl]\n    out: prepared\n"
        "  - stage: train\n    data: prepared\n    out: run\n    resume: old/last.ckpt\n"
    )
    with pytest.raises(QuackError) as error:
        run_pipeline(RunConfig(pipeline=str(pipeline)))
    message = str(error.value)
    assert f"stage 2 (prepare): inputs {tmp_path / 'out' / 'extra.jsonl'} does not exist" in message
    assert f"stage 3 (train): resume {tmp_path / 'out' / 'old/last.ckpt'} does not exist" in message
    assert "corpus.jsonl does not exist" not in message and "data" not in message.split("(train)")[1]
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


def test_the_demo_is_capped_by_steps_not_wall_clock(tmp_path):
    root, plan = load_pipeline(REPO_PIPELINES / "demo.yaml", root=str(tmp_path / "demo"))
    train = next(config for name, config, _ in plan if name == "train")
    assert train.max_steps > 0 and train.max_time is None
    assert Path(train.data) == tmp_path / "demo" / "prepared"
    assert [name for name, _, _ in plan] == ["corpus", "prepare", "train", "encode", "classify"]


def test_prepare_config_takes_one_file_name_or_several():
    assert PrepareConfig(inputs="small.jsonl").inputs == ("small.jsonl",)
    assert PrepareConfig(inputs=Path("a.jsonl")).inputs == ("a.jsonl",)
    assert PrepareConfig(inputs=["a.jsonl", Path("b.csv")]).inputs == ("a.jsonl", "b.csv")
    with pytest.raises(ValueError, match="give at least one INPUT file"):
        PrepareConfig(inputs=[])


def test_written_files_lists_new_files_and_counts_big_folders(tmp_path):
    old = tmp_path / "old.txt"
    old.write_text("x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    since = time.time()
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "best.ckpt").write_text("x")
    (tmp_path / "store" / "0" / "0").mkdir(parents=True)
    for i in range(5):
        (tmp_path / "store" / "0" / "0" / f"{i}.npz").write_text("x")
        (tmp_path / "store" / "0" / "0" / f"{i}.png").write_text("x")
    (tmp_path / ".hidden.tmp").write_text("x")
    assert written_files([tmp_path], since) == [
        str(tmp_path / "checkpoints" / "best.ckpt"),
        f"{tmp_path / 'store'}/ (5 .npz, 5 .png)",
        str(tmp_path / "summary.json"),
    ]
    assert written_files([tmp_path / "summary.json", tmp_path / "nothing"], since) == [str(tmp_path / "summary.json")]


def test_estimate_line_times_a_step_for_step_capped_training():
    tiny = TrainConfig(max_steps=50, embed_size=8, hidden_size=8, batch_size=4, accelerator="cpu")
    prepare = PrepareConfig(inputs="x.jsonl", vocab_size=300, max_length=12)
    line = estimate_line([("prepare", prepare, None), ("train", tiny, None)])
    assert line.startswith("estimated training time on this machine: about ") and "train 50 steps (" in line
    by_epochs = TrainConfig(max_epochs=3, accelerator="cpu")
    assert estimate_line([("train", by_epochs, None)]) is None
