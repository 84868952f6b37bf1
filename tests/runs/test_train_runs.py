"""Honest training: why a run stopped, no "best" before a validation, a resumed RUN keeps its best
checkpoint's record and its metrics history, and checkpoints are written atomically."""

from __future__ import annotations

import csv
import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import train_tiny

from quackae.core.errors import QuackError
from quackae.model.checkpoints import AtomicCheckpointIO


@pytest.fixture(scope="module")
def data(words_prepared) -> Path:
    return words_prepared


def run(data: Path, out: Path, **flags):
    return train_tiny(data, out, **flags)


def best_record(path: Path) -> float:
    saved = torch.load(path, weights_only=True)
    (record,) = [v for k, v in saved["callbacks"].items() if k.startswith("ModelCheckpoint")]
    return float(record["best_model_score"])


def test_a_run_stopped_before_its_first_validation_has_no_best(data, tmp_path):
    summary = run(data, tmp_path / "r", max_steps=2)  # an epoch is 6 batches: no validation yet
    out = "\n".join(summary.lines())  # what quackae train prints
    assert summary["stop_reason"] == "max_steps" and summary["validations"] == 0
    assert summary["best_checkpoint"] is None and summary["best_val_loss"] is None
    assert summary["evaluated_checkpoint"].endswith("last.ckpt")
    assert not (tmp_path / "r/checkpoints/best.ckpt").exists()
    assert "training stopped: --max-steps 2 reached" in out and "no validation ran before the stop" in out
    assert json.loads((tmp_path / "r/summary.json").read_text())["stop_reason"] == "max_steps"


def test_val_check_interval_and_stop_reasons(data, tmp_path):
    summary = run(data, tmp_path / "a", max_steps=4, val_check_interval=2)
    assert summary["validations"] == 2 and summary["best_checkpoint"] is not None
    assert summary["best_val_loss"] == pytest.approx(best_record(tmp_path / "a/checkpoints/best.ckpt"))
    summary = run(data, tmp_path / "b", max_epochs=1)
    assert summary["stop_reason"] == "max_epochs" and summary["validations"] == 1
    summary = run(data, tmp_path / "c", max_epochs=-1, max_time="00:00:00:00")
    assert summary["stop_reason"] == "max_time"
    summary = run(
        data, tmp_path / "d", max_epochs=-1, max_steps=400, patience=1, val_check_interval=1, learning_rate=5.0
    )
    assert summary["stop_reason"] == "early_stopping", summary


def test_resume_into_the_same_run_keeps_best_and_history(data, tmp_path, recwarn):
    out = tmp_path / "r"
    run(data, out, max_steps=2, val_check_interval=2)
    stale_last = tmp_path / "last-at-2.ckpt"
    shutil.copyfile(out / "checkpoints/last.ckpt", stale_last)
    run(data, out, max_steps=4, val_check_interval=2, resume=str(out / "checkpoints/last.ckpt"))
    # a kill after best.ckpt but before last.ckpt was written: last.ckpt's record of the best is one round old
    shutil.copyfile(stale_last, out / "checkpoints/last.ckpt")
    summary = run(data, out, max_steps=6, val_check_interval=2, resume=str(out / "checkpoints/last.ckpt"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert summary["best_val_loss"] == pytest.approx(best_record(out / "checkpoints/best.ckpt"))
    assert torch.load(out / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 6
    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    val_steps = [int(r["step"]) for r in rows if r.get("val_loss")]
    train_steps = [int(r["step"]) for r in rows if r.get("train_loss_step")]
    # one validation from the first start; the second start's was undone by the third, which made two
    assert len(val_steps) == 3 and val_steps == sorted(set(val_steps)) and val_steps[0] < 2, val_steps
    assert train_steps == sorted(set(train_steps)) and train_steps[0] == 0 and train_steps[-1] >= 5, train_steps
    assert not [w for w in recwarn if "Previous log files" in str(w.message) or "dirpath has changed" in str(w.message)]


def test_checkpoint_write_is_atomic_on_a_full_disk(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "weights": torch.ones(3)}, target)
    before = target.read_bytes()

    def full_disk(obj, handle):
        handle.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(
        QuackError, match="writing checkpoint .*last.ckpt failed \\(No space left on device\\); the prev"
    ):
        io.save_checkpoint({"step": 2, "weights": torch.zeros(3)}, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
