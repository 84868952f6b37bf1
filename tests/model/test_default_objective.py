"""The default objective (the bag-of-words term alone, half the encoder's input words dropped), the refusal of
no objective at all, and what a model with an untrained decoder says where its decoder would be used."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import train_tiny

from quackae.cli.command import main
from quackae.model.autoencoder import QuackAutoEncoder
from quackae.model.checkpoints import load_model
from quackae.model.config import OBJECTIVE_BEFORE_BOW, ModelConfig, saved_settings
from quackae.stages.train import TrainConfig

OLD = {"reconstruction_weight": 1.0, "bow_weight": 0.0}  # the reconstruction autoencoder
UNTRAINED = "decoder of this model was not trained"


def test_the_defaults_are_the_bow_term_alone_with_input_word_dropout():
    for config in (ModelConfig(), TrainConfig()):
        assert (config.reconstruction_weight, config.bow_weight, config.input_word_dropout) == (0.0, 1.0, 0.5)
        assert config.bow_pooling is None  # the stored pooling
    model = QuackAutoEncoder(num_embeddings=20, embed_size=8, hidden_size=16)
    assert model.bow is not None and not any(p.requires_grad for p in model.decoder.parameters())


def test_no_objective_is_refused_in_one_line_naming_the_old_flags(tmp_path, capsys):
    with pytest.raises(ValueError, match="--reconstruction-weight 1 --bow-weight 0"):
        TrainConfig(bow_weight=0.0)
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "r"), "--bow-weight", "0"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "trains nothing" in error[0] and "--reconstruction-weight 1 --bow-weight 0" in error[0]


def test_the_old_flags_give_the_reconstruction_autoencoder():
    config = ModelConfig(**OLD)
    assert config.input_word_dropout == 0.0  # nothing for it to act on: recorded as what acts
    assert TrainConfig(**OLD).input_word_dropout == 0.0  # the RUN's config.yaml and a --resume agree with it
    model = QuackAutoEncoder(num_embeddings=20, embed_size=8, hidden_size=16, **OLD)
    assert model.bow is None and all(p.requires_grad for p in model.parameters())
    assert model.hparams["input_word_dropout"] == 0.0


def test_a_checkpoint_saved_before_the_objective_fields_keeps_reconstruction(tmp_path):
    model = QuackAutoEncoder(num_embeddings=20, embed_size=8, hidden_size=16, **OLD)
    saved = {k: v for k, v in model.hparams.items() if k not in OBJECTIVE_BEFORE_BOW}
    torch.save(
        {"state_dict": model.state_dict(), "hyper_parameters": saved, "pytorch-lightning_version": "2"},
        tmp_path / "m.ckpt",
    )
    loaded = load_model(tmp_path / "m.ckpt")
    assert {k: loaded.hparams[k] for k in OBJECTIVE_BEFORE_BOW} == OBJECTIVE_BEFORE_BOW
    assert loaded.bow is None
    # a saved value is never replaced
    assert saved_settings({"bow_weight": 2.0})["bow_weight"] == 2.0
    assert saved_settings({})["reconstruction_weight"] == 1.0


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, words_prepared) -> Path:
    """A folder for this module's runs, with a copy of the shared prepared data as ``p``."""
    root = tmp_path_factory.mktemp("objective")
    shutil.copytree(words_prepared, root / "p")
    return root


def _train(prepared: Path, name: str, **flags):
    return train_tiny(prepared / "p", prepared / name, max_steps=6, max_epochs=-1, **flags)


def test_a_run_without_reconstruction_skips_the_greedy_figures_and_says_why(prepared, monkeypatch, caplog):
    import quackae.stages.train as stage

    def refuse(*args, **kwargs):
        raise AssertionError("the untrained decoder was scored")

    with monkeypatch.context() as patch:
        patch.setattr(stage, "greedy_reconstruction", refuse)
        summary = _train(prepared, "bow")
    saved = json.loads((prepared / "bow" / "summary.json").read_text())
    assert saved["greedy_skipped"].startswith("no reconstruction trained")
    assert saved["greedy_token_accuracy"] is None and saved["token_accuracy"] is None and saved["greedy_items"] == 0
    skipped = [line for line in summary.lines() if "greedy reconstruction skipped" in line]
    assert len(skipped) == 1 and "no reconstruction trained" in skipped[0], summary.lines()
    old = _train(prepared, "old", **OLD)
    assert old.greedy_skipped is None and old.greedy_items > 0 and isinstance(old.greedy_token_accuracy, float)
    assert old["token_accuracy"] == old.greedy_token_accuracy  # the name earlier summaries used, kept


@pytest.mark.parametrize(("run", "warned"), [("bow", True), ("old", False)])
def test_the_decoder_users_warn_of_an_untrained_decoder(prepared, run, warned, caplog, tmp_path):
    from quackae.model.encoder import QuackEncoder
    from quackae.stages.configs import ReconstructConfig
    from quackae.stages.encode import EncodeConfig, encode
    from quackae.stages.reconstruct import reconstruct

    if not (prepared / run / "summary.json").is_file():
        _train(prepared, run, **({} if run == "bow" else OLD))
    caplog.set_level(logging.WARNING)
    QuackEncoder.from_run(prepared / run, device="cpu").reconstruct(["duck goose"])
    reconstruct(ReconstructConfig(model=str(prepared / run), texts=("duck swan",)))
    assert caplog.text.count(UNTRAINED) == (2 if warned else 0), caplog.text
    caplog.clear()
    common = {"data": str(prepared / "p"), "model": str(prepared / run), "accelerator": "cpu", "devices": "1"}
    encode(EncodeConfig(**common, out=str(tmp_path / "plain")))
    assert UNTRAINED not in caplog.text  # the encodings are what such a model is for
    encode(EncodeConfig(**common, out=str(tmp_path / "drawn"), png="attention", png_limit=2))
    warnings = [r.getMessage() for r in caplog.records if UNTRAINED in r.getMessage()]
    assert len(warnings) == (1 if warned else 0) and all(w.startswith("--png attention: ") for w in warnings)


def test_the_quality_bench_reports_null_reconstruction_figures_for_a_run_without_them():
    from quackae.bench.quality import _held_out

    summary = {"global_step": 3, "train_seconds": 1.0, "best_val_loss": 2.0, "token_accuracy": None}
    figures = _held_out({**summary, "exact_match": None})
    assert figures["token_accuracy"] is None and figures["exact_match"] is None
    assert _held_out({**summary, "token_accuracy": 0.123456, "exact_match": 0.5})["token_accuracy"] == 0.1235


def test_a_pipeline_names_why_train_has_no_reconstruction_figures_rather_than_printing_none():
    from quackae.stages.pipeline import _brief
    from quackae.stages.train import SKIPPED_GREEDY, TrainResult

    result = TrainResult(
        run="r", stop_reason="max_steps", stop_detail="--max-steps 4 reached", global_step=4, epochs=1, validations=1,
        test_items=3, greedy_skipped=SKIPPED_GREEDY,
    )  # fmt: skip
    brief = _brief("train", result)  # the greedy figures are None: left out, and the reason named
    expected = {"run": "r", "global_step": 4, "stop_reason": "max_steps", "greedy_items": 0, "test_items": 3}
    assert brief == {**expected, "greedy_skipped": SKIPPED_GREEDY}
