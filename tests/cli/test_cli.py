from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest

from quackae.cli.command import COMMANDS, _load, main


def test_bench_train_json_last_line(capsys):
    assert main(["bench", "--what", "train", "--steps", "1", "--warmup", "0", "--batch-size", "4", "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    figures = json.loads(last)
    # one timed step of 4 rows: tokens/s is their non-pad token count over a positive time
    assert figures["config"]["steps"] == 1 and figures["config"]["batch_size"] == 4
    assert figures["device"].startswith("cpu") and math.isfinite(figures["tokens_per_s"])
    assert 4 * 8 / figures["tokens_per_s"] < 600  # at least 4 x 8 tokens (lengths >= 8) in under 10 min


def test_bad_flag_value_is_one_line_error(capsys):
    assert main(["bench", "--what", "nothing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["quackae bench: error: --what must be train, prepare, encode, store or quality, got 'nothing'"]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_documents_its_flags(command):
    """``--help`` names every field of the stage's config as a flag (or positional) with its default."""
    out = subprocess.run([sys.executable, "-m", "quackae", command, "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # argparse wraps long help lines
    config_cls, _ = _load(command)
    for f in dataclasses.fields(config_cls):
        if f.metadata.get("positional"):
            assert f.name in text, f"{command} --help does not show positional {f.name}"
            continue
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, f"{command} --help does not document {flag}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert f"(default: {default})" in text, f"{command} --help does not give the default of {flag}"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("what", "keys"),
    [
        (
            "encode",
            {
                "model_only_items_per_s",
                "end_to_end_items_per_s",
                "end_to_end_vs_model_only",
                "end_to_end_after_startup_vs_model_only",
                "end_to_end_startup_s",
                "writer_items_per_s",
            },
        ),
        ("store", {"write_items_per_s", "read_items_per_s", "random_access_items_per_s", "bytes_per_item"}),
    ],
)
def test_store_benches_run_end_to_end(what, keys, tmp_path, capsys):
    """The benches build what the stages read (a complete prepared folder, a run) and report their figures."""
    assert main(["bench", "--what", what, "--items", "300", "--dir", str(tmp_path), "--json"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert keys <= set(figures) and all(figures[k] > 0 for k in keys)
    if what == "encode":  # the same runs less their start-up: never slower than the whole call
        assert figures["end_to_end_after_startup_vs_model_only"] >= figures["end_to_end_vs_model_only"]


def test_ctrl_c_while_the_command_loads_is_one_line_and_exit_130(monkeypatch, capsys):
    import quackae.cli.command as cli

    def loading(command):
        raise KeyboardInterrupt  # Ctrl-C during the stage's imports, before the command runs

    monkeypatch.setattr(cli, "build_parser", loading)
    assert cli.main(["encode", "data"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["quackae: interrupted"]


@pytest.mark.parametrize("command", ["train", "encode", "classify"])
@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
        (["--seed", str(2**32)], f"--seed must be in [0, 2**32), got {2**32}"),
        (["--devices", "0"], "--devices must be auto, a count of at least 1 (-1: all), or a list of device indices"),
    ],
)
def test_a_seed_or_device_count_out_of_range_names_the_flag(tmp_path, capsys, command, flags, words):
    inputs = {"train": [], "encode": ["--model", str(tmp_path / "m")], "classify": ["--label-field", "label"]}
    args = [command, str(tmp_path / "in"), *inputs[command], "--out", str(tmp_path / "o"), *flags]
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert err == [f"quackae {command}: error: {words}" + ("" if "seed" in words else " like 0, or 0,1; got '0'")]
    assert not (tmp_path / "o").exists()


def test_device_indices_on_the_cpu_name_the_flag():
    from quackae.core.errors import QuackError
    from quackae.stages.configs import TrainConfig

    with pytest.raises(QuackError, match=r"^--devices 0, lists device indices, which only a GPU has; on the CPU give"):
        TrainConfig(devices="0,", accelerator="cpu").trainer_kwargs()
