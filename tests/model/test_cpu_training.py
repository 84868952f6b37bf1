"""The CPU training path: the unpacked encoder, the token accuracy, clipping under bf16-mixed, bf16 against fp32,
the precision default, and the thread policy the command gives itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import yaml
from conftest import RECONSTRUCTION, random_padded
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import quackae.model.autoencoder
import quackae.model.trainer
from quackae.core.process import thread_settings
from quackae.model.autoencoder import QuackAutoEncoder
from quackae.model.optimizer import adamw
from quackae.model.recurrent import unpacked_gru
from quackae.model.trainer import TrainerFlags
from quackae.stages.prepare import PrepareConfig, prepare
from quackae.stages.train import TrainConfig, train


def packed_gru(gru: nn.GRU, inputs: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: the packed call, states padded back with zeros."""
    out, final = gru(pack_padded_sequence(inputs, lengths, batch_first=True, enforce_sorted=False))
    states, _ = pad_packed_sequence(out, batch_first=True, total_length=inputs.size(1))
    return states, final


@pytest.mark.parametrize("layers", [1, 2])
def test_unpacked_gru_gives_the_packed_states_finals_and_gradients(layers):
    gru = nn.GRU(6, 5, num_layers=layers, batch_first=True, bidirectional=True).double()
    lengths = torch.tensor([7, 3, 1, 7, 5, 2])
    inputs = torch.randn(6, 7, 6, dtype=torch.double, requires_grad=True)
    fast = unpacked_gru(gru, inputs, lengths)
    slow = packed_gru(gru, inputs, lengths)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert torch.equal(fast[0][1, 3:], torch.zeros_like(fast[0][1, 3:]))  # zero at pads, as pad_packed gives
    weights = [torch.randn_like(t) for t in slow]  # a loss that uses every state and every final
    wrt = [inputs, *gru.parameters()]
    fast_grads = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, fast, strict=True)), wrt)
    slow_grads = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, slow, strict=True)), wrt)
    for a, b in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def tiny(**kwargs) -> QuackAutoEncoder:
    settings = {"num_embeddings": 20, "embed_size": 8, "hidden_size": 16, "dropout": 0.0, "word_dropout": 0.0}
    settings.update(RECONSTRUCTION)
    return QuackAutoEncoder(**{**settings, **kwargs})


