"""End to end on a tiny corpus: prepare -> train -> reconstruct -> encode -> export -> classify."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import RECONSTRUCTION

from quackae.cli.command import main
from quackae.core.errors import QuackError
from quackae.model.checkpoints import load_model
from quackae.stages.classify import ClassifyConfig, classify
from quackae.stages.encode import EncodeConfig, encode
from quackae.stages.pipeline import RunConfig, run_pipeline
from quackae.stages.prepare import PrepareConfig, prepare
from quackae.stages.train import TrainConfig, train
from quackae.store.job import stored_ids
from quackae.store.reader import EncodingStore

TOPICS = {
    "birds": "duck goose swan heron crane stork gull owl hawk eagle".split(),
    "fruit": "apple pear plum cherry grape lemon lime mango peach melon".split(),
    "tools": "hammer saw drill chisel wrench plane file rasp clamp level".split(),
}
ROWS = 360


def write_corpus(path: Path, rows: int = ROWS, unlabelled: int = 0) -> Path:
    rng = np.random.default_rng(0)
    names = sorted(TOPICS)
    with path.open("w") as handle:
        for i in range(rows + unlabelled):
            topic = names[i % 3]
            words = rng.choice(TOPICS[topic], size=int(rng.integers(2, 7)))
            label = topic if i < rows else None
            handle.write(json.dumps({"id": 10 * i + 3, "text": " ".join(words), "label": label}) + "\n")
    return path


def tiny_train(data: Path, out: Path, **flags) -> dict:
    """A tiny model trained on CPU for a few steps."""
    config = {
        "max_epochs": -1,
        "embed_size": 16,
        "hidden_size": 32,
        "pooling": "final",  # stores H = 32 values per item, as the store tests below expect
        "batch_size": 32,
        "learning_rate": 1e-2,
        "accelerator": "cpu",
        "devices": "1",
        **RECONSTRUCTION,  # these tests reconstruct and draw attention: a trained decoder
        **flags,
    }
    return train(TrainConfig(data=str(data), out=str(out), **config))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    corpus = write_corpus(root / "corpus.jsonl", unlabelled=24)
    prepare(PrepareConfig(inputs=(str(corpus),), out=str(root / "prepared"), vocab_size=300, min_frequency=1))
    tiny_train(root / "prepared", root / "run", max_steps=60)
    return root


def test_train_writes_its_run(workspace):
    run = workspace / "run"
    for name in (
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
        "metrics.csv",
        "config.yaml",
        "tokenizer.json",
        "summary.json",
    ):
        assert (run / name).is_file(), name
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "val_loss" in header and "train_loss_step" in header
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 60 and 0 <= summary["token_accuracy"] <= 1
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 60


def test_resume_continues_the_step_count(workspace, tmp_path):
    tiny_train(
        workspace / "prepared", tmp_path / "more", max_steps=75, resume=str(workspace / "run/checkpoints/last.ckpt")
    )
    assert torch.load(tmp_path / "more/checkpoints/last.ckpt", weights_only=True)["global_step"] == 75
    assert (tmp_path / "more/checkpoints/best.ckpt").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "{root}/nothing", "--out", "{tmp}/r"], "prepared data directory .*nothing does not exist"),
        (
            ["train", "{root}/prepared", "--out", "{tmp}/r", "--hidden-size", "-3"],
            "--hidden-size must be a positive even number",
        ),
        (["train", "{root}/prepared", "--out", "{root}/run"], "already holds checkpoints"),
        (
            ["encode", "{root}/prepared", "--model", "{tmp}/missing", "--out", "{tmp}/s"],
            "model .*missing does not exist",
        ),
        (["classify", "{tmp}/nostore", "--out", "{tmp}/c"], "encoding store .*nostore does not exist"),
        (["reconstruct", "hello", "--model", "{tmp}/missing"], "model .*missing does not exist"),
    ],
)
def test_user_mistakes_are_one_line_errors(workspace, tmp_path, capsys, args, message):
    code = main([a.format(root=workspace, tmp=tmp_path) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    import re

    assert re.search(message, err[0]), err[0]


def test_reconstruct_prints_text_and_reconstruction(workspace, capsys):
    assert main(["reconstruct", "duck goose swan", "apple pear", "--model", str(workspace / "run")]) == 0
    out = capsys.readouterr().out
    assert out.count("text:") == 2 and out.count("reconstructed:") == 2


@pytest.fixture(scope="module")
def store(workspace) -> Path:
    encode(
        EncodeConfig(
            data=str(workspace / "prepared"),
            model=str(workspace / "run"),
            out=str(workspace / "store"),
            batch_size=32,
            accelerator="cpu",
            devices="1",
        )
    )
    return workspace / "store"


def test_encode_writes_exactly_one_item_per_row(workspace, store):
    import datasets

    data = datasets.load_from_disk(str(workspace / "prepared/dataset"))
    assert stored_ids(store) == sorted(data["id"])
    files = sorted(p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file())
    assert files[:2] == [".lock", "manifest.json"] and len(files) > 2  # the lock, the manifest and shards only
    assert all(f.startswith("shards/") and f.endswith(".arrow") for f in files[2:]), files
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["items"] == data.num_rows and manifest["encoding_size"] == 32
    assert manifest["complete"] is True and manifest["layout"] == "shards"
    assert len(manifest["checkpoint_sha256"]) == 64 and len(manifest["tokenizer_sha256"]) == 64
    texts = {r["id"]: r["text"] for r in map(json.loads, (workspace / "corpus.jsonl").read_text().splitlines())}
    model = load_model(str(workspace / "run/checkpoints/best.ckpt"))
    reader = EncodingStore(store)
    for row in data.select(range(0, data.num_rows, 37)):
        encoding, metadata = reader[row["id"]]
        want = {"id": row["id"], "label": row["label"], "text": texts[row["id"]], "truncated": row["truncated"]}
        assert metadata == want
        with torch.no_grad():
            expected = model(torch.tensor([row["input_ids"]]))[0][0].numpy()
        np.testing.assert_allclose(encoding, expected, atol=1e-5)


def test_encode_rerun_skips_everything(workspace, store):
    summary = encode(
        EncodeConfig(
            data=str(workspace / "prepared"),
            model=str(workspace / "run"),
            out=str(store),
            accelerator="cpu",
            devices="1",
        )
    )
    assert summary["items_written"] == 0 and summary["items_in_store"] == len(stored_ids(store))


def test_encode_refuses_mismatched_tokenizer(workspace, tmp_path):
    other = write_corpus(tmp_path / "other.jsonl", rows=60)
    prepare(PrepareConfig(inputs=(str(other),), out=str(tmp_path / "p"), vocab_size=280, min_frequency=1))
    with pytest.raises(QuackError, match="another tokenizer"):
        encode(
            EncodeConfig(
                data=str(tmp_path / "p"),
                model=str(workspace / "run"),
                out=str(tmp_path / "s"),
                accelerator="cpu",
                devices="1",
            )
        )


def test_encode_filtered_and_evaluate(workspace, tmp_path):
    common = {
        "data": str(workspace / "prepared"),
        "model": str(workspace / "run"),
        "accelerator": "cpu",
        "devices": "1",
        "label_field": "label",
    }
    encode(EncodeConfig(out=str(tmp_path / "labelled"), filtered=True, **common))
    encode(EncodeConfig(out=str(tmp_path / "unlabelled"), evaluate=True, **common))
    labelled = EncodingStore(tmp_path / "labelled")
    unlabelled = EncodingStore(tmp_path / "unlabelled")
    assert len(labelled) == ROWS and len(unlabelled) == 24
    assert all(m["label"] is None for _, _, m in unlabelled)


def test_encode_png(workspace, tmp_path):
    from PIL import Image

    encode(
        EncodeConfig(
            data=str(workspace / "prepared"),
            model=str(workspace / "run"),
            out=str(tmp_path / "s"),
            accelerator="cpu",
            devices="1",
            png="attention",
        )
    )
    pngs = sorted((tmp_path / "s").rglob("*.png"))
    assert len(pngs) == len(stored_ids(tmp_path / "s"))
    image = Image.open(pngs[0])
    assert image.size[0] > 0 and image.mode == "RGB"


def test_encode_draws_the_chosen_ids_readably_and_names_an_unknown_one(workspace, tmp_path, capsys):
    from PIL import Image

    from quackae.viz.render import ATTENTION_CELL

    chosen = (13, 2003)  # ids are 10 * row + 3: the second and the 201st item
    flags = ["--model", str(workspace / "run"), "--accelerator", "cpu", "--devices", "1", "--png", "attention"]
    out = str(tmp_path / "s")
    assert main(["encode", str(workspace / "prepared"), "--out", out, *flags, "--png-ids", *map(str, chosen)]) == 0
    pngs = sorted((tmp_path / "s").rglob("*.png"))
    assert sorted(int(p.stem) for p in pngs) == sorted(chosen)
    for png in pngs:
        with Image.open(png) as image:
            rows, columns = map(int, image.text["cells"].split("x"))
            assert int(image.text["cell"]) >= ATTENTION_CELL
            assert image.width >= columns * ATTENTION_CELL + 60 and image.height >= rows * ATTENTION_CELL + 60
    capsys.readouterr()
    again = ["encode", str(workspace / "prepared"), "--out", str(tmp_path / "t"), *flags, "--png-ids", "13", "14"]
    assert main(again) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--png-ids 14: no item with this id" in error[0], error


def test_export_and_classify(workspace, store, tmp_path):
    assert main(["export", str(store), "--out", str(tmp_path / "e.parquet")]) == 0
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.num_rows == len(stored_ids(store)) and {"id", "encoding", "label"} <= set(table.column_names)
    summary = classify(
        ClassifyConfig(
            store=str(tmp_path / "e.parquet"),
            out=str(tmp_path / "clf"),
            accelerator="cpu",
            devices="1",
            max_epochs=30,
            seed=0,
        )
    )
    report = json.loads((tmp_path / "clf/report.json").read_text())
    assert report["classes"] == ["birds", "fruit", "tools"]
    assert report["items"]["unlabelled"] == 24
    assert summary["accuracy"] == report["accuracy"] and 0 <= report["macro_f1"] <= 1
    assert (tmp_path / "clf/confusion.png").is_file()
    predictions = pq.read_table(tmp_path / "clf/predictions.parquet")
    assert predictions.num_rows == table.num_rows
    assert set(predictions.column("split").to_pylist()) == {"train", "val", "test", "unlabelled"}
    assert main(["classify", str(store), "--predict", str(tmp_path / "clf"), "--out", str(tmp_path / "p")]) == 0
    assert pq.read_table(tmp_path / "p/predictions.parquet").num_rows == table.num_rows


def test_pipeline_file_runs_stages_and_rejects_typos(workspace, tmp_path):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(
        f"root: {tmp_path / 'out'}\nstages:\n"
        f"  - stage: prepare\n    inputs: [{workspace / 'corpus.jsonl'}]\n    out: prepared\n"
        "    vocab_size: 300\n  - stage: export\n    store: " + str(workspace / "store") + "\n    out: all.parquet\n"
    )
    results = run_pipeline(RunConfig(pipeline=str(pipeline)))
    assert [r["stage"] for r in results] == ["prepare", "export"]
    assert (tmp_path / "out/prepared/dataset").is_dir() and (tmp_path / "out/all.parquet").is_file()
    pipeline.write_text("stages:\n  - stage: prepare\n    inputs: [x.jsonl]\n    vocab_sise: 5\n")
    with pytest.raises(QuackError, match="unknown keys vocab_sise"):
        run_pipeline(RunConfig(pipeline=str(pipeline)))


def _encode_command(workspace: Path, store: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "quackae",
        "encode",
        str(workspace / "prepared"),
        "--model",
        str(workspace / "run"),
        "--out",
        str(store),
        "--accelerator",
        "cpu",
        *extra,
    ]


@pytest.mark.slow
def test_killed_encode_resumes_to_exactly_one_item_per_row(workspace, tmp_path):
    import datasets

    big = write_corpus(tmp_path / "big.jsonl", rows=6000)
    prepare(
        PrepareConfig(
            inputs=(str(big),), out=str(tmp_path / "prepared"), tokenizer=str(workspace / "run/tokenizer.json")
        )
    )
    ws = tmp_path
    (ws / "run").symlink_to(workspace / "run")
    store = tmp_path / "store"
    process = subprocess.Popen(
        _encode_command(ws, store, "--batch-size", "32", "--shard-size", "64"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(stored_ids(store)) < 64:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    partial = len(stored_ids(store))
    assert 0 < partial < 6000, f"the kill came at {partial} items"
    done = subprocess.run(_encode_command(ws, store, "--batch-size", "32"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    data = datasets.load_from_disk(str(tmp_path / "prepared/dataset"))
    assert stored_ids(store) == sorted(data["id"])
    strays = [p for p in store.rglob("*") if p.is_file() and p.suffix not in (".arrow", ".json") and p.name != ".lock"]
    assert strays == [] and not (store / ".staging").exists()
    for index in stored_ids(store)[::500]:
        encoding, metadata = EncodingStore(store)[index]
        assert encoding.shape == (32,) and metadata["id"] == index


@pytest.mark.slow
def test_ddp_encode_writes_each_item_once_and_matches_single_process(workspace, store, tmp_path):
    ddp = tmp_path / "ddp"
    result = subprocess.run(
        _encode_command(workspace, ddp, "--devices", "2", "--strategy", "ddp", "--batch-size", "16"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert stored_ids(ddp) == stored_ids(store)
    single, double = EncodingStore(store), EncodingStore(ddp)
    for index in single.ids():
        np.testing.assert_allclose(double[index][0], single[index][0], atol=1e-4)
        assert double[index][1] == single[index][1]
    assert json.loads((ddp / "manifest.json").read_text())["items"] == len(single)
