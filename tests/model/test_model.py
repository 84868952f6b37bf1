from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import RECONSTRUCTION, random_padded

import quackae.model.autoencoder
from quackae.model.autoencoder import QuackAutoEncoder
from quackae.model.checkpoints import load_model
from quackae.model.noise import corrupt


def tiny(**kwargs) -> QuackAutoEncoder:
    defaults = {"num_embeddings": 20, "embed_size": 8, "hidden_size": 16, "layers": 1, "pooling": "final"}
    defaults.update(dropout=0.0, word_dropout=0.0, **RECONSTRUCTION)  # the plain model: regularisers tested apart
    defaults.update(kwargs)
    return QuackAutoEncoder(**defaults).eval()


@pytest.mark.parametrize("layers", [1, 2])
def test_encoding_ignores_padding_and_batch_mates(layers):
    model = tiny(layers=layers)
    x = random_padded(6, 20, 2, 9, seed=1)
    with torch.no_grad():
        batch_enc, batch_states = model(x)
        for i in range(x.size(0)):
            n = int(x[i].ne(0).sum())
            alone = x[i : i + 1, :n]
            padded = torch.cat([alone, torch.zeros(1, 5, dtype=torch.long)], dim=1)
            enc_alone, states_alone = model(alone)
            enc_padded, states_padded = model(padded)
            torch.testing.assert_close(enc_alone, batch_enc[i : i + 1], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(enc_padded, enc_alone, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(states_alone[0], batch_states[i, :n], atol=1e-6, rtol=1e-5)
            assert torch.equal(states_padded[0, n:], torch.zeros_like(states_padded[0, n:]))
        reversed_enc, _ = model(x.flip(0))
        torch.testing.assert_close(reversed_enc.flip(0), batch_enc, atol=1e-6, rtol=1e-5)


def test_encoding_shape_is_last_layer_forward_and_backward_states():
    model = tiny(layers=2)
    x = torch.tensor([[3, 4, 5]])
    enc, states = model(x)
    assert enc.shape == (1, 16) and states.shape == (1, 3, 16)
    half = 8
    torch.testing.assert_close(enc[0, :half], states[0, -1, :half])  # forward direction ends at the last token
    torch.testing.assert_close(enc[0, half:], states[0, 0, half:])  # backward direction ends at the first


def reference_loss(model: QuackAutoEncoder, x: torch.Tensor, steps: int | None = None) -> torch.Tensor:
    """The original's semantics, one Python step per time step and a loss call per step."""
    encoding, states = model(x)
    mask = x.ne(model.pad_id)
    batch, width = x.shape
    hidden = encoding.unsqueeze(0).repeat(model.layers, 1, 1)
    token_embed = model.start.expand(batch, -1)
    loss = torch.zeros(())
    for t in range(steps or width):
        out, hidden = model.decoder(token_embed.unsqueeze(1), hidden)
        query = out[:, 0]
        scores = torch.einsum("bth,bh->bt", states, query) / math.sqrt(model.hidden_size)
        weights = F.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)
        context = (weights.unsqueeze(-1) * states).sum(dim=1)
        logits = model.predict(torch.cat([context, query], dim=-1))
        loss = loss + F.cross_entropy(logits, x[:, t], ignore_index=model.pad_id)
        token_embed = model.embed(x[:, t])
    return loss


@pytest.mark.parametrize("chunk", [512, 5])
@pytest.mark.parametrize("layers", [1, 2])
def test_vectorized_loss_equals_step_by_step_reference(layers, chunk, monkeypatch):
    monkeypatch.setattr(quackae.model.autoencoder, "LOGIT_CHUNK", chunk)  # 5: logits in many blocks
    model = tiny(layers=layers)
    x = random_padded(7, 20, 1, 10, seed=2)
    fast = model.training_loss(x)
    slow = reference_loss(model, x)
    assert fast.item() == pytest.approx(slow.item(), abs=1e-5)
    names = [name for name, _ in model.named_parameters()]
    fast_grads = torch.autograd.grad(fast, list(model.parameters()), allow_unused=True)
    slow_grads = torch.autograd.grad(slow, list(model.parameters()), allow_unused=True)
    unused = [name for name, a, b in zip(names, fast_grads, slow_grads, strict=True) if a is None or b is None]
    assert not unused, f"parameters without a gradient in one of the two losses: {unused}"
    for name, a, b in zip(names, fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_loss_over_time_equals_per_step_cross_entropy_and_ignores_padding():
    model = tiny()
    x = random_padded(5, 20, 1, 6, seed=3)
    logits = torch.randn(5, 6, 20)
    expected = sum(F.cross_entropy(logits[:, t], x[:, t], ignore_index=0) for t in range(6))
    assert model.loss_over_time(x, logits).item() == pytest.approx(expected.item(), abs=1e-5)
    noisy = logits.clone()
    noisy[x.eq(0)] = torch.randn_like(noisy[x.eq(0)]) * 100
    assert model.loss_over_time(x, noisy).item() == pytest.approx(expected.item(), abs=1e-5)


def test_training_loss_ignores_extra_padding():
    model = tiny()
    x = random_padded(4, 20, 2, 8, seed=4)
    wider = torch.cat([x, torch.zeros(4, 5, dtype=torch.long)], dim=1)
    assert model.training_loss(x).item() == pytest.approx(model.training_loss(wider).item(), abs=1e-5)


def test_max_decode_length_limits_the_loss_to_the_first_steps():
    model = tiny(max_decode_length=3)
    x = random_padded(4, 20, 4, 8, seed=5)
    assert model.training_loss(x).item() == pytest.approx(reference_loss(model, x, steps=3).item(), abs=1e-5)
    assert model.training_loss(x).item() != pytest.approx(reference_loss(model, x).item(), abs=1e-3)


def test_overfits_random_sequences():
    torch.manual_seed(0)
    x = random_padded(64, 20, 3, 12, seed=6)
    model = QuackAutoEncoder(
        20, embed_size=32, hidden_size=64, learning_rate=1e-2, dropout=0.0, word_dropout=0.0, **RECONSTRUCTION
    ).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    accuracy = 0.0
    step = 0
    for step in range(600):
        optimizer.zero_grad()
        model.training_loss(x).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 49:
            model.eval()
            out = model.reconstruct(x, max_length=x.size(1))
            valid = x.ne(0)
            accuracy = (out == x)[valid].float().mean().item()
            model.train()
            if accuracy >= 0.95:
                break
    assert accuracy >= 0.95, f"greedy token accuracy {accuracy:.3f} after {step + 1} steps"


def test_reconstruct_stops_at_max_length_and_gives_padding_no_attention():
    """Padding after EOS is checked, with a scripted decoder, by the next test."""
    model = tiny(max_decode_length=4, eos_id=2)
    x = random_padded(3, 20, 2, 8, seed=7)
    out = model.reconstruct(x)
    assert out.dtype == torch.long and out.shape[0] == 3 and out.shape[1] <= 4
    out, attention = model.reconstruct(x, max_length=6, return_attention=True)
    assert attention.shape == (3, out.size(1), 8)
    padded = x.eq(0).unsqueeze(1).expand_as(attention)  # (B, S, T)
    assert torch.equal(attention[padded], torch.zeros_like(attention[padded]))


def test_reconstruct_pads_after_eos_and_stops_when_every_item_has_ended():
    """Row r emits token 5 for r steps, then EOS: the rest of its row is padding, and decoding stops
    once the last row has emitted EOS (not at max_length)."""
    model = tiny(eos_id=2)
    x = random_padded(3, 20, 2, 8, seed=7)

    class Scripted(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.step = 0

        def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, 2H) -> (B, V)
            logits = torch.zeros(features.size(0), 20)
            for row in range(features.size(0)):
                logits[row, 2 if self.step == row else 5] = 10.0
            self.step += 1
            return logits

    model.predict = Scripted()
    out = model.reconstruct(x, max_length=7)
    assert out.tolist() == [[2, 0, 0], [5, 2, 0], [5, 5, 2]]
    assert model.predict.step == 3


def test_free_running_and_denoising_batches_train():
    x = random_padded(6, 20, 2, 8, seed=8)
    for kwargs in (
        {"teacher_forcing_ratio": 0.0},
        {"denoise": 0.5},
        {"denoise": 0.5, "denoise_mode": "mask", "mask_id": 1},
    ):
        model = tiny(**kwargs).train()
        model.log = lambda *a, **k: None
        loss = model.training_step((None, x), 0)
        assert torch.isfinite(loss)
        loss.backward()


def test_deletion_noise_keeps_order_and_at_least_one_token():
    x = random_padded(50, 20, 1, 10, seed=9)
    noisy, mask, lengths = corrupt(x, x.ne(0), 0.9, "delete", None, 0)
    assert int(lengths.min()) >= 1
    assert torch.equal(mask, noisy.ne(0))
    for row, original in zip(noisy.tolist(), x.tolist(), strict=True):
        kept = [t for t in row if t]
        it = iter(t for t in original if t)
        assert all(any(t == o for o in it) for t in kept), "deletion must keep the remaining tokens in order"


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.tensor([[1, 2, 20]]), "outside \\[0, 20\\)"),
        (torch.tensor([[1, -1]]), "outside"),
        (torch.tensor([[1, 2], [0, 0]]), "row 1 of the batch is empty"),
        (torch.tensor([[1.0, 2.0]]), "integer token ids"),
        (torch.tensor([1, 2]), "shape \\(B, T\\)"),
        (torch.zeros(0, 3, dtype=torch.long), "empty batch"),
        (torch.tensor([[1, 0, 2]]), "pad sequences at the end"),
    ],
)
def test_bad_input_raises(x, message):
    with pytest.raises(ValueError, match=message):
        tiny()(x)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden_size": 15}, "even"),
        ({"hidden_size": -4}, "even"),
        ({"layers": 0}, "layers"),
        ({"pad_id": 20}, "pad_id"),
        ({"teacher_forcing_ratio": 1.5}, "teacher_forcing_ratio"),
        ({"denoise": 0.2, "denoise_mode": "mask"}, "mask_id"),
        ({"learning_rate": 1e-4, "learning_rate_min": 1e-3}, "learning_rate_min"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs)


