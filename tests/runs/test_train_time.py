"""Training a user can follow: the time estimate at the precision trained, validation by steps when epochs are
long, a --max-time budget that covers what follows training, and the greedy and teacher-forced token accuracies
named apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import RECONSTRUCTION, train_tiny

from quackae.runs import budget, heldout
from quackae.stages.train import TrainConfig


@pytest.fixture(scope="module")
def data(words_prepared) -> Path:
    return words_prepared


def run(data: Path, out: Path, **flags):
    return train_tiny(data, out, **{**RECONSTRUCTION, **flags})  # the held-out figures need a decoder


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_train_prints_an_estimate_timed_at_the_precision_it_trains_at(data, tmp_path, monkeypatch, caplog, precision):
    import quackae.model.steptime as bench_train

    timed = []

    def fake_time_training(model, batches, warmup, device, bf16=False):
        timed.append(bf16)
        return 1000.0  # tokens/s

    monkeypatch.setattr(bench_train, "time_training", fake_time_training)
    with caplog.at_level("INFO"):
        run(data, tmp_path / "r", max_steps=3, precision=precision)
    assert timed == [precision == "bf16-mixed"]
    (line,) = [r.getMessage() for r in caplog.records if "estimated training time" in r.getMessage()]
    assert "for 3 steps" in line and f"measured now, {precision})" in line, line


def test_the_pipeline_estimate_times_the_precision_its_train_stage_trains_at(monkeypatch):
    import quackae.model.steptime as bench_train
    from quackae.stages.pipeline import estimate_line

    timed = []
    monkeypatch.setattr(bench_train, "time_training", lambda *a, bf16=False, **k: timed.append(bf16) or 1000.0)
    stage = TrainConfig(max_steps=50, embed_size=8, hidden_size=8, batch_size=4, accelerator="cpu")
    for precision in ("bf16-mixed", "32-true"):
        line = estimate_line([("train", TrainConfig(**{**vars(stage), "precision": precision}), None)])
        assert line.endswith(f"measured now, {precision})"), line
    assert timed == [True, False]


def test_the_validation_interval_rule():
    # an epoch of 380 steps at 1.5 s a step (about 10 minutes): every 5 minutes of steps
    assert budget.validation_interval(380, 1.5, 48) == 182
    assert budget.validation_interval(380, 0.5, 48) is None  # the epoch takes under 5 minutes
    assert budget.validation_interval(100_000, 1.0, 1_560) == 3_120  # at least twice the validation batches


def test_long_epochs_are_validated_by_steps(data, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(budget, "seconds_per_step", lambda *a, **k: 100.0)  # an epoch of 6 steps takes 11 minutes
    with caplog.at_level("INFO"):
        summary = run(data, tmp_path / "r", max_steps=6)
    assert summary["validations"] == 2  # after steps 3 and 6, not once after the epoch
    assert yaml.safe_load((tmp_path / "r/config.yaml").read_text())["trainer"]["val_check_interval"] == 3
    assert any(r.getMessage().startswith("validating every 3 steps") for r in caplog.records)
    summary = run(data, tmp_path / "given", max_epochs=1, val_check_interval=1.0)  # a given interval wins
    assert summary["validations"] == 1


class Clock:
    """A clock that moves one second each time it is read."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def test_max_time_stops_training_in_time_for_the_validation_and_the_held_out_evaluation(data, tmp_path, monkeypatch):
    import quackae.stages.train as train_module

    clock = Clock()
    for module in (budget, heldout, train_module):
        monkeypatch.setattr(module, "now", clock)
    monkeypatch.setattr(budget, "seconds_per_step", lambda *a, **k: 1e-6)  # nothing to reserve but FINISH_S
    summary = run(data, tmp_path / "r", max_steps=400, max_epochs=-1, max_time="00:00:00:40")
    assert summary["stop_reason"] == "max_time" and 5 <= summary["global_step"] < 40, summary
    assert summary["seconds"] <= 40 + 1  # the clock read at most once past the deadline (the held-out batch)
    assert summary["greedy_items"] == summary["test_items"]  # one batch of the whole test split


def test_held_out_figures_are_a_seeded_sample_and_stop_at_the_deadline(data, tmp_path, monkeypatch):
    from quackae.data.module import TokenizedDataModule
    from quackae.model.checkpoints import load_model

    run(data, tmp_path / "r", max_steps=2, val_check_interval=2)
    checkpoint = tmp_path / "r/checkpoints/best.ckpt"
    module = TokenizedDataModule(data, test_fraction=0.5, val_fraction=0.1)
    module.setup("fit")
    items = heldout.sample(module.splits["test"], 20, seed=3)
    assert len(items) == 20 and set(items) <= set(module.splits["test"])
    assert np.array_equal(items, heldout.sample(module.splits["test"], 20, seed=3))
    monkeypatch.setattr(heldout, "BATCH", 2)
    whole = heldout.greedy_reconstruction(checkpoint, module.dataset, items, deadline=None)
    cut = heldout.greedy_reconstruction(checkpoint, module.dataset, items, deadline=-1.0)
    assert whole["greedy_items"] == 20 and cut["greedy_items"] == 2 * heldout.BLOCK_BATCHES  # one block, then none
    # the obvious reference: each item decoded alone
    model = load_model(str(checkpoint))
    rows = module.dataset.select_columns(["input_ids"])[items.tolist()]["input_ids"]
    correct = exact = 0
    for row in rows:
        x = torch.tensor([row])
        out = model.reconstruct(x, max_length=len(row))[0].tolist()
        out += [model.pad_id] * (len(row) - len(out))
        hits = [a == b for a, b in zip(out, row, strict=True)]
        correct, exact = correct + sum(hits), exact + all(hits)
    assert whole["greedy_token_accuracy"] == pytest.approx(correct / sum(len(r) for r in rows))
    assert whole["greedy_exact_match"] == pytest.approx(exact / len(rows))


def test_the_two_token_accuracies_are_named_apart(data, tmp_path, capsys):
    from quackae.cli.command import main
    from quackae.viz.curves import PANELS, read_metrics

    summary = run(data, tmp_path / "r", max_steps=6, val_check_interval=3)
    lines = "\n".join(summary.lines())
    assert "greedy token accuracy" in lines and "teacher-forced token accuracy" in lines
    assert summary["token_accuracy"] == summary["greedy_token_accuracy"] is not None
    metrics = read_metrics(tmp_path / "r/metrics.csv")
    best_step = min(metrics["val_loss"], key=lambda point: point[1])[0]
    assert summary["teacher_forced_val_token_accuracy"] == dict(metrics["val_token_acc"])[best_step]
    assert lines.count("training stopped") == 1
    assert all("teacher-forced" in text for text in PANELS[1][:2])
    assert main(["plot", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "teacher-forced token accuracy" in out and "greedy token accuracy" in out


def test_plot_out_help_shows_one_default(capsys):
    from quackae.cli.command import main

    with pytest.raises(SystemExit):
        main(["plot", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    entry = help_text[help_text.index("--out OUT") :]
    assert entry.count("default") == 1, entry
