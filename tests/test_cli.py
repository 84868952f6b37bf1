from __future__ import annotations

import json
import subprocess
import sys

import pytest

from quackae.cli import main


def test_bench_train_json_last_line(capsys):
    assert main(["bench", "--what", "train", "--steps", "1", "--warmup", "0", "--batch-size", "4", "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    figures = json.loads(last)
    assert figures["tokens_per_s"] > 0 and figures["device"].startswith("cpu")


def test_bad_flag_value_is_one_line_error(capsys):
    assert main(["bench", "--what", "nothing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["quackae bench: error: --what must be train, prepare, encode or quality, got 'nothing'"]


@pytest.mark.parametrize(
    "command", ["prepare", "train", "encode", "reconstruct", "export", "classify", "bench", "run", "demo"]
)
def test_every_subcommand_documents_its_flags(command):
    out = subprocess.run([sys.executable, "-m", "quackae", command, "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "usage: quackae" in out.stdout
