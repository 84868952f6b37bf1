"""A RUN trains one thing at a time, on one dataset, and never keeps a non-finite model: the lock (its DDP
ranks share it), the record of the data in RUN/run.json and in every checkpoint, the refusals of a train
or resume on other data, the stop at the first non-finite loss or weight, and the CPU rank limit."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from quackae.cli.command import main
from quackae.core.errors import QuackError
from quackae.data.prepared import dataset_fingerprint, load_prepared
from quackae.data.tokenizer import tokenizer_hash
from quackae.model.autoencoder import QuackAutoEncoder
from quackae.model.checkpoints import load_model
from quackae.model.encoder import QuackEncoder
from quackae.stages.prepare import PrepareConfig, prepare
from quackae.stages.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]
BIRDS = "duck goose swan heron crane stork apple pear plum hammer saw drill".split()
GREEK = "iota omega phi sigma delta gamma beta alpha kappa lambda theta zeta".split()
TINY = ["--embed-size", "8", "--hidden-size", "8", "--batch-size", "8", "--accelerator", "cpu", "--devices", "1"]


def corpus(path: Path, words: list[str], rows: int = 60) -> Path:
    with path.open("w") as handle:
        for i in range(rows):
            handle.write(json.dumps({"id": i, "text": " ".join(words[(i * 5 + k * 3) % len(words)] for k in range(4))}))
            handle.write("\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """``a`` and ``c``: two corpora tokenized with two tokenizers of the same size; ``a2``: fewer rows of the
    first corpus with its tokenizer (the same tokenizer, another dataset)."""
    root = tmp_path_factory.mktemp("runsafety")
    for name, words in (("a", BIRDS), ("c", GREEK)):
        source = corpus(root / f"{name}.jsonl", words)
        prepare(PrepareConfig(inputs=(str(source),), out=str(root / name), vocab_size=264, min_frequency=1))
    source = corpus(root / "a2.jsonl", BIRDS, rows=48)
    prepare(PrepareConfig(inputs=(str(source),), out=str(root / "a2"), tokenizer=str(root / "a" / "tokenizer.json")))
    return root


def run(data: Path, out: Path, **flags) -> dict:
    values = {
        "embed_size": 8,
        "hidden_size": 8,
        "batch_size": 8,
        "accelerator": "cpu",
        "devices": "1",
        "log_every_n_steps": 1,
        "max_steps": 2,
        **flags,
    }
    return train(TrainConfig(data=str(data), out=str(out), **values))


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def test_the_two_tokenizers_differ_in_content_not_size(data):
    _, a, _ = load_prepared(data / "a")
    _, c, _ = load_prepared(data / "c")
    assert a.get_vocab_size() == c.get_vocab_size() and tokenizer_hash(a) != tokenizer_hash(c)


# ------------------------------------------------------------------------------------------------ the lock
@pytest.mark.slow
def test_a_live_training_refuses_a_second_train_or_resume_into_its_run(data, tmp_path, capsys):
    out = tmp_path / "R"
    run(data / "a", out, max_steps=2, val_check_interval=2)
    last = out / "checkpoints" / "last.ckpt"
    live = subprocess.Popen(
        [sys.executable, "-m", "quackae", "--log-level", "WARNING", "train", str(data / "a"), "--out", str(out),
         "--resume", str(last), "--max-steps", "100000", "--max-epochs", "-1", *TINY],
        env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 300
        while not (out / "logs" / "attempt-2.json").exists() and live.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert live.poll() is None, "the live training ended early"
        assert main(["train", str(data / "a"), "--out", str(out), "--resume", str(last), *TINY]) == 2
        message = one_line(capsys)
        assert re.search(rf"{out} is being trained by quackae train job \w+ \(pid {live.pid} on .*\); wait", message)
        assert main(["train", str(data / "c"), "--out", str(out), *TINY]) == 2
        assert f"(pid {live.pid} on" in one_line(capsys)
        assert not (out / "logs" / "attempt-3.json").exists()  # the refused starts touched nothing
    finally:
        live.kill()
        live.wait()
    # the kernel dropped the lock with the killed process: the run continues
    step = int(torch.load(last, weights_only=True)["global_step"])
    summary = run(data / "a", out, resume=str(last), max_steps=step + 2, max_epochs=-1)
    assert summary["stop_reason"] == "max_steps"


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two CPU ranks need two cores")
def test_ddp_ranks_share_the_lock_and_one_history(data, tmp_path):
    out = tmp_path / "D"
    result = subprocess.run(
        [sys.executable, "-m", "quackae", "--log-level", "WARNING", "train", str(data / "a"), "--out", str(out),
         "--embed-size", "8", "--hidden-size", "8", "--batch-size", "8", "--accelerator", "cpu", "--devices", "2",
         "--strategy", "ddp", "--max-steps", "6", "--val-check-interval", "3", "--log-every-n-steps", "2"],
        env=env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["attempt-1", "attempt-1.json"]
    assert (out / "metrics.csv").read_text().count("\n") > 3
    assert json.loads((out / ".lock").read_text())["job"]


# ------------------------------------------------------------------------------------------------ the data
def test_a_run_records_what_it_trains_on(data, tmp_path):
    from quackae.model.checkpoints import TRAINED_ON

    out = tmp_path / "R"
    run(data / "a", out, val_check_interval=2)
    dataset, tokenizer, _ = load_prepared(data / "a")
    # the fingerprint prepare recorded, which is the one computed afresh from the rows
    assert dataset.fingerprint == dataset_fingerprint(dataset.data)
    expected = {"tokenizer_sha256": tokenizer_hash(tokenizer), "dataset_fingerprint": dataset.fingerprint}
    record = json.loads((out / "run.json").read_text())
    assert {k: record[k] for k in expected} == expected and record["data"] == str((data / "a").resolve())
    for name in ("best.ckpt", "last.ckpt"):
        saved = torch.load(out / "checkpoints" / name, weights_only=True)
        assert {k: saved[TRAINED_ON][k] for k in expected} == expected, name
    assert (out / "tokenizer.json").read_bytes() == (data / "a" / "tokenizer.json").read_bytes()


def test_a_train_or_resume_on_other_data_is_refused(data, tmp_path):
    out = tmp_path / "R"
    run(data / "a", out, val_check_interval=2)
    last = out / "checkpoints" / "last.ckpt"
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    with pytest.raises(QuackError, match="--resume .*last.ckpt was trained on other data .*another tokenizer"):
        run(data / "c", out, resume=str(last), max_steps=4)
    with pytest.raises(QuackError, match="R trains on other data \\(another tokenizer and another dataset: it was"):
        run(data / "c", out)
    with pytest.raises(QuackError, match="R trains on other data \\(another dataset"):
        run(data / "a2", out)
    with pytest.raises(QuackError, match="--resume .*last.ckpt was trained on other data .*another tokenizer"):
        run(data / "c", tmp_path / "elsewhere", resume=str(last), max_steps=4)
    with pytest.raises(QuackError, match="--resume .*last.ckpt was trained on other data .*: another dataset than"):
        run(data / "a2", tmp_path / "elsewhere", resume=str(last), max_steps=4)
    assert not (tmp_path / "elsewhere").exists()
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()} == before
    assert (out / "tokenizer.json").read_bytes() == (data / "a" / "tokenizer.json").read_bytes()
    # a run stopped before its first checkpoint still belongs to its data
    run(data / "a", tmp_path / "early", max_steps=1)
    shutil.rmtree(tmp_path / "early" / "checkpoints")
    with pytest.raises(QuackError, match="early trains on other data"):
        run(data / "c", tmp_path / "early")
    # the same data resumes
    assert run(data / "a", out, resume=str(last), max_steps=4)["global_step"] == 4


def test_a_checkpoint_from_before_the_record_is_judged_by_the_tokenizer_beside_it(data, tmp_path):
    from quackae.model.checkpoints import TRAINED_ON

    out = tmp_path / "old"
    run(data / "a", out)
    last = out / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    del saved[TRAINED_ON]
    torch.save(saved, last)
    (out / "run.json").unlink()
    with pytest.raises(QuackError, match="was trained on other data: another tokenizer"):
        run(data / "c", tmp_path / "new", resume=str(last), max_steps=4)
    with pytest.raises(QuackError, match="old was trained with another tokenizer .* than the one of"):
        run(data / "c", out, max_steps=4)


def test_a_checkpoint_beside_another_runs_tokenizer_is_refused(data, tmp_path):
    out = tmp_path / "R"
    run(data / "a", out)
    assert QuackEncoder.from_run(out, device="cpu").encode("duck goose").shape == (16,)
    (out / "tokenizer.json").write_bytes((data / "c" / "tokenizer.json").read_bytes())
    with pytest.raises(QuackError, match="was trained with another tokenizer .* use the tokenizer.json of the RUN"):
        QuackEncoder.from_run(out, device="cpu")
    with pytest.raises(QuackError, match="was trained with another tokenizer"):
        load_model(out, tokenizer_sha256="0" * 64)
    # encode, given data tokenized like the swapped-in tokenizer, refuses the RUN rather than encoding garbage
    from quackae.stages.encode import EncodeConfig, encode

    with pytest.raises(QuackError, match="was trained with another tokenizer"):
        encode(EncodeConfig(data=str(data / "c"), model=str(out), out=str(tmp_path / "S"), accelerator="cpu"))
    assert not list((tmp_path / "S" / "shards").glob("*.arrow")) if (tmp_path / "S").exists() else True


# ------------------------------------------------------------------------------------------------ non-finite
def test_a_diverging_training_stops_in_one_line_and_writes_no_checkpoint(data, tmp_path, capsys):
    out = tmp_path / "R"
    # the reconstruction objective diverges at this rate before the first validation (the bag-of-words term alone
    # stays finite for a few steps, so checkpoints of finite weights come first)
    flags = ["--reconstruction-weight", "1", "--bow-weight", "0", "--log-every-n-steps", "5"]
    code = main(["train", str(data / "a"), "--out", str(out), *TINY, "--learning-rate", "1e6", "--max-steps", "40",
                 "--max-epochs", "-1", "--val-check-interval", "2", *flags])  # fmt: skip
    assert code == 2
    last = [line for line in capsys.readouterr().err.splitlines() if line.strip()][-1]
    assert re.fullmatch(
        r"quackae train: error: training went non-finite at step \d+ \(the .*not finite\); training stopped there and "
        r"no checkpoint was written before it; lower --learning-rate \(it is 1000000.0\) or clip gradients .*",
        last,
    ), last
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "non_finite" and summary["non_finite_step"] >= 1
    for value in ("inf", "nan"):
        assert main(["train", str(data / "a"), "--out", str(tmp_path / value), *TINY, "--learning-rate", value]) == 2
        assert one_line(capsys).endswith(f"--learning-rate must be a finite number, got {value}")
    assert not (tmp_path / "inf").exists()


def test_a_non_finite_step_stops_training_and_keeps_the_checkpoints_written_before_it(data, tmp_path, monkeypatch):
    real = QuackAutoEncoder.training_step

    def poisoned(self, batch, batch_idx):
        loss = real(self, batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step >= 4 else loss

    monkeypatch.setattr(QuackAutoEncoder, "training_step", poisoned)
    import gc

    import tqdm

    gc.collect()
    before = set(tqdm.tqdm._instances)  # bars other tests' objects may still hold
    out = tmp_path / "R"
    with pytest.raises(QuackError, match="non-finite at step 4 \\(the training loss was not finite\\).*kept \\("):
        run(data / "a", out, max_steps=20, max_epochs=-1, val_check_interval=2, log_every_n_steps=3)
    for name in ("best.ckpt", "last.ckpt"):
        assert torch.load(out / "checkpoints" / name, weights_only=True)["global_step"] <= 4, name
        load_model(out / "checkpoints" / name)  # finite: it loads
    assert json.loads((out / "summary.json").read_text())["non_finite_step"] == 4
    assert not set(tqdm.tqdm._instances) - before, "the stopped training left its progress bars (and their thread) open"


class _Trainer:
    """What ``FiniteGuard`` reads of a Lightning trainer."""

    class strategy:  # noqa: N801
        @staticmethod
        def reduce_boolean_decision(decision, all=True):  # noqa: A002
            return bool(decision)

    global_step = 0
    sanity_checking = False
    callback_metrics: dict = {}


def test_the_guard_reads_nothing_from_the_device_between_logging_steps(monkeypatch):
    from quackae.model.guard import FiniteGuard, NonFiniteTraining

    module = torch.nn.Linear(3, 2)
    guard, trainer = FiniteGuard(every=10), _Trainer()
    guard.on_train_start(trainer, module)
    losses = [1.0, 2.0, 3.0, 4.0, float("nan"), 5.0, 6.0, 7.0, 8.0, 9.0]

    def no_sync(*args, **kwargs):
        raise AssertionError("a host sync between logging steps")

    with monkeypatch.context() as patch:
        for name in ("__bool__", "item", "tolist", "__int__", "__float__", "cpu", "numpy"):
            patch.setattr(torch.Tensor, name, no_sync)
        for step, loss in enumerate(losses[:-1], start=1):
            trainer.global_step = step
            guard.on_train_batch_end(trainer, module, {"loss": torch.tensor(loss)}, None, step - 1)
    trainer.global_step = 10
    with pytest.raises(NonFiniteTraining, match="at step 4 \\(the training loss") as error:
        guard.on_train_batch_end(trainer, module, {"loss": torch.tensor(losses[-1])}, None, 9)
    assert error.value.step == 4
    # finite losses but a weight gone bad: found before any checkpoint is written
    guard.on_train_start(trainer, module)
    with torch.no_grad():
        module.weight[0, 0] = float("inf")
    trainer.global_step = 20
    guard.on_train_batch_end(trainer, module, {"loss": torch.tensor(1.0)}, None, 19)
    with pytest.raises(NonFiniteTraining, match="at step 20 \\(the model's weights were not finite\\)"):
        guard.on_save_checkpoint(trainer, module, {})


# ------------------------------------------------------------------------------------------------ disk and ranks
def test_a_full_disk_during_training_is_one_line_and_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch):
    out = tmp_path / "R"
    run(data / "a", out, val_check_interval=2)
    last = out / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    real = torch.save

    def full(obj, handle, *args, **kwargs):
        if str(getattr(handle, "name", "")).endswith(".partial"):
            handle.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(QuackError, match="writing checkpoint .*(best|last).ckpt failed \\(\\[enforce fail.*is kept"):
        run(data / "a", out, resume=str(last), max_steps=4, val_check_interval=2)
    monkeypatch.setattr(torch, "save", real)
    assert last.read_bytes() == before and not list((out / "checkpoints").glob(".*"))
    assert run(data / "a", out, resume=str(last), max_steps=4, val_check_interval=2)["global_step"] == 4


def test_more_cpu_ranks_than_cores_are_refused(monkeypatch):
    import quackae.model.trainer

    monkeypatch.setattr(quackae.model.trainer, "usable_cores", lambda: 2)
    assert TrainConfig(accelerator="cpu", devices="2").trainer_kwargs()["devices"] == 2
    for devices in ("3", "99"):
        with pytest.raises(QuackError, match=f"--devices {devices} would start {devices} processes on the CPU, which"):
            TrainConfig(accelerator="cpu", devices=devices).trainer_kwargs()
    if not torch.cuda.is_available():
        with pytest.raises(QuackError, match="--devices 99 would start"):
            TrainConfig(accelerator="auto", devices="99").trainer_kwargs()


def test_a_rank_joins_only_the_live_leader_of_its_own_job(tmp_path, monkeypatch):
    from quackae.runs.lock import JOB_ENV, LOCK, lock_run

    out = tmp_path / "R"
    out.mkdir()
    monkeypatch.setenv(JOB_ENV, "job1")
    with pytest.raises(QuackError, match="waited 0 s for rank 0 to lock .*R for job job1"):
        lock_run(out, wait_s=0.2)
    (out / LOCK).write_text(json.dumps({"job": "job1", "pid": 1}))
    with pytest.raises(QuackError, match="the leader of train job job1 no longer holds"):
        lock_run(out)
    monkeypatch.delenv(JOB_ENV)
    leader = lock_run(out)
    assert leader.leader and os.environ[JOB_ENV] == leader.job  # what the ranks it launches inherit
    joiner = lock_run(out)
    assert not joiner.leader
    joiner.release()
    monkeypatch.setenv(JOB_ENV, "another")
    with pytest.raises(QuackError, match=f"R is being trained by quackae train job {leader.job} .*not by this job"):
        lock_run(out, wait_s=30)
    monkeypatch.setenv(JOB_ENV, leader.job)
    leader.release()
    assert JOB_ENV not in os.environ
    monkeypatch.delenv(JOB_ENV, raising=False)
    lock_run(out).release()  # free again
    created = tmp_path / "new"
    lock_run(created).release()
    assert not created.exists(), "a start that wrote nothing leaves no folder"


@pytest.mark.parametrize("kind", ["the prepared folder", "inside it", "a store", "a classifier", "a folder of notes"])
def test_train_refuses_an_out_of_another_kind_before_writing_anything(data, tmp_path, capsys, kind):
    from conftest import write_hand_made_store

    prepared = tmp_path / "a"
    shutil.copytree(data / "a", prepared)
    out = {"the prepared folder": prepared, "inside it": prepared / "run"}.get(kind, tmp_path / "out")
    if kind == "a store":
        write_hand_made_store(out, torch.zeros(2, 4).numpy(), [{"id": 0}, {"id": 1}])
    elif kind == "a classifier":
        (out / "checkpoints").mkdir(parents=True)
        for name in ("checkpoints/best.ckpt", "classes.json", "report.json"):
            (out / name).write_text("{}")
    elif kind == "a folder of notes":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["train", str(prepared), "--out", str(out), "--max-steps", "1", *TINY]) == 2
    message = one_line(capsys)
    if kind in ("the prepared folder", "inside it"):
        assert f"--out {out} is{' inside' if kind == 'inside it' else ''} the prepared data {prepared}" in message
    else:
        assert message.startswith(f"quackae train: error: --out {out} is not a run folder: it holds ") and (
            "which quackae train does not write; choose a new or empty folder for --out" in message
        )
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # not even a lock file


def test_a_run_folder_with_a_killed_writers_temporary_is_still_a_run_folder(tmp_path):
    from quackae.runs.lock import RUN_NAMES, check_run_folder

    for name in RUN_NAMES:
        (tmp_path / name).mkdir() if name in ("checkpoints", "logs", "tensorboard") else (tmp_path / name).touch()
    (tmp_path / ".summary.json.123.partial").write_text("")
    check_run_folder(tmp_path, tmp_path.parent / "prepared")


@pytest.mark.parametrize(("name", "make"), [("metrics.csv", "directory"), ("summary.json", "FIFO"), ("logs", "file")])
def test_a_run_file_of_another_kind_is_refused_before_training(data, tmp_path, capsys, name, make):
    out = tmp_path / "R"
    run(data / "a", out, max_steps=2, val_check_interval=2)
    target = out / name
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    {"directory": target.mkdir, "FIFO": lambda: os.mkfifo(target), "file": lambda: target.write_text("x")}[make]()
    last = out / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    assert main(["train", str(data / "a"), "--out", str(out), "--resume", str(last), "--max-steps", "4", *TINY]) == 2
    kind, wanted = {
        "directory": ("a directory", "a file"),
        "FIFO": ("a FIFO", "a file"),
        "file": ("a file", "a folder"),
    }[make]
    assert one_line(capsys) == (
        f"quackae train: error: {target} is {kind}, not {wanted}; remove it (quackae train writes it again)"
    )
    assert last.read_bytes() == before
