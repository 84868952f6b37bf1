"""The encoding store: provenance, lock, quarantine, both layouts, readers, verify and export errors."""

from __future__ import annotations

import fcntl
import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from quackae import EncodingStore
from quackae.cli.command import main
from quackae.core.errors import QuackError
from quackae.data.tokenizer import special_ids
from quackae.model.autoencoder import QuackAutoEncoder
from quackae.stages.encode import EncodeConfig, encode
from quackae.stages.prepare import PrepareConfig, prepare
from quackae.store.items import read_item
from quackae.store.job import stored_ids
from quackae.store.manifest import LOCK, SHARD_FOLDER
from quackae.store.shards import shard_files
from quackae.store.writer import AutoencoderWriter

WORDS = "duck goose swan heron apple pear plum hammer saw drill".split()
ROWS = 90


def _corpus(path: Path, rows: int = ROWS) -> Path:
    rng = np.random.default_rng(1)
    with path.open("w") as handle:
        for i in range(rows):
            text = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 6))))
            label = None if i % 5 == 4 else ["a", "b", "c"][i % 3]
            handle.write(json.dumps({"id": 3 * i + 1, "text": text, "label": label, "score": i / 2}) + "\n")
    return path


def _run(root: Path, prepared: Path, seed: int) -> Path:
    """An untrained (seeded) tiny model saved as a RUN directory, as train writes one."""
    from tokenizers import Tokenizer

    from quackae.model.checkpoints import write_run

    tokenizer = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    torch.manual_seed(seed)
    model = QuackAutoEncoder(
        tokenizer.get_vocab_size(), embed_size=8, hidden_size=16, pooling="final", pad_id=special_ids(tokenizer).pad
    )
    return write_run(model, tokenizer, root / f"run{seed}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store")
    prepare(PrepareConfig(inputs=(str(_corpus(root / "c.jsonl")),), out=str(root / "prepared"), vocab_size=300))
    _run(root, root / "prepared", 1)
    _run(root, root / "prepared", 2)
    return root


def _encode(tiny: Path, out: Path, seed: int = 1, **flags) -> dict:
    config = {"batch_size": 8, "shard_size": 16, "accelerator": "cpu", "devices": "1", **flags}
    return encode(EncodeConfig(data=str(tiny / "prepared"), model=str(tiny / f"run{seed}"), out=str(out), **config))


