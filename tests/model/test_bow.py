"""The bag-of-words objective: its loss against a slow per-item reference, padding and batch invariance,
``bow_weight`` 0 changing nothing, reconstruction off, input word dropout, checks and the run summary."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import random_padded
from test_model import reference_loss

from quackae.model.autoencoder import QuackAutoEncoder
from quackae.model.checkpoints import load_model
from quackae.model.config import ModelConfig
from quackae.stages.train import TrainConfig

VOCAB = 20


def tiny(**kwargs) -> QuackAutoEncoder:
    settings = {"num_embeddings": VOCAB, "embed_size": 8, "hidden_size": 16, "pooling": "final"}
    # both terms and no input word dropout unless a test says otherwise (not the command's defaults)
    settings.update(dropout=0.0, word_dropout=0.0, reconstruction_weight=1.0, bow_weight=1.0, input_word_dropout=0.0)
    settings.update(kwargs)
    return QuackAutoEncoder(**settings).eval()


def item_encoding(model: QuackAutoEncoder, tokens: list[int], pooling: str) -> torch.Tensor:
    """One item, unpadded, through the encoder GRU by hand; its pooled encoding (P,)."""
    states, _ = model.encoder(model.embed(torch.tensor([tokens])))  # (1, n, H)
    states = states[0]  # (n, H)
    half = model.hidden_size // 2
    parts = {
        "final": torch.cat([states[-1, :half], states[0, half:]]),  # forward ends last, backward ends first
        "mean": states.mean(dim=0),
        "max": states.amax(dim=0),
    }
    return torch.cat([parts[name] for name in pooling.split("+")])


def reference_bow(model: QuackAutoEncoder, x: torch.Tensor, seen: torch.Tensor | None = None) -> tuple:
    """Item by item: the mean over its tokens of -log_softmax(head(encoding))[token]; returns the loss term
    (each item's mean times its token count, averaged over items) and the mean of the per-item means.
    ``seen`` (B, T') is what the encoder reads when it differs from the target ``x``."""
    seen = x if seen is None else seen
    terms, means = [], []
    for target, shown in zip(x.tolist(), seen.tolist(), strict=True):
        tokens = [t for t in target if t != model.pad_id]
        log_probs = F.log_softmax(model.bow(item_encoding(model, [t for t in shown if t], model.bow_pooling)), dim=0)
        mean = -torch.stack([log_probs[t] for t in tokens]).mean()
        terms.append(mean * len(tokens))
        means.append(mean)
    return torch.stack(terms).mean(), torch.stack(means).mean()


def losses(model: QuackAutoEncoder, x: torch.Tensor) -> dict:
    return model._losses(*model._check(x))


@pytest.mark.parametrize(
    ("pooling", "bow_pooling", "weight", "rebuild", "training"),
    [  # the reconstruction reference decodes from the stored encoding, so rows that rebuild store final states
        ("final", None, 1.0, 1.0, False),
        ("final", "mean", 2.5, 0.5, False),
        ("final", "final+mean+max", 0.3, 1.0, True),  # training on a CPU: the unpacked encoder
        ("final+mean", None, 0.7, 0.0, False),
        ("final+mean", "max", 1.3, 0.0, True),
    ],
)
def test_bow_loss_equals_a_per_item_reference_with_its_gradients(pooling, bow_pooling, weight, rebuild, training):
    model = tiny(pooling=pooling, bow_pooling=bow_pooling, bow_weight=weight, reconstruction_weight=rebuild)
    model.train(training)  # no dropout, noise or free running in these models: training changes only the path
    assert model.bow_pooling == (bow_pooling or pooling)
    x = random_padded(7, VOCAB, 1, 10, seed=2)
    fast = losses(model, x)
    term, mean = reference_bow(model, x)
    slow = weight * term + (rebuild * reference_loss(model, x) if rebuild else 0.0)
    assert fast["bow_loss"].item() == pytest.approx(mean.item(), abs=1e-5)
    assert fast["loss"].item() == pytest.approx(slow.item(), abs=1e-4)
    assert ("token_loss" in fast) == (rebuild > 0)
    names, parameters = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
    fast_grads = torch.autograd.grad(fast["loss"], parameters, allow_unused=True)
    slow_grads = torch.autograd.grad(slow, parameters, allow_unused=True, retain_graph=True)
    for name, a, b in zip(names, fast_grads, slow_grads, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    # the head reaches the encoder only through the encoding: never the decoder
    head_only = torch.autograd.grad(weight * term, parameters, allow_unused=True)
    used = {name for name, g in zip(names, head_only, strict=True) if g is not None}
    assert used == {n for n in names if n.split(".")[0] in ("bow", "embed", "encoder")}


def test_an_items_bow_loss_ignores_padding_and_batch_mates():
    model = tiny(bow_pooling="final+mean+max")
    x = random_padded(6, VOCAB, 2, 9, seed=3)
    with torch.no_grad():
        encoding, states = model._encode(x, x.ne(0).sum(dim=1))
        batch = model.bag_of_words(model.pool(encoding, states, x.ne(0), model.bow_pooling), x, x.ne(0))  # (B,)
        for i in range(x.size(0)):
            n = int(x[i].ne(0).sum())
            for alone in (x[i : i + 1, :n], F.pad(x[i : i + 1, :n], (0, 4))):
                enc, st = model._encode(alone, alone.ne(0).sum(dim=1))
                single = model.bag_of_words(model.pool(enc, st, alone.ne(0), model.bow_pooling), alone, alone.ne(0))
                assert single.item() == pytest.approx(batch[i].item(), abs=1e-5)
        wider = F.pad(x, (0, 5))
        assert losses(model, wider)["loss"].item() == pytest.approx(losses(model, x)["loss"].item(), abs=1e-5)
        flipped = losses(model, x.flip(0))
        assert flipped["bow_loss"].item() == pytest.approx(losses(model, x)["bow_loss"].item(), abs=1e-5)


def test_bow_weight_zero_adds_no_head_and_changes_nothing():
    torch.manual_seed(0)
    plain = tiny(bow_weight=0.0)
    torch.manual_seed(0)
    with_head = tiny(bow_weight=2.0)
    assert plain.bow is None and not any(name.startswith("bow.") for name in plain.state_dict())
    shared = {k: v for k, v in with_head.state_dict().items() if not k.startswith("bow.")}
    assert shared.keys() == plain.state_dict().keys()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in shared.items())  # the head is made last
    x = random_padded(6, VOCAB, 1, 9, seed=4)
    parts = losses(plain, x)
    assert set(parts) == {"loss", "token_loss", "token_acc"}
    assert parts["loss"].item() == pytest.approx(reference_loss(plain, x).item(), abs=1e-5)
    term, _ = reference_bow(with_head, x)
    assert losses(with_head, x)["loss"].item() == pytest.approx(parts["loss"].item() + 2.0 * term.item(), abs=1e-4)
    logged = []
    plain.log = lambda name, *a, **k: logged.append(name)
    plain.training_step((None, x), 0)
    assert logged == ["train_loss", "train_token_loss", "train_token_acc"]


def test_reconstruction_weight_zero_never_runs_the_decoder():
    model = tiny(reconstruction_weight=0.0, bow_weight=1.0).train()

    def refuse(*args, **kwargs):
        raise AssertionError("the decoder ran")

    model.decoder.forward = refuse
    logged = []
    model.log = lambda name, *a, **k: logged.append(name)
    x = random_padded(6, VOCAB, 1, 9, seed=5)
    loss = model.training_step((None, x), 0)
    assert logged == ["train_loss", "train_bow_loss"]
    loss.backward()
    decoder = {n for n, _ in model.named_parameters() if n.split(".")[0] in ("start", "decoder", "predict")}
    assert all(p.grad is None and not p.requires_grad for n, p in model.named_parameters() if n in decoder)
    # DDP (without find_unused_parameters) needs a gradient for every parameter that asks for one
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad), "unused parameters"
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == decoder
    assert all(p.requires_grad for p in tiny(reconstruction_weight=0.5).parameters())


@pytest.mark.parametrize("rebuild", [1.0, 0.0])
def test_input_word_dropout_feeds_the_bow_term_a_copy_with_words_deleted(rebuild, monkeypatch):
    # nearly every word dropped: deletion keeps each item's first token, so the bag-of-words term's encoder
    # sees x[:, :1] while its target stays the whole item and reconstruction keeps the whole input
    model = tiny(input_word_dropout=0.999999, reconstruction_weight=rebuild, bow_weight=1.5)
    x = random_padded(6, VOCAB, 2, 9, seed=6)
    encoded = []
    encode = model._encode
    monkeypatch.setattr(model, "_encode", lambda ids, lengths: encoded.append(ids.clone()) or encode(ids, lengths))
    model.train()
    parts = losses(model, x)
    assert len(encoded) == (2 if rebuild else 1)  # with reconstruction on, the bow term encodes its own copy
    if rebuild:
        assert torch.equal(encoded[0], x)  # reconstruction reads the whole item
    assert torch.equal(encoded[-1].ne(0).sum(dim=1), torch.ones(6, dtype=torch.long))
    assert torch.equal(encoded[-1][:, 0], x[:, 0])
    term, mean = reference_bow(model, x, seen=x[:, :1])
    expected = 1.5 * term + (reference_loss(model, x) if rebuild else 0.0)
    assert parts["bow_loss"].item() == pytest.approx(mean.item(), abs=1e-5)
    assert parts["loss"].item() == pytest.approx(expected.item(), abs=1e-4)
    encoded.clear()
    model.eval()  # evaluation reads the whole item, once
    term, mean = reference_bow(model, x)
    assert losses(model, x)["bow_loss"].item() == pytest.approx(mean.item(), abs=1e-5)
    assert len(encoded) == 1


def test_a_checkpoint_keeps_the_heads_pooling_after_set_pooling(tmp_path):
    model = tiny(pooling="final+mean")
    model.set_pooling("mean")
    assert model.bow_pooling == "final+mean" and model.encoding_size == 16
    torch.save(
        {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "pytorch-lightning_version": "2"},
        tmp_path / "m.ckpt",
    )
    loaded = load_model(tmp_path / "m.ckpt")
    assert loaded.pooling == "mean" and loaded.bow_pooling == "final+mean"
    x = random_padded(4, VOCAB, 1, 7, seed=7)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])
        assert losses(loaded, x)["loss"].item() == pytest.approx(losses(model, x)["loss"].item(), abs=1e-6)


