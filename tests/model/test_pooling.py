"""The model's quality switches: pooling, word dropout and attention dropout, each against a slow reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import RECONSTRUCTION, random_padded

from quackae.data.predict import PredictBatch
from quackae.model.autoencoder import QuackAutoEncoder
from quackae.model.checkpoints import load_model
from quackae.model.config import POOLINGS
from quackae.model.noise import word_dropout


def tiny(**kwargs) -> QuackAutoEncoder:
    defaults = {"num_embeddings": 20, "embed_size": 8, "hidden_size": 16, "layers": 1, "mask_id": 1, "pooling": "final"}
    defaults.update(dropout=0.0, word_dropout=0.0, **RECONSTRUCTION)  # switches off unless a test turns one on
    defaults.update(kwargs)
    return QuackAutoEncoder(**defaults).eval()


def reference_pooling(model: QuackAutoEncoder, tokens: torch.Tensor) -> torch.Tensor:
    """One unpadded item (1, n): final states, the plain mean and/or the plain max of its n encoder states."""
    _, states = model(tokens)  # (1, n, H)
    n = tokens.size(1)
    half = model.hidden_size // 2
    final = torch.cat([states[0, n - 1, :half], states[0, 0, half:]])  # forward ends last, backward first
    mean = torch.stack([states[0, t] for t in range(n)]).sum(dim=0) / n
    largest = states[0, 0].clone()
    for t in range(1, n):
        largest = torch.maximum(largest, states[0, t])
    parts = {"final": final, "mean": mean, "max": largest}
    return torch.cat([parts[name] for name in model.pooling.split("+")])


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_every_pooling_ignores_padding_and_batch_mates_and_matches_the_reference(pooling, layers):
    model = tiny(pooling=pooling, layers=layers)
    x = random_padded(6, 20, 2, 9, seed=1)
    with torch.no_grad():
        batch_enc, _ = model(x)
        assert batch_enc.shape == (6, model.encoding_size)
        assert model.encoding_size == 16 * len(pooling.split("+"))
        for i in range(x.size(0)):
            n = int(x[i].ne(0).sum())
            alone = x[i : i + 1, :n]
            padded = torch.cat([alone, torch.zeros(1, 5, dtype=torch.long)], dim=1)
            enc_alone, _ = model(alone)
            enc_padded, _ = model(padded)
            torch.testing.assert_close(enc_alone, batch_enc[i : i + 1], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(enc_padded, enc_alone, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(enc_alone[0], reference_pooling(model, alone), atol=1e-6, rtol=1e-5)
        reversed_enc, _ = model(x.flip(0))
        torch.testing.assert_close(reversed_enc.flip(0), batch_enc, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_predict_step_returns_the_pooled_encoding(pooling):
    model = tiny(pooling=pooling)
    x = random_padded(4, 20, 1, 7, seed=4)
    with torch.no_grad():
        metadata, encoding, attention = model.predict_step(PredictBatch([{"id": i} for i in range(4)], x))
        expected, _ = model(x)
    torch.testing.assert_close(encoding, expected)
    assert encoding.shape == (4, model.encoding_size) and len(metadata) == 4 and attention is None


def test_pooling_changes_only_what_is_stored_not_training():
    torch.manual_seed(3)
    final = tiny(pooling="final")
    mean = tiny(pooling="final+mean")
    mean.load_state_dict(final.state_dict())
    x = random_padded(5, 20, 1, 8, seed=5)
    assert final.training_loss(x).item() == pytest.approx(mean.training_loss(x).item(), abs=1e-6)
    final.set_pooling("final+mean")
    torch.testing.assert_close(final(x)[0], mean(x)[0])
    with pytest.raises(ValueError, match="pooling must be one of"):
        final.set_pooling("median")


def test_pooling_travels_in_the_checkpoint(tmp_path):
    model = tiny(pooling="final+mean", word_dropout=0.25, attention_dropout=0.5)
    # the two entries a Lightning checkpoint holds that load_model reads
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, tmp_path / "m.ckpt")
    loaded = load_model(tmp_path / "m.ckpt")
    assert loaded.pooling == "final+mean" and loaded.encoding_size == 32
    assert loaded.hparams.word_dropout == 0.25 and loaded.hparams.attention_dropout == 0.5
    x = random_padded(3, 20, 1, 6, seed=6)
    torch.testing.assert_close(loaded(x)[0], model(x)[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pooling": "median"}, "pooling must be one of"),
        ({"word_dropout": 1.0}, "word_dropout must be in"),
        ({"word_dropout": -0.1}, "word_dropout must be in"),
        ({"attention_dropout": 1.5}, "attention_dropout must be in"),
    ],
)
def test_bad_switches_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs)


def reference_loss(
    model: QuackAutoEncoder, x: torch.Tensor, decoder_inputs: torch.Tensor, with_context: bool
) -> torch.Tensor:
    """The training loss one Python step at a time: the decoder reads ``decoder_inputs`` (B, T) after the
    start vector, and the attention context is used or replaced by zeros."""
    encoding, states = model(x)  # pooling "final": the decoder's start state
    mask = x.ne(model.pad_id)
    batch, width = x.shape
    hidden = encoding.unsqueeze(0).repeat(model.layers, 1, 1)
    token_embed = model.start.expand(batch, -1)
    loss = torch.zeros(())
    for t in range(width):
        out, hidden = model.decoder(token_embed.unsqueeze(1), hidden)
        query = out[:, 0]
        scores = torch.einsum("bth,bh->bt", states, query) / math.sqrt(model.hidden_size)
        weights = F.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)
        context = (weights.unsqueeze(-1) * states).sum(dim=1) if with_context else torch.zeros_like(query)
        logits = model.predict(torch.cat([context, query], dim=-1))
        loss = loss + F.cross_entropy(logits, x[:, t], ignore_index=model.pad_id)
        token_embed = model.embed(decoder_inputs[:, t])
    return loss


def test_attention_dropout_one_zeroes_every_context_in_training_only():
    model = tiny(attention_dropout=1.0)
    x = random_padded(6, 20, 1, 9, seed=7)
    model.train()
    fast = model.training_loss(x)
    assert fast.item() == pytest.approx(reference_loss(model, x, x, with_context=False).item(), abs=1e-5)
    model.eval()
    assert model.training_loss(x).item() == pytest.approx(reference_loss(model, x, x, True).item(), abs=1e-5)


def token_losses(model: QuackAutoEncoder, x: torch.Tensor) -> torch.Tensor:
    """Teacher-forced cross-entropy of each non-pad target token (N,)."""
    target, mask, lengths = model._check(x)
    encoding, states = model._encode(target, lengths)
    ce, _, _ = model._teacher_forced(target, encoding, states, mask, lengths, accuracy=False)
    return ce.detach()


def test_attention_dropout_drops_about_its_share_of_steps():
    torch.manual_seed(0)
    model = tiny(attention_dropout=0.3).train()
    x = random_padded(64, 20, 10, 10, seed=8)
    with torch.no_grad():
        model.hparams.attention_dropout = 0.0
        kept = token_losses(model, x)
        model.hparams.attention_dropout = 1.0
        dropped = token_losses(model, x)
        model.hparams.attention_dropout = 0.3
        mixed = token_losses(model, x)
    # each token's context is either used or zero, so its loss is one of the two
    is_kept = torch.isclose(mixed, kept, atol=1e-6, rtol=0)
    is_dropped = torch.isclose(mixed, dropped, atol=1e-6, rtol=0)
    assert bool((is_kept | is_dropped).all())
    share = (is_dropped & ~is_kept).float().mean().item()
    assert 0.25 < share < 0.35


def test_word_dropout_replaces_non_pad_tokens_by_the_mask_id():
    torch.manual_seed(0)
    x = random_padded(200, 20, 2, 12, seed=9).clamp(min=0)
    x = x.masked_fill(x.eq(1), 2)  # no real token equals the mask id
    out = word_dropout(x, 0.4, 1, 0)
    pads = x.eq(0)
    assert torch.equal(out[pads], x[pads])  # padding untouched
    changed = out.ne(x)
    assert bool(out[changed].eq(1).all())  # replaced tokens hold the mask id
    share = changed.sum().item() / (~pads).sum().item()
    assert 0.35 < share < 0.45
    without = word_dropout(x, 0.4, None, 0)
    assert bool(without[without.ne(x)].eq(0).all()) and bool(without.ne(x).any())  # the pad id (zero embedding)


def test_word_dropout_feeds_the_decoder_mask_tokens_in_training_only():
    model = tiny(word_dropout=0.999999, mask_id=1)
    x = random_padded(6, 20, 1, 9, seed=10)
    everything_masked = x.masked_fill(x.ne(0), 1)
    model.train()
    fast = model.training_loss(x)
    assert fast.item() == pytest.approx(reference_loss(model, x, everything_masked, True).item(), abs=1e-5)
    model.eval()
    assert model.training_loss(x).item() == pytest.approx(reference_loss(model, x, x, True).item(), abs=1e-5)


def test_switches_train_a_step_with_every_pooling():
    torch.manual_seed(0)
    x = random_padded(8, 20, 2, 10, seed=11)
    for pooling in POOLINGS:
        model = tiny(pooling=pooling, word_dropout=0.3, attention_dropout=0.5, denoise=0.2, dropout=0.1).train()
        loss = model.training_loss(x)
        loss.backward()
        assert math.isfinite(loss.item())
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