def _one_line(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("layout", ["shards", "files"])
def test_encode_stores_every_id_once_with_typed_columns_and_text(tiny, tmp_path, layout):
    out = tmp_path / "s"
    summary = _encode(tiny, out, layout=layout)
    corpus = [json.loads(line) for line in (tiny / "c.jsonl").read_text().splitlines()]
    assert summary["items_written"] == ROWS and stored_ids(out) == sorted(r["id"] for r in corpus)
    store = EncodingStore(out)
    ids, matrix = store.to_numpy()
    assert ids.tolist() == sorted(r["id"] for r in corpus) and matrix.shape == (ROWS, 16)
    by_id = {r["id"]: r for r in corpus}
    for index in ids[::7].tolist():
        encoding, metadata = store[index]
        assert metadata["text"] == by_id[index]["text"] and metadata["label"] == by_id[index]["label"]
        assert np.array_equal(encoding, matrix[ids.tolist().index(index)])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["items"] == ROWS and manifest["layout"] == layout
    if layout == "shards":
        table = pa.ipc.open_file(pa.memory_map(str(shard_files(out)[0]))).read_all()
        assert table.schema.field("id").type == pa.int64()
        assert table.schema.field("encoding").type == pa.list_(pa.float32(), 16)
        assert table.schema.field("score").type == pa.float64() and table.schema.field("label").type == pa.string()
        provenance = json.loads(table.schema.metadata[b"quackae"])
        assert provenance["checkpoint_sha256"] == manifest["checkpoint_sha256"]
        assert len(shard_files(out)) == -(-ROWS // 16)
    assert not (out / ".staging").exists()
    assert _encode(tiny, out, layout=layout)["items_written"] == 0  # a rerun has nothing left to do
    assert not (out / ".staging").exists()  # not even the header's staging folder stays behind


def test_pandas_reads_the_shards_alike(tiny, tmp_path):
    import pandas as pd

    _encode(tiny, tmp_path / "s")
    frame = pd.concat([pd.read_feather(p) for p in shard_files(tmp_path / "s")]).sort_values("id")
    ids, matrix = EncodingStore(tmp_path / "s").to_numpy()
    assert frame["id"].tolist() == ids.tolist()
    assert np.array_equal(np.stack(frame["encoding"].to_numpy()).astype(np.float32), matrix)


def test_no_text_drops_the_column(tiny, tmp_path):
    _encode(tiny, tmp_path / "s", text=False)
    assert "text" not in EncodingStore(tmp_path / "s").to_arrow().column_names


def test_another_model_is_refused_even_after_a_kill_and_overwrite_replaces(tiny, tmp_path, capsys):
    out = tmp_path / "s"
    _encode(tiny, out, seed=1)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("items")
    manifest["complete"] = False  # as a killed encode leaves it: the header is written before any item
    (out / "manifest.json").write_text(json.dumps(manifest))
    flags = ["--accelerator", "cpu", "--devices", "1", "--batch-size", "8", "--shard-size", "16"]
    args = ["encode", str(tiny / "prepared"), "--model", str(tiny / "run2"), "--out", str(out), *flags]
    assert main(args) == 2
    err = _one_line(capsys)
    assert len(err) == 1 and re.search("made with another model .*--overwrite", err[0]), err
    assert main([*args, "--overwrite"]) == 0
    capsys.readouterr()
    store = EncodingStore(out)
    assert len(store) == ROWS and json.loads((out / "manifest.json").read_text())["tokenizer"]
    fresh = tmp_path / "b"
    _encode(tiny, fresh, seed=2)
    assert np.array_equal(store.to_numpy()[1], EncodingStore(fresh).to_numpy()[1])


def test_items_without_a_manifest_are_refused(tiny, tmp_path):
    _encode(tiny, tmp_path / "s")
    (tmp_path / "s" / "manifest.json").unlink()
    with pytest.raises(QuackError, match="no manifest.json"):
        _encode(tiny, tmp_path / "s")


def test_a_live_encode_holds_the_store(tiny, tmp_path, capsys):
    out = tmp_path / "s"
    out.mkdir()
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"job123\n")
    try:
        assert main(["encode", str(tiny / "prepared"), "--model", str(tiny / "run1"), "--out", str(out)]) == 2
        err = _one_line(capsys)
        assert len(err) == 1 and "is being written by quackae encode job job123;" in err[0], err
    finally:
        os.close(fd)
    assert _encode(tiny, out)["items_in_store"] == ROWS


def test_staging_of_dead_jobs_is_removed_and_symlinks_refused(tiny, tmp_path, capsys):
    out = tmp_path / "s"
    stray = out / ".staging" / "deadjob-0" / "x.arrow.part"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"half")
    _encode(tiny, out)
    assert not (out / ".staging").exists()
    other = tmp_path / "t"
    other.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (other / ".staging").symlink_to(tmp_path / "elsewhere")
    assert main(["encode", str(tiny / "prepared"), "--model", str(tiny / "run1"), "--out", str(other)]) == 2
    err = _one_line(capsys)
    assert len(err) == 1 and "symbolic link" in err[0], err


@pytest.mark.parametrize("layout", ["shards", "files"])
def test_a_corrupt_unit_is_quarantined_and_redone(tiny, tmp_path, caplog, layout):
    out = tmp_path / "s"
    _encode(tiny, out, layout=layout)
    before = EncodingStore(out).to_numpy()
    victim = shard_files(out)[1] if layout == "shards" else EncodingStore(out).item_path(4)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(QuackError, match=re.escape(str(victim))):
        EncodingStore(out).to_numpy() if layout == "files" else EncodingStore(out)
    assert main(["verify", str(out)]) == 1
    summary = _encode(tiny, out, layout=layout)
    assert summary["items_written"] == (16 if layout == "shards" else 1)
    assert any("quarantine" in r.getMessage() for r in caplog.records)
    assert len(list((out / ".quarantine").iterdir())) == 1
    after = EncodingStore(out).to_numpy()
    assert np.array_equal(after[0], before[0]) and np.allclose(after[1], before[1], atol=1e-6)
    assert main(["verify", str(out), "--data", str(tiny / "prepared")]) == 0