@pytest.mark.parametrize(
    ("settings", "flag", "field"),
    [
        ({"bow_weight": -1.0}, "--bow-weight must not be negative", "bow_weight must not be negative"),
        ({"input_word_dropout": 1.0, "bow_weight": 1.0}, "--input-word-dropout must be in", "input_word_dropout must"),
        ({"bow_pooling": "sum", "bow_weight": 1.0}, "--bow-pooling must be one of", "bow_pooling must be one of"),
    ],
)
def test_bad_settings_name_their_flag(settings, flag, field):
    with pytest.raises(ValueError, match=flag):
        TrainConfig(**settings)
    with pytest.raises(ValueError, match=field):
        ModelConfig(**settings)


def test_a_run_logs_the_bow_loss_into_metrics_and_summary(tmp_path):
    from quackae.stages.prepare import PrepareConfig, prepare
    from quackae.stages.train import train

    words = "duck goose swan heron crane apple pear plum hammer saw drill".split()
    with (tmp_path / "c.jsonl").open("w") as handle:
        for i in range(60):
            chosen = [words[(i * 5 + k * 3) % len(words)] for k in range(2 + i % 4)]
            handle.write(json.dumps({"id": i, "text": " ".join(chosen)}) + "\n")
    prepare(
        PrepareConfig(inputs=(str(tmp_path / "c.jsonl"),), out=str(tmp_path / "p"), vocab_size=300, min_frequency=1)
    )
    common = {"embed_size": 8, "hidden_size": 8, "batch_size": 8, "accelerator": "cpu", "devices": "1"}
    summary = train(
        TrainConfig(
            data=str(tmp_path / "p"), out=str(tmp_path / "r"), max_epochs=2, reconstruction_weight=1.0, **common
        )
    )
    saved = json.loads((tmp_path / "r/summary.json").read_text())
    assert saved["train_bow_loss"] > 0 and saved["val_bow_loss"] > 0 and summary.val_bow_loss == saved["val_bow_loss"]
    header = (tmp_path / "r/metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train_bow_loss_step", "train_bow_loss_epoch", "val_bow_loss"} <= set(header)
    rebuild = {"reconstruction_weight": 1.0, "bow_weight": 0.0}
    plain = train(TrainConfig(data=str(tmp_path / "p"), out=str(tmp_path / "plain"), max_epochs=1, **rebuild, **common))
    assert plain.train_bow_loss is None and plain.val_bow_loss is None  # no bag-of-words term, no figure
    # the bag-of-words term alone: a frozen decoder under the command's precision, optimizer and clipping
    alone = {"reconstruction_weight": 0.0, "bow_weight": 1.0, "input_word_dropout": 0.5}
    only = train(TrainConfig(data=str(tmp_path / "p"), out=str(tmp_path / "only"), max_epochs=2, **alone, **common))
    assert 0 < only["train_bow_loss"] < 20 and 0 < only["val_bow_loss"] < 20 and only["global_step"] > 0
