"""Quiet by default: library notices filtered by text, --verbose brings them back; --version; lazy imports."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings

import pytest

import quackae
from quackae.cli.quiet import LIBRARY_NOTICES, LIBRARY_WARNINGS, is_library_notice, quiet_libraries

EXAMPLES = {
    FutureWarning: "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead.",
    UserWarning: "You have overridden `transfer_batch_to_device` in `LightningModule` but have passed in a "
    "`LightningDataModule`. It will use the implementation from `LightningModule` instance.",
}


def test_the_listed_warnings_are_filtered_and_others_are_not():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_libraries()
        for category, message in EXAMPLES.items():
            warnings.warn(message, category, stacklevel=1)
        warnings.warn("Couldn't infer the batch indices fetched from your dataloader: `PredictLoader`", stacklevel=1)
        warnings.warn("something a user should see", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something a user should see"]
    assert len(LIBRARY_WARNINGS) == 5


def test_lightning_start_up_lines_are_filtered_on_its_logger(caplog):
    quiet_libraries()
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    with caplog.at_level(logging.INFO):
        logger.info("GPU available: False, used: False")
        logger.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger")
        logger.info("`Trainer.fit` stopped: `max_steps=40` reached.")  # quackae train says why, with the flag
        logger.info("`Trainer(val_check_interval=1.0)` was configured so validation will run at the end of the epoch.")
        logger.info("Restoring states from the checkpoint path at RUN/checkpoints/last.ckpt")
        logging.getLogger("pytorch_lightning.callbacks.model_summary").info("\n  | Name | Type | Params")
    assert [r.getMessage() for r in caplog.records] == [
        "Restoring states from the checkpoint path at RUN/checkpoints/last.ckpt"
    ]
    assert is_library_notice("TPU available: False, using: 0 TPU cores") and LIBRARY_NOTICES


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_help_version_and_a_user_mistake_load_neither_torch_nor_lightning(tmp_path):
    code = f"""
import contextlib, io, json, sys
from quackae.cli import main
codes = []
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    for argv in (["--help"], ["--version"], ["prepare", "--help"]):
        try:
            main(argv)
        except SystemExit as stop:
            codes.append(stop.code)
    codes.append(main(["prepare", {str(tmp_path / "missing.jsonl")!r}, "--out", {str(tmp_path / "x")!r}]))
print(json.dumps([codes, [m for m in ("torch", "pytorch_lightning", "datasets") if m in sys.modules]]))
"""
    codes, loaded = json.loads(_run(code))
    assert codes == [0, 0, 0, 2] and loaded == []


def test_import_quackae_is_light_and_names_load_on_use():
    assert json.loads(_run("import json, sys, quackae; print(json.dumps('torch' in sys.modules))")) is False
    assert quackae.QuackEncoder.__module__ == "quackae.model.encoder"
    assert set(quackae.__all__) <= set(dir(quackae))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        quackae.nothing  # noqa: B018


def test_version(capsys):
    from quackae.cli.command import main

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"quackae {quackae.__version__}"


@pytest.mark.slow
def test_a_model_stage_prints_no_library_notice_unless_verbose(tmp_path):
    import numpy as np

    from quackae.stages.prepare import PrepareConfig, prepare

    rng = np.random.default_rng(0)
    words = "duck goose swan apple pear plum".split()
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words, size=4)) for _ in range(60)) + "\n")
    prepare(PrepareConfig(inputs=str(corpus), out=str(tmp_path / "p"), vocab_size=280, min_frequency=1))
    flags = ["--max-epochs", "1", "--embed-size", "8", "--hidden-size", "8", "--batch-size", "16"]
    flags += ["--accelerator", "cpu", "--devices", "1", "--log-every-n-steps", "1"]

    def train(out: str, *extra: str) -> str:
        command = [sys.executable, "-m", "quackae", *extra, "train", str(tmp_path / "p"), "--out", out, *flags]
        done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return done.stdout + done.stderr

    quiet = train(str(tmp_path / "quiet"))
    notices = [line for line in quiet.splitlines() if is_library_notice(line) or "LeafSpec" in line]
    assert notices == []
    assert "files written:" in quiet and str(tmp_path / "quiet" / "curves.png") in quiet
    # each line once, the estimate among them, and no model summary or validation-schedule notice
    assert quiet.count("training stopped") == 1 and quiet.count("estimated training time on this machine") == 1
    assert "Trainable params" not in quiet and "val_check_interval" not in quiet and "Trainer.fit" not in quiet
    verbose = train(str(tmp_path / "verbose"), "--verbose")
    assert "GPU available: False" in verbose and "Trainable params" in verbose