def test_stray_names_never_count_twice(tmp_path):
    writer = AutoencoderWriter(storage_path=tmp_path, layout="files")
    writer.write_batch([{"id": 1}], np.ones((1, 3), dtype=np.float32))
    writer.flush()
    (tmp_path / "0" / "0" / "01.npz").write_bytes((tmp_path / "0/0/1.npz").read_bytes())
    (tmp_path / "0" / "5").mkdir()
    (tmp_path / "0" / "5" / "1.npz").write_bytes((tmp_path / "0/0/1.npz").read_bytes())
    assert EncodingStore(tmp_path).ids() == [1]
    assert EncodingStore(tmp_path).to_arrow().column("id").to_pylist() == [1]


def test_verify_lists_every_problem(tiny, tmp_path, capsys):
    out = tmp_path / "s"
    _encode(tiny, out)
    assert main(["verify", str(out), "--data", str(tiny / "prepared")]) == 0
    assert f"{ROWS} items" in capsys.readouterr().out
    shards = shard_files(out)
    table = pa.ipc.open_file(pa.memory_map(str(shards[0]))).read_all()
    with pa.OSFile(str(out / SHARD_FOLDER / "copy.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table.slice(0, 2))  # ids twice
    shards[-1].unlink()  # ids missing
    (out / ".staging" / "job-0").mkdir(parents=True)
    (out / ".staging" / "job-0" / "left.part").write_bytes(b"x")
    assert main(["verify", str(out), "--data", str(tiny / "prepared")]) == 1
    printed = capsys.readouterr().out
    assert "stored 2 times" in printed and "missing" in printed and "staging" in printed


def test_readers_on_a_store_with_unlabelled_first_row(tiny, tmp_path):
    out = tmp_path / "s"
    _encode(tiny, out)
    store = EncodingStore(out)
    dataset = store.to_dataset()
    assert dataset.num_rows == ROWS and dataset.features["label"].dtype == "string"
    view = store.torch_dataset(label_field="label")
    labelled = [i for i in range(ROWS) if i % 5 != 4]
    assert len(view) == len(labelled) and view.classes == ["a", "b", "c"]
    tensor, label = view[0]
    assert tensor.shape == (16,) and label in (0, 1, 2)
    for k in range(5):
        assert view.classes[view[k][1]] == store[view.ids[k]][1]["label"]


def test_a_store_without_manifest_is_read_with_a_warning(tiny, tmp_path, caplog):
    _encode(tiny, tmp_path / "s")
    (tmp_path / "s" / "manifest.json").unlink()
    assert len(EncodingStore(tmp_path / "s")) == ROWS
    assert any(f"reading the {ROWS} items" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        ("dir", ["--out", "{tmp}/d.parquet"], "is a directory; name a .parquet file"),
        ("empty", ["--out", "{tmp}/e.parquet"], "holds no items; nothing to export"),
        ("list", ["--out", "{tmp}/e.parquet"], "store manifest .*manifest.json holds a JSON array, not a JSON object"),
    ],
)
def test_export_mistakes_are_one_line(tiny, tmp_path, capsys, setup, args, message):
    out = tmp_path / "s"
    if setup == "empty":
        out.mkdir()
        (out / SHARD_FOLDER).mkdir()
    else:
        _encode(tiny, out)
    if setup == "dir":
        (tmp_path / "d.parquet").mkdir()
    if setup == "list":
        (out / "manifest.json").write_text("[1, 2]")
    code = main(["export", str(out), *[a.format(tmp=tmp_path) for a in args]])
    err = _one_line(capsys)
    assert code == 2 and len(err) == 1 and re.search(message, err[0]), err
    assert not list(tmp_path.glob(".*.tmp"))


def test_export_round_trips_both_layouts(tiny, tmp_path):
    import pyarrow.parquet as pq

    for layout in ("shards", "files"):
        _encode(tiny, tmp_path / layout, layout=layout)
        assert main(["export", str(tmp_path / layout), "--out", str(tmp_path / f"{layout}.parquet")]) == 0
    a, b = (pq.read_table(tmp_path / f"{layout}.parquet") for layout in ("shards", "files"))
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    assert np.allclose(  # the layouts batch items differently (shards: pools of --shard-size); same values
        np.stack(a.column("encoding").to_numpy(zero_copy_only=False)),
        np.stack(b.column("encoding").to_numpy(zero_copy_only=False)),
        atol=1e-5,
    )
    assert a.column("text").to_pylist() == b.column("text").to_pylist()


def test_files_layout_reads_items_with_numpy(tiny, tmp_path):
    _encode(tiny, tmp_path / "s", layout="files", png="encoding", png_limit=5)
    store = EncodingStore(tmp_path / "s")
    encoding, metadata = read_item(store.item_path(1))
    assert encoding.shape == (16,) and metadata["id"] == 1
    assert len(list((tmp_path / "s").rglob("*.png"))) == 5


@pytest.mark.slow
def test_ddp_shards_match_single_process_and_verify(tiny, tmp_path):
    import subprocess
    import sys

    single = tmp_path / "single"
    _encode(tiny, single)
    ddp = tmp_path / "ddp"
    command = [sys.executable, "-m", "quackae", "encode", str(tiny / "prepared"), "--model", str(tiny / "run1")]
    flags = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--batch-size", "8", "--shard-size", "16"]
    result = subprocess.run([*command, "--out", str(ddp), *flags], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert main(["verify", str(ddp), "--data", str(tiny / "prepared")]) == 0
    names = [p.name for p in shard_files(ddp)]
    assert {n.split("-")[1] for n in names} == {"00000", "00001"}  # each rank wrote its own shards
    a, b = EncodingStore(single), EncodingStore(ddp)
    assert a.ids() == b.ids()
    np.testing.assert_allclose(a.to_numpy()[1], b.to_numpy()[1], atol=1e-5)
    assert a.to_arrow().drop_columns(["encoding"]).equals(b.to_arrow().drop_columns(["encoding"]))


def test_another_layout_is_refused(tiny, tmp_path):
    _encode(tiny, tmp_path / "s", layout="files")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    del manifest["layout"]  # as a store of the first format has it
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(QuackError, match="holds a files store, not shards; pass --layout files"):
        _encode(tiny, tmp_path / "s")


def pa_feather_rows(path: Path) -> int:
    """Rows of one shard, read with pyarrow alone; its ids must be in increasing order."""
    with pa.memory_map(str(path)) as source:
        ids = pa.ipc.open_file(source).read_all().column("id").to_numpy()
    assert (np.diff(ids) > 0).all(), f"{path} is not sorted by id"
    return len(ids)


def _metadata_as(form: str, ids: np.ndarray) -> object:
    """The same batch metadata as a list of dicts, a dict of columns or an Arrow table (what the data module gives)."""
    if form == "dicts":
        return [{"id": int(i), "n": int(i) * 2} for i in ids]
    columns = {"id": ids.astype(np.int64), "n": ids.astype(np.int64) * 2}
    return columns if form == "columns" else pa.table(columns)


@pytest.mark.parametrize("form", ["dicts", "columns", "arrow"])
@pytest.mark.parametrize("seed", range(4))
def test_to_numpy_and_lookup_match_a_plain_reference(tmp_path, seed, form):
    rng = np.random.default_rng(seed)
    ids = rng.permutation(500)[:300]  # out of order, as length-sorted batches come
    matrix = rng.standard_normal((300, 8)).astype(np.float32)
    shard_size = int(rng.integers(7, 80))
    writer = AutoencoderWriter(storage_path=tmp_path, shard_size=shard_size)
    for start in range(0, 300, 32):
        writer.write_batch(_metadata_as(form, ids[start : start + 32]), matrix[start : start + 32])
    writer.flush()
    sizes = [pa_feather_rows(path) for path in sorted((tmp_path / "shards").iterdir())]
    assert sum(sizes) == 300 and sorted(sizes)[1:] == [shard_size] * (len(sizes) - 1)  # full shards, one partial
    store = EncodingStore(tmp_path)
    reference = {int(i): row for i, row in zip(ids, matrix, strict=True)}
    got_ids, got = store.to_numpy()
    assert got_ids.tolist() == sorted(reference)
    assert np.array_equal(got, np.stack([reference[i] for i in sorted(reference)]))
    for index in rng.choice(ids, 20).tolist():
        encoding, metadata = store[index]
        assert np.array_equal(encoding, reference[index]) and metadata == {"id": index, "n": index * 2}
    assert 1000 not in store and len(store) == 300


def test_out_naming_a_file_is_one_line(tiny, tmp_path, capsys):
    (tmp_path / "f").write_text("not a store")
    assert main(["encode", str(tiny / "prepared"), "--model", str(tiny / "run1"), "--out", str(tmp_path / "f")]) == 2
    err = _one_line(capsys)
    assert len(err) == 1 and "is an existing file, not a store folder" in err[0], err
    assert main(["verify", str(tmp_path / "f")]) == 2


def test_a_fresh_encode_writes_each_shard_as_one_run_of_consecutive_rows(tiny, tmp_path):
    out = tmp_path / "s"
    _encode(tiny, out)  # batch 8, shard 16: predict pools of 16 items, length-sorted inside
    dataset_ids = [json.loads(line)["id"] for line in (tiny / "c.jsonl").read_text().splitlines()]
    runs = []
    for path in sorted((out / "shards").iterdir()):
        with pa.memory_map(str(path)) as source:
            ids = pa.ipc.open_file(source).read_all().column("id").to_pylist()
        assert ids == sorted(ids)  # stored in id order
        start = dataset_ids.index(ids[0])
        assert ids == sorted(dataset_ids[start : start + len(ids)]), path  # one run of consecutive rows
        runs.append(len(ids))
    assert sum(runs) == ROWS and runs.count(16) == ROWS // 16


def test_the_encode_progress_bar_redraws_at_most_every_interval_and_at_the_end(monkeypatch):
    import quackae.model.trainer as trainer

    clock = iter([0.0, 0.1, 0.2, 0.6, 0.7, 5.0])
    monkeypatch.setattr("time.monotonic", lambda: next(clock))
    bar = trainer.progress_bar(0.5)
    monkeypatch.setattr(type(bar), "is_enabled", property(lambda self: True))
    drawn = [bar._should_update(n, 100) for n in (1, 2, 3, 4, 5)] + [bar._should_update(100, 100)]
    assert drawn == [True, False, False, True, False, True]


@pytest.mark.parametrize("spare", [True, False])
def test_encode_with_and_without_helper_threads_stores_the_same(tiny, tmp_path, monkeypatch, spare):
    """With cores to spare a thread prefetches batches and a writer thread stores them; without, both happen on
    the prediction thread between batches. The stores must be the same, item for item."""
    import threading

    import quackae.core.cores
    from quackae.store.writer import AutoencoderWriter

    reference = tmp_path / "reference"
    _encode(tiny, reference, layout="shards")
    monkeypatch.setattr(quackae.core.cores, "cores_to_spare", lambda trainer: spare)
    threads = set()
    original = AutoencoderWriter._write_batch

    def spy(self, *args):
        threads.add(threading.current_thread().name)
        return original(self, *args)

    monkeypatch.setattr(AutoencoderWriter, "_write_batch", spy)
    out = tmp_path / "s"
    _encode(tiny, out, layout="shards")
    assert threads == ({"quackae-writer_0"} if spare else {threading.main_thread().name})
    ids, matrix = EncodingStore(out).to_numpy()
    expected_ids, expected = EncodingStore(reference).to_numpy()
    assert np.array_equal(ids, expected_ids) and np.allclose(matrix, expected, atol=1e-6)
    texts = pa.concat_tables([pa.ipc.open_file(pa.memory_map(str(p))).read_all() for p in shard_files(out)])
    reference_texts = pa.concat_tables(
        [pa.ipc.open_file(pa.memory_map(str(p))).read_all() for p in shard_files(reference)]
    )
    assert texts.sort_by("id").column("text").equals(reference_texts.sort_by("id").column("text"))


def test_cores_to_spare(monkeypatch):
    import os

    import pytorch_lightning as pl
    import torch

    from quackae.core.cores import cores_to_spare

    assert cores_to_spare(None)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert not cores_to_spare(trainer)  # every core computes
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert cores_to_spare(trainer)


def test_quackae_encode_predicts_with_the_heap_settled_and_gives_it_back(tiny, tmp_path, monkeypatch):
    """The command (not the library call) keeps the objects alive before the prediction loop out of the collector's
    full passes during it (a pass over a loaded process's 300,000+ objects costs a tenth of a small encode), and
    puts them back afterwards."""
    import gc

    from quackae.cli import main
    from quackae.store.writer import AutoencoderWriter

    frozen = []
    original = AutoencoderWriter.on_predict_batch_start

    def spy(self, *args, **kwargs):
        frozen.append(gc.get_freeze_count())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderWriter, "on_predict_batch_start", spy)
    before = gc.get_freeze_count()
    flags = ["--batch-size", "8", "--shard-size", "16", "--accelerator", "cpu", "--devices", "1"]
    assert (
        main(["encode", str(tiny / "prepared"), "--model", str(tiny / "run1"), "--out", str(tmp_path / "s"), *flags])
        == 0
    )
    assert frozen and min(frozen) > max(before, 1000)  # the loaded modules' objects, at every batch
    assert gc.get_freeze_count() == before
    frozen.clear()
    _encode(tiny, tmp_path / "library", layout="shards")  # the library call leaves the caller's collector alone
    assert frozen and max(frozen) == before


def test_checkpoint_hash_on_a_thread_is_the_files_sha256_and_raises_its_error(tmp_path):
    import hashlib

    from quackae.stages.encode import _sha256_meanwhile

    data = np.random.default_rng(0).bytes(3 << 20)  # three read blocks and a bit
    path = tmp_path / "last.ckpt"
    path.write_bytes(data + b"tail")
    with _sha256_meanwhile(path) as digest:
        assert digest() == hashlib.sha256(data + b"tail").hexdigest()
    with pytest.raises(FileNotFoundError) as error, _sha256_meanwhile(tmp_path / "missing.ckpt") as digest:
        digest()
    assert error.value.filename == str(tmp_path / "missing.ckpt")  # the one-line error names the file


def test_a_failed_start_stops_the_checkpoint_hash_thread(tmp_path, monkeypatch):
    """encode() failing while it loads (a wrong tokenizer, a bad dataset) must not leave a thread reading
    the whole checkpoint behind it: leaving the block stops the reading and joins the thread."""
    import threading
    import time

    import quackae.stages.encode as encode_module

    blocks = []

    class Slow:
        def update(self, block):
            blocks.append(len(block))
            time.sleep(0.01)

        def hexdigest(self):
            return "x"

    monkeypatch.setattr(encode_module.hashlib, "sha256", Slow)
    path = tmp_path / "big.ckpt"
    with path.open("wb") as handle:
        handle.truncate(64 << 20)  # 64 read blocks: 0.64 s at the slowed rate
    with pytest.raises(QuackError), encode_module._sha256_meanwhile(path):
        raise QuackError("the data was tokenized with another tokenizer")
    assert not [t for t in threading.enumerate() if t.name.startswith("quackae-hash")]
    assert len(blocks) < 64  # stopped, not read to the end


def test_encode_failing_while_it_loads_leaves_no_hash_thread(tiny, tmp_path, monkeypatch):
    import threading

    import quackae.stages.encode as encode_module

    def refuse(*args):
        raise QuackError("the data was tokenized with another tokenizer")

    monkeypatch.setattr(encode_module, "_open_inputs", refuse)
    for _ in range(3):
        with pytest.raises(QuackError, match="another tokenizer"):
            _encode(tiny, tmp_path / "s")
    assert not [t for t in threading.enumerate() if t.name.startswith("quackae-hash")]


def test_encode_refuses_spawn_strategies_in_one_line(tiny, tmp_path):
    # ddp_spawn pickles the trainer with its callbacks: the writer's locks made it a pickling traceback
    with pytest.raises(QuackError, match="use --strategy ddp"):
        _encode(tiny, tmp_path / "s", strategy="ddp_spawn", devices="2")
    assert not (tmp_path / "s").exists()