class _Batches(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return self.x


def test_checkpoint_round_trip(tmp_path):
    x = random_padded(8, 20, 2, 9, seed=10)
    model = tiny(max_decode_length=9, eos_id=2).train()
    loader = torch.utils.data.DataLoader(_Batches(x), batch_size=None)
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    model.eval()
    with torch.no_grad():
        expected, _ = model(x)
    reloaded = QuackAutoEncoder.load_from_checkpoint(path, map_location="cpu").eval()
    safe = load_model(str(path))
    with torch.no_grad():
        assert torch.equal(reloaded(x)[0], expected)
        assert torch.equal(safe(x)[0], expected)
    assert safe.hparams.max_decode_length == 9 and safe.hparams.eos_id == 2
    # the loaded tensors are the model's own (no meta placeholder left, trainable parameters, both GRUs usable)
    assert not any(t.is_meta for t in (*safe.parameters(), *safe.buffers()))
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in safe.parameters())
    with torch.no_grad():
        assert torch.equal(safe.reconstruct(x, max_length=9), model.reconstruct(x, max_length=9))
    # weights saved in another dtype are cast into a float32 model, as before
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"] = {k: v.to(torch.bfloat16) for k, v in checkpoint["state_dict"].items()}
    torch.save(checkpoint, tmp_path / "bf16.ckpt")
    cast = load_model(str(tmp_path / "bf16.ckpt"))
    assert all(p.dtype == torch.float32 for p in cast.parameters())
    for name, tensor in cast.state_dict().items():
        assert torch.equal(tensor, checkpoint["state_dict"][name].float())


def test_load_model_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(str(tmp_path / "missing.ckpt"))
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a torch checkpoint .*never unpickles"):
        load_model(str(bad))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a quackae model checkpoint"):
        load_model(str(tmp_path / "other.ckpt"))


def test_configure_optimizers_defaults_to_trainer_horizon(tmp_path):
    model = tiny()
    config = model.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.AdamW)
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.CosineAnnealingLR)
    fixed = tiny(lr_max_epochs=7).configure_optimizers()["lr_scheduler"]
    assert fixed["scheduler"].T_max == 7 and fixed["interval"] == "epoch"
    x = random_padded(4, 20, 2, 6, seed=11)
    loader = torch.utils.data.DataLoader(_Batches(x), batch_size=None)
    for limits, period, interval in (({"max_steps": 5}, 5, "step"), ({"max_epochs": 3}, 3, "epoch")):
        trainer = pl.Trainer(
            **limits,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        model = tiny().train()
        trainer.fit(model, loader)
        (scheduler,) = trainer.lr_scheduler_configs
        assert scheduler.scheduler.T_max == period and scheduler.interval == interval