@pytest.mark.parametrize("layers", [1, 2])
def test_training_encodes_and_learns_as_the_packed_encoder_does(layers, monkeypatch):
    model = tiny(layers=layers, pooling="final+mean").train()
    x = random_padded(6, 20, 1, 9, seed=3)
    with torch.no_grad():  # inference takes the packed path
        expected = model(x)
    trained = model(x)  # with gradients on a CPU: the unpacked one
    assert trained[0].requires_grad
    for a, b in zip(trained, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    fast = torch.autograd.grad(model.training_loss(x), list(model.parameters()))
    monkeypatch.setattr(quackae.model.autoencoder, "unpacked_gru", packed_gru)
    slow = torch.autograd.grad(model.training_loss(x), list(model.parameters()))
    for (name, _), a, b in zip(model.named_parameters(), fast, slow, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_token_accuracy_takes_the_first_of_equal_maxima_as_argmax_does(monkeypatch):
    model = tiny().eval()
    x = random_padded(8, 20, 2, 9, seed=4)
    logits = []

    class Ties(nn.Module):  # whole-number logits in [0, 3): every row has several equal maxima
        def forward(self, rows: torch.Tensor) -> torch.Tensor:
            out = torch.randint(0, 3, (rows.size(0), 20)).float()
            logits.append(out)
            return out

    monkeypatch.setattr(model, "predict", Ties())
    target, mask, lengths = model._check(x)
    encoding, states = model._encode(target, lengths)
    _, correct, _ = model._teacher_forced(target, encoding, states, mask, lengths)
    time, item, _ = quackae.model.autoencoder._valid_positions(lengths, target.size(1))
    assert torch.equal(correct, torch.cat(logits).argmax(dim=-1) == target[item, time])


class _Batches(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.x


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_gradients_are_clipped_with_the_fused_optimizer_in_either_precision(precision, tmp_path, monkeypatch):
    clipped = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        clipped.append(max_norm)
        return clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        precision=precision,
        gradient_clip_val=0.5,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    model = tiny()
    loader = torch.utils.data.DataLoader(_Batches(random_padded(4, 20, 2, 6, seed=5)), batch_size=None)
    trainer.fit(model, loader)
    assert trainer.optimizers[0].defaults["fused"]
    assert clipped == [0.5, 0.5, 0.5]


def test_a_gradient_scaler_gets_the_unfused_optimizer_lightning_can_unscale_before_clipping(monkeypatch):
    model = tiny()
    plugin = SimpleNamespace(scaler=object())  # 16-mixed on a GPU
    monkeypatch.setattr(model, "_trainer", SimpleNamespace(precision_plugin=plugin, max_steps=5, max_epochs=None))
    assert not model.configure_optimizers()["optimizer"].defaults["fused"]
    plugin.scaler = None
    assert model.configure_optimizers()["optimizer"].defaults["fused"]


def test_bf16_autocast_training_follows_fp32():
    x = random_padded(16, 20, 2, 10, seed=6)
    losses = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = tiny(hidden_size=32, embed_size=16).train()
        optimizer = adamw(model.parameters(), 1e-2, 0.01)
        curve = []
        for _ in range(40):
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
                loss = model.training_loss(x)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            curve.append(loss.item())
        losses[bf16] = curve
    assert losses[True][0] == pytest.approx(losses[False][0], rel=0.01)  # the same weights: rounding only
    assert losses[True][-1] < 0.1 * losses[True][0]  # it learns
    start = losses[False][0]
    for step, (low, full) in enumerate(zip(losses[True], losses[False], strict=True)):
        assert low == pytest.approx(full, abs=0.05 * start), f"step {step}"


@pytest.mark.parametrize("amx", [True, False])
def test_training_on_a_cpu_with_amx_defaults_to_bf16_mixed_and_nothing_else_does(amx, monkeypatch):
    monkeypatch.setattr(quackae.model.trainer, "cpu_has_amx_bf16", lambda: amx)
    flags = TrainerFlags(accelerator="cpu")
    assert flags.trainer_kwargs(training=True)["precision"] == ("bf16-mixed" if amx else "32-true")
    assert flags.trainer_kwargs()["precision"] == "32-true"  # encode, classify: fp32 encodings
    assert TrainerFlags(accelerator="cpu", precision="32-true").trainer_kwargs(training=True)["precision"] == "32-true"


def test_quackae_train_runs_in_the_default_precision_and_records_it(tmp_path, monkeypatch):
    monkeypatch.setattr(quackae.model.trainer, "cpu_has_amx_bf16", lambda: True)
    words = ["duck", "goose", "swan", "heron"]
    with (tmp_path / "c.jsonl").open("w") as handle:
        for i in range(40):
            handle.write(json.dumps({"id": i, "text": " ".join(words[: 1 + i % 4])}) + "\n")
    prepare(PrepareConfig(inputs=(str(tmp_path / "c.jsonl"),), out=str(tmp_path / "p"), vocab_size=280))
    config = TrainConfig(
        data=str(tmp_path / "p"), out=str(tmp_path / "r"), embed_size=8, hidden_size=8, batch_size=8, max_steps=2
    )
    summary = train(config)  # gradient clipping (default 1.0) with the fused AdamW under bf16-mixed
    assert summary["global_step"] == 2
    resolved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert resolved["trainer"]["precision"] == "bf16-mixed"


@pytest.mark.parametrize(
    ("environ", "cores", "load", "expected"),
    [
        ({}, 2, 0.3, {"OMP_WAIT_POLICY": "PASSIVE"}),  # idle: torch's own thread count
        ({}, 2, 0.7, {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}),
        ({}, 2, 6.0, {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}),
        ({}, 16, 8.3, {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "8"}),
        ({}, 1, 3.0, {"OMP_WAIT_POLICY": "PASSIVE"}),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, 2, 0.0, {}),  # the user's settings win
        ({"GOMP_SPINCOUNT": "1000"}, 2, 6.0, {"OMP_NUM_THREADS": "1"}),
        ({"KMP_BLOCKTIME": "0", "OMP_NUM_THREADS": "2"}, 2, 6.0, {}),
    ],
)
def test_thread_settings(environ, cores, load, expected):
    assert thread_settings(environ, cores, load) == expected


POLICY = """
import os, sys
os.getloadavg = lambda: (50.0, 50.0, 50.0)  # a busy machine
if sys.argv[1] == "library":
    import torch
from quackae.cli import main
try:
    main(["train", "--max-stepz", "3"])  # a typo: the command stops at its flags, torch loaded to build them
except SystemExit as stop:
    code = stop.code
import torch
print(code, os.environ.get("OMP_WAIT_POLICY"), os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads())
"""


def test_the_command_sets_the_thread_policy_before_torch_starts_and_a_library_process_keeps_its_own():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    env.pop("KMP_BLOCKTIME", None)
    runs = {}
    for mode in ("command", "library"):
        done = subprocess.run([sys.executable, "-c", POLICY, mode], env=env, capture_output=True, text=True, check=True)
        runs[mode] = done.stdout.split()
    busy_threads = "1" if len(os.sched_getaffinity(0)) > 1 else "None"
    assert runs["command"] == ["2", "PASSIVE", busy_threads, "1"]
    assert runs["library"][:3] == ["2", "None", "None"]  # torch came first: nothing changed
