"""Every file train, reconstruct, plot, run and prepare's readers read, fed the wrong thing (wrong-shape JSON or
YAML, cut short, zero bytes, not UTF-8, a directory, a FIFO, a symbolic-link loop, a raw or hostile pickle, NaN
weights, aliases that blow up or loop): one line on stderr naming the file, exit 2, never a hang."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from quackae.cli.command import main
from quackae.stages.prepare import PrepareConfig, prepare
from quackae.stages.train import TrainConfig, train

WORDS = "duck goose swan heron crane stork apple pear plum hammer saw drill".split()
TINY = ["--embed-size", "8", "--hidden-size", "8", "--batch-size", "8", "--accelerator", "cpu", "--devices", "1"]


def laughs(leaf: str = '"lol"') -> str:
    """A 0.4 KB YAML document whose ``stages`` stand for 9**9 values once its aliases are expanded."""
    text = f"a: &a [{', '.join([leaf] * 9)}]\n"
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True):
        text += f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]\n"
    return text


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    with (root / "c.jsonl").open("w") as handle:
        for i in range(48):
            handle.write(json.dumps({"id": i, "text": " ".join(WORDS[(i * 5 + k) % 12] for k in range(4))}) + "\n")
    prepare(PrepareConfig(inputs=(str(root / "c.jsonl"),), out=str(root / "p"), vocab_size=300, min_frequency=1))
    config = TrainConfig(data=str(root / "p"), out=str(root / "run"), embed_size=8, hidden_size=8, batch_size=8,
                         max_steps=3, val_check_interval=2, accelerator="cpu", devices="1")  # fmt: skip
    train(config)
    return root


def fifo(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    os.mkfifo(path)


def loop(path: Path) -> None:
    if os.path.lexists(path):
        path.unlink()
    os.symlink(path.name, path)


def directory(path: Path) -> None:
    if os.path.lexists(path):
        path.unlink()
    path.mkdir()


def text(value: str | bytes):
    def write(path: Path) -> None:
        if os.path.lexists(path) and not path.is_file():
            path.unlink()
        path.write_bytes(value.encode() if isinstance(value, str) else value)

    return write


def nan_weights(path: Path) -> None:
    saved = torch.load(path, weights_only=True)
    saved["state_dict"]["embed.weight"][0, 0] = float("nan")
    torch.save(saved, path)


class Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def evil(path: Path) -> None:
    torch.save({"state_dict": {}, "hyper_parameters": {}, "evil": Evil()}, path)


def cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:4000])


def run_cli(args: list[str], capsys) -> tuple[int, list[str]]:
    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- pipeline files
PIPELINES = [
    (
        "root: [a, b]\nstages:\n  - stage: corpus\n    out: c.jsonl\n",
        r"p.yaml: root must be one folder name \(a string\)",
    ),
    (
        "root: 5\nstages:\n  - stage: corpus\n    out: c.jsonl\n",
        r"root must be one folder name \(a string\), got a num",
    ),
    ("root: o\nstages: &s\n  - stage: corpus\n    out: *s\n", r"pipeline file .*p.yaml is refused: .*alias cycle"),
    ("root: o\nx: &x {y: *x}\nstages: []\n", r"pipeline file .*p.yaml is refused: .*alias cycle"),
    (laughs() + "root: o\nstages: [*i]\n", r"pipeline file .*p.yaml is refused: its aliases expand to more than"),
    ("stages: " + "[" * 3000 + "]" * 3000 + "\n", r"pipeline file .*p.yaml is nested too deeply"),
    (
        "root: o\nstages:\n  - stage: train\n    data: d\n    out: r\n    batch_size: 1.5\n",
        r"stage 1 \(train\): batch_size must be a whole number, got a number \(1.5\)",
    ),
    (
        "root: o\nstages:\n  - stage: train\n    data: d\n    out: r\n    max_time: 1:00:00:00\n",
        r"max_time must be a string or null, got a number \(\d+\) \(quote it",
    ),
    (
        "root: o\nstages:\n  - stage: prepare\n    inputs: [1, 2]\n    out: p\n",
        r"stage 1 \(prepare\): inputs must be a list of strings, got a list",
    ),
    (
        "root: o\nstages:\n  - stage: [x]\n  - {stage: corpus, 7: x}\n  - stage: train\n    data: d\n    out: r\n",
        r"stage 1: unknown stage \['x'\].*stage 2 \(corpus\): unknown keys 7 .*stage 3 \(train\): data .*d does not",
    ),
    ("root: o\nstage: corpus\nstages: [{stage: corpus}]\n", r"unknown top-level keys stage \(known: root, stages\)"),
    ("root: o\nstages:\n  - !!python/object/apply:os.system [ls]\n", r"p.yaml is not valid YAML at line 3"),
    (
        "root: o\nstages:\n  - stage: corpus\n    out: c.jsonl\nroot: elsewhere\n",
        r"pipeline file .*p.yaml is refused: key 'root' appears twice, at lines 1 and 5 \(keep one\); see",
    ),
    (
        "root: o\nstages:\n  - stage: corpus\n    out: c.jsonl\n    rows: 5\n    out: /etc/c.jsonl\n",
        r"pipeline file .*p.yaml is refused: key 'out' appears twice, at lines 4 and 6",
    ),
    ("root: o\nstages: [{stage: corpus, out: a, 'out': b}]\n", r"p.yaml is refused: key 'out' appears twice"),
    ("- stage: corpus\n", r"pipeline file .*p.yaml holds a list, not a mapping"),
    ("", r"pipeline file .*p.yaml holds nothing, not a mapping"),
    (b"root: \xff\n", r"pipeline file .*p.yaml is not UTF-8 text"),
    ("# " + "x" * (2 << 20), r"pipeline file .*p.yaml is [\d,]+ bytes, more than such a file ever holds"),
    (fifo, r"pipeline file .*p.yaml is a FIFO, not a file"),
    (directory, r"pipeline file .*p.yaml is a directory, not a file"),
    (loop, r"pipeline file .*p.yaml cannot be read \(a symbolic-link loop\)"),
]


@pytest.mark.parametrize(("content", "message"), PIPELINES, ids=[m[:40] for _, m in PIPELINES])
def test_pipeline_files(tmp_path, capsys, monkeypatch, content, message):
    monkeypatch.chdir(tmp_path)
    file = tmp_path / "p.yaml"
    if callable(content):
        file.write_text("x")
        content(file)
    else:
        file.write_bytes(content.encode() if isinstance(content, str) else content)
    code, err = run_cli(["run", str(file)], capsys)
    assert code == 2 and len(err) == 1, err
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "o").exists()


def test_a_merge_key_may_set_what_a_mapping_then_overrides():
    from quackae.core.safeyaml import parse_yaml

    assert parse_yaml("b: &b {x: 1, y: 2}\nd:\n  <<: *b\n  x: 3\n")["d"] == {"x": 3, "y": 2}


# ---------------------------------------------------------------------------------------------- RUN folders
RUNS = [
    # (file in the RUN, damage, command, message)
    ("config.yaml", text("[1, 2]\n"), "reconstruct", r"run config .*config.yaml holds a list, not a mapping"),
    ("config.yaml", text(laughs() + "data: {path: *i}\n"), "reconstruct", r"config.yaml is refused: its aliases"),
    ("config.yaml", text("data: &d {path: *d}\n"), "reconstruct", r"config.yaml is refused: .*alias cycle"),
    ("config.yaml", text(b"\xff\xfe"), "reconstruct", r"run config .*config.yaml is not UTF-8 text"),
    ("config.yaml", fifo, "reconstruct", r"run config .*config.yaml is a FIFO, not a file"),
    ("config.yaml", directory, "reconstruct", r"run config .*config.yaml is a directory, not a file"),
    ("prepare.json", text("[1]"), "reconstruct", r"prepare summary .*prepare.json holds a JSON array, not a JSON obj"),
    ("prepare.json", text('{"config": 5}'), "reconstruct", r"prepare.json has a config that is not a JSON object"),
    ("prepare.json", text('{"config": {"max_length": "x"}}'), "reconstruct", r"has max_length 'x', not a whole num"),
    ("prepare.json", text('{"config": '), "reconstruct", r"prepare summary .*prepare.json is not valid JSON"),
    ("tokenizer.json", fifo, "reconstruct", r"tokenizer file .*tokenizer.json is a FIFO, not a file"),
    ("tokenizer.json", directory, "reconstruct", r"tokenizer file .*tokenizer.json is a directory, not a file"),
    ("checkpoints/best.ckpt", text(pickle.dumps({"a": [1, 2]})), "reconstruct", r"best.ckpt is not a torch checkpo"),
    ("checkpoints/best.ckpt", evil, "reconstruct", r"best.ckpt cannot be loaded safely: .*GLOBAL posix.system"),
    ("checkpoints/best.ckpt", cut, "reconstruct", r"best.ckpt is not a torch checkpoint \(it is cut short"),
    ("checkpoints/best.ckpt", text(b""), "reconstruct", r"best.ckpt is empty \(0 bytes\)"),
    ("checkpoints/best.ckpt", text(b"\0" * 5000), "reconstruct", r"best.ckpt is not a torch checkpoint"),
    ("checkpoints/best.ckpt", fifo, "reconstruct", r"checkpoint .*best.ckpt is a FIFO, not a file"),
    ("checkpoints/best.ckpt", directory, "reconstruct", r"checkpoint .*best.ckpt is a directory, not a file"),
    ("checkpoints/best.ckpt", loop, "reconstruct", r"checkpoint .*best.ckpt is a symbolic-link loop, not a file"),
    ("checkpoints/best.ckpt", nan_weights, "reconstruct", r"best.ckpt holds non-finite weights \(embed.weight\)"),
    ("checkpoints/last.ckpt", text(pickle.dumps([1])), "resume", r"last.ckpt is not a torch checkpoint"),
    ("checkpoints/last.ckpt", evil, "resume", r"last.ckpt cannot be loaded safely: .*GLOBAL posix.system"),
    ("checkpoints/last.ckpt", cut, "resume", r"last.ckpt is not a torch checkpoint \(it is cut short"),
    ("checkpoints/last.ckpt", fifo, "resume", r"--resume checkpoint .*last.ckpt is a FIFO, not a file"),
    ("checkpoints/last.ckpt", directory, "resume", r"--resume checkpoint .*last.ckpt is a directory, not a file"),
    ("checkpoints/last.ckpt", nan_weights, "resume", r"last.ckpt holds non-finite weights \(embed.weight\)"),
    ("logs/attempt-1.json", text("[1]"), "resume", r"start record .*attempt-1.json holds a JSON array, not a JSON"),
    ("logs/attempt-1.json", text('{"start_step": "x"}'), "resume", r"attempt-1.json has start_step 'x', not a step"),
    ("logs/attempt-1.json", text('{"start_step": -1}'), "resume", r"attempt-1.json has start_step -1, not a step"),
    ("logs/attempt-1.json", text("{not json"), "resume", r"start record .*attempt-1.json is not valid JSON"),
    ("logs/attempt-1.json", text(b""), "resume", r"start record .*attempt-1.json is empty"),
    ("logs/attempt-1.json", fifo, "resume", r"start record .*attempt-1.json is a FIFO, not a file"),
    ("logs/attempt-1.json", directory, "resume", r"start record .*attempt-1.json is a directory, not a file"),
    ("run.json", text("[1]"), "resume", r"run record .*run.json holds a JSON array, not a JSON object"),
    ("run.json", fifo, "resume", r"run record .*run.json is a FIFO, not a file"),
    ("metrics.csv", text("step,val_loss\n1,2\0\n"), "plot", r"metrics.csv line 2 holds NUL bytes \(cut short or zer"),
    ("metrics.csv", text("step,val_loss\n1,2,3\n"), "plot", r"metrics.csv line 2 has more values than columns"),
    (
        "metrics.csv",
        text('step,val_loss\n1,"2\n'),
        "plot",
        r"metrics.csv line 2 is not CSV \(unexpected end of data\); the next train or --resume into the run",
    ),
    ("metrics.csv", text("epoch,val_loss\n1,2\n"), "plot", r"metrics file .*metrics.csv has no step column"),
    ("metrics.csv", text(b"step\n\xff\n"), "plot", r"metrics file .*metrics.csv is not UTF-8 text"),
    ("metrics.csv", text(b""), "plot", r"metrics file .*metrics.csv is empty"),
    ("metrics.csv", fifo, "plot", r"metrics file .*metrics.csv is a FIFO, not a file"),
    ("metrics.csv", directory, "plot", r"metrics file .*metrics.csv is a directory, not a file"),
]


@pytest.mark.parametrize(("name", "damage", "command", "message"), RUNS, ids=[f"{n}-{m[:30]}" for n, _, _, m in RUNS])
def test_run_folders(ws, tmp_path, capsys, monkeypatch, name, damage, command, message):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    # a checkpoint records its data's --max-length; config.yaml and prepare.json are read for a run trained before
    old = name in ("config.yaml", "prepare.json")
    source = Path(__file__).parents[1] / "legacy" / "store-4bacc39" / "run" if old else ws / "run"
    shutil.copytree(source, run)
    damage(run / name)
    args = {
        "reconstruct": ["reconstruct", "--model", str(run), "duck goose"],
        "resume": ["train", str(ws / "p"), "--out", str(run), *TINY, "--max-steps", "5",
                   "--resume", str(run / "checkpoints" / "last.ckpt")],
        "plot": ["plot", str(run)],
    }[command]  # fmt: skip
    attempts = sorted(p.name for p in (run / "logs").iterdir()) if (run / "logs").is_dir() else []
    code, err = run_cli(args, capsys)
    assert code == 2 and len(err) == 1, err
    assert re.search(message, err[0]), err[0]
    assert "weights_only" not in err[0] and not (tmp_path / "PWNED").exists()
    if command == "resume":  # refused before training: no new start was recorded
        assert sorted(p.name for p in (run / "logs").iterdir()) == attempts


def test_a_cut_metrics_file_of_one_start_is_left_out_with_a_warning(ws, tmp_path, caplog):
    from quackae.runs.logs import merge_metrics

    run = tmp_path / "run"
    shutil.copytree(ws / "run", run)
    (run / "logs" / "attempt-1" / "metrics.csv").write_bytes(b"\0" * 100)  # a crash before the page was written
    assert merge_metrics(run) is None
    assert "metrics file" in caplog.text and "left out of" in caplog.text


# ---------------------------------------------------------------------------------------------- input corpora
def test_inputs_in_place_of_files_are_refused_without_blocking(tmp_path):
    from quackae.core.errors import QuackError
    from quackae.data.readers import Rows, format_of, read_jsonl, read_with_datasets

    for suffix in ("jsonl", "json", "csv", "txt", "parquet"):
        path = tmp_path / f"in.{suffix}"
        os.mkfifo(path)
        with pytest.raises(QuackError, match=f"input file .*in.{suffix} is a FIFO, not a file"):
            fmt = format_of(path, None)
            if fmt == "jsonl":
                read_jsonl(path, 0, Rows())
            else:
                read_with_datasets(path, fmt, 0, Rows(), str(tmp_path / "cache"))
    loop(tmp_path / "x.jsonl")
    with pytest.raises(QuackError, match="input file .*x.jsonl is a symbolic-link loop, not a file"):
        read_jsonl(tmp_path / "x.jsonl", 0, Rows())


def test_a_json_array_after_much_whitespace_is_read_as_an_array(tmp_path):
    from quackae.data.readers import format_of

    source = tmp_path / "a.json"
    rows = [{"id": i, "text": f"text number {i}"} for i in range(3)]
    source.write_text("\ufeff" + " \n" * 5000 + json.dumps(rows))
    assert format_of(source, None) == "json"
    summary = prepare(PrepareConfig(inputs=(str(source),), out=str(tmp_path / "o"), vocab_size=300))
    assert summary["rows_kept"] == 3
    (tmp_path / "b.json").write_text(" " * 9000)
    assert format_of(tmp_path / "b.json", None) == "jsonl"  # nothing but whitespace: no rows either way
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="cannot read .*deep.json as json: it is nested too deeply"):
        prepare(PrepareConfig(inputs=(str(tmp_path / "deep.json"),), out=str(tmp_path / "d"), vocab_size=300))


def test_csv_texts_are_what_the_file_says(tmp_path):
    from quackae.data.prepared import load_prepared

    source = tmp_path / "t.csv"
    source.write_text('id,text,label\n1,NA,NA\n2,null,x\n3,None,\n4,nan,y\n5,,z\n6,"",z\n7,N/A,z\n')
    summary = prepare(PrepareConfig(inputs=(str(source),), out=str(tmp_path / "o"), vocab_size=300))
    assert summary["rows_kept"] == 5 and summary["rejected"] == {"null text": 2}, summary
    dataset = load_prepared(tmp_path / "o")[0]
    assert dataset["label"] == ["NA", "x", None, "y", "z"]


# ---------------------------------------------------------------------------------------------- a full disk
def test_a_full_disk_names_the_file_being_written(tmp_path, monkeypatch):
    import quackae.core.atomic
    from quackae.cli.command import user_error
    from quackae.core.atomic import atomic_file, write_atomic

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(quackae.core.atomic.os, "fsync", full)
    target = tmp_path / "out.parquet"
    with pytest.raises(OSError) as error:
        with atomic_file(target, "wb") as handle:
            handle.write(b"payload")
    assert error.value.filename == str(target)
    assert user_error(error.value) == f"No space left on device: {target}"
    with pytest.raises(OSError) as error:
        write_atomic(tmp_path / "x.json", "{}")
    assert error.value.filename == str(tmp_path / "x.json")
    assert not list(tmp_path.iterdir())  # no temporary file is left
