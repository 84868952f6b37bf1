"""The prepared folder and the encode data path: original texts, the fingerprint, the marker, bounded
tokenizing, damaged files as one line, non-finite encodings, Ctrl-C, and the overlapped (GPU-style) path."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from quackae import EncodingStore
from quackae.cli.command import main
from quackae.core.errors import QuackError
from quackae.data.prepared import COMPLETE, dataset_fingerprint, load_prepared, verify_fingerprint
from quackae.data.tokenizer import load_tokenizer, special_ids, tokenize_batch, train_tokenizer
from quackae.model.autoencoder import QuackAutoEncoder
from quackae.stages.encode import EncodeConfig, encode
from quackae.stages.prepare import PrepareConfig, prepare
from quackae.store.shards import shard_files

WORDS = "duck goose swan heron apple pear plum hammer saw drill".split()
ROWS = 40
MAX_LENGTH = 6


def _texts(rows: int = ROWS, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 9)))) for _ in range(rows)]
    texts[1] = "café [EOS] [PAD] naïve ✓ duck"  # special-token spellings and non-ASCII stay as they were
    texts[2] = "  leading and trailing space  "
    return texts


def _write(path: Path, texts: list[str], field: str = "text", **extra: list) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for i, text in enumerate(texts):
            row = {"id": 10 * i, field: text, "label": ["a", "b"][i % 2]}
            row.update({k: v[i] for k, v in extra.items()})
            handle.write(json.dumps(row) + "\n")
    return path


def _prepare(source: Path, out: Path, **flags) -> Path:
    config = {"vocab_size": 300, "min_frequency": 1, "max_length": MAX_LENGTH, **flags}
    prepare(PrepareConfig(inputs=(str(source),), out=str(out), **config))
    return out


def _run(root: Path, prepared: Path, nan: bool = False) -> Path:
    """An untrained tiny model saved as a RUN (its weights NaN with ``nan``)."""
    from quackae.model.checkpoints import write_run

    tokenizer = load_tokenizer(prepared / "tokenizer.json")
    torch.manual_seed(0)
    model = QuackAutoEncoder(
        tokenizer.get_vocab_size(), embed_size=8, hidden_size=16, pooling="final", pad_id=special_ids(tokenizer).pad
    )
    if nan:
        with torch.no_grad():
            model.embed.weight.fill_(float("nan"))
    return write_run(model, tokenizer, root / ("nan-run" if nan else "run"))


def _encode(prepared: Path, run: Path, out: Path, **flags) -> dict:
    config = {"batch_size": 8, "shard_size": 16, "accelerator": "cpu", "devices": "1", **flags}
    return encode(EncodeConfig(data=str(prepared), model=str(run), out=str(out), **config))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    _prepare(_write(root / "c.jsonl", _texts()), root / "p")
    _run(root, root / "p")
    return root


@pytest.mark.parametrize("layout", ["shards", "files"])
def test_the_store_keeps_each_original_text_and_marks_truncated_items(tiny, tmp_path, layout):
    texts = _texts()
    tokenizer = load_tokenizer(tiny / "p" / "tokenizer.json")
    _encode(tiny / "p", tiny / "run", tmp_path / "s", layout=layout)
    store = EncodingStore(tmp_path / "s")
    assert len(store) == ROWS
    truncated = 0
    for i, text in enumerate(texts):
        _, metadata = store[10 * i]
        assert metadata["text"] == text  # whole and as read, truncated or not
        cut = len(tokenizer.encode(text, add_special_tokens=False).ids) > MAX_LENGTH - 1
        assert metadata["truncated"] is cut
        truncated += cut
    assert 0 < truncated < ROWS


def test_the_text_column_holds_the_text_field_whatever_its_name(tmp_path):
    texts = _texts(12)
    prepared = _prepare(_write(tmp_path / "c.jsonl", texts, field="body"), tmp_path / "p", text_field="body")
    dataset, _, _ = load_prepared(prepared)
    assert dataset.column_names == ["id", "input_ids", "length", "text", "truncated", "label"]
    assert dataset["text"] == texts


def test_the_fingerprint_covers_every_column_and_a_rerun_on_edited_texts_is_refused(tmp_path):
    texts = _texts(24)
    texts[3], texts[4] = "duck goose swan", "swan goose duck"  # the same tokens in another order: equal lengths
    first = _prepare(_write(tmp_path / "a.jsonl", texts), tmp_path / "p")
    run = _run(tmp_path, first)
    assert _encode(first, run, tmp_path / "s")["items_written"] == 24
    texts[3], texts[4] = texts[4], texts[3]
    _prepare(_write(tmp_path / "b.jsonl", texts), tmp_path / "p")  # re-prepared in place: ids and lengths alike
    with pytest.raises(QuackError, match="another dataset"):
        _encode(first, run, tmp_path / "s")


def test_the_fingerprint_depends_on_values_not_on_chunking():
    table = pa.table(
        {
            "id": pa.array(np.arange(50, dtype=np.int64)),
            "input_ids": pa.array([[i % 7 + 1, 3] for i in range(50)], pa.list_(pa.int32())),
            "text": pa.array([None if i % 9 == 0 else f"t{i}" for i in range(50)]),
            "truncated": pa.array([i % 4 == 0 for i in range(50)]),
        }
    )
    base = dataset_fingerprint(table)
    rechunked = pa.Table.from_batches(table.to_batches(max_chunksize=3))
    assert (
        dataset_fingerprint(rechunked)
        == base
        == dataset_fingerprint(pa.concat_tables([table.slice(0, 7), table.slice(7)]))
    )
    for position, name in enumerate(table.column_names):
        values = table.column(name).to_pylist()
        values[31] = {"id": 999, "input_ids": [2, 3], "text": "other", "truncated": not values[31]}[name]
        changed = table.set_column(position, name, pa.array(values, table.schema.field(name).type))
        assert dataset_fingerprint(changed) != base, name
    assert dataset_fingerprint(table.rename_columns(["id", "input_ids", "body", "truncated"])) != base


def test_verify_fingerprint_finds_rows_changed_after_prepare(tmp_path):
    prepared = _prepare(_write(tmp_path / "c.jsonl", _texts(12)), tmp_path / "p")
    assert verify_fingerprint(prepared) == load_prepared(prepared)[0].fingerprint
    arrow = next((prepared / "dataset").glob("*.arrow"))
    table = pa.ipc.open_stream(pa.memory_map(str(arrow))).read_all()
    texts = table.column("text").to_pylist()
    texts[5] = texts[5].upper()
    edited = table.set_column(table.column_names.index("text"), "text", pa.array(texts))
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, edited.schema) as writer:
        writer.write_table(edited)
    with pytest.raises(QuackError, match="differ from what prepare wrote"):
        verify_fingerprint(prepared)


def _other_tokenizer_of_the_same_size(path: Path, size: int) -> None:
    other = train_tokenizer([" ".join(reversed(WORDS)) + " zebra quail"] * 3, vocab_size=size, min_frequency=1)
    assert other.get_vocab_size() == size
    other.save(str(path))


@pytest.mark.parametrize("damage", ["swapped tokenizer", "garbage marker", "empty marker", "marker without sha"])
def test_the_marker_is_checked_against_the_tokenizer(tmp_path, damage, capsys):
    prepared = _prepare(_write(tmp_path / "c.jsonl", _texts(12)), tmp_path / "p")
    run = _run(tmp_path, prepared)
    marker = prepared / COMPLETE
    if damage == "swapped tokenizer":
        _other_tokenizer_of_the_same_size(prepared / "tokenizer.json", load_tokenizer(run).get_vocab_size())
        message = "tokenizer.json is not the tokenizer the data was prepared with"
    elif damage == "garbage marker":
        marker.write_text("garbage")
        message = "COMPLETE is not valid JSON"
    elif damage == "empty marker":
        marker.write_text("")
        message = "COMPLETE is empty"
    else:
        marker.write_text("{}")
        message = "COMPLETE records no tokenizer sha256"
    with pytest.raises(QuackError, match=message):
        load_prepared(prepared)
    capsys.readouterr()
    assert main(["encode", str(prepared), "--model", str(run), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "prepare" in err[0]


def test_encode_never_commits_a_non_finite_encoding(tiny, tmp_path, monkeypatch):
    # a checkpoint whose weights went non-finite is refused before any item
    run = _run(tmp_path, tiny / "p", nan=True)
    with pytest.raises(QuackError, match=r"last\.ckpt holds non-finite weights"):
        _encode(tiny / "p", run, tmp_path / "s")
    assert shard_files(tmp_path / "s") == []
    # finite weights that still give a non-finite encoding (here: the third batch): nothing of that batch, nor of
    # its shard, is committed, and the store is not marked complete
    real, calls = QuackAutoEncoder.forward, []

    def forward(self, x):
        encoding, states = real(self, x)
        calls.append(len(x))
        return (encoding * float("nan") if len(calls) == 3 else encoding), states

    monkeypatch.setattr(QuackAutoEncoder, "forward", forward)
    with pytest.raises(QuackError, match=r"the model .*last\.ckpt gave a non-finite encoding .* for id \d+"):
        _encode(tiny / "p", tiny / "run", tmp_path / "s2", shard_size=8)
    stored = EncodingStore(tmp_path / "s2") if (tmp_path / "s2" / "shards").is_dir() else None
    assert stored is None or len(stored) <= 16  # at most the two finite batches before it, each its own shard
    assert stored is None or np.isfinite(stored.to_numpy()[1]).all()
    assert json.loads((tmp_path / "s2" / "manifest.json").read_text())["complete"] is False


@pytest.mark.parametrize(
    ("column", "flags"),
    [
        ("input_ids", {}),
        ("length", {}),
        ("text", {"text_field": "body"}),
        ("truncated", {}),
        ("encoding", {}),
        ("id", {"id_field": "key"}),
    ],
)
def test_input_columns_named_like_quackae_own_are_refused(tmp_path, column, flags):
    field = flags.get("text_field", "text")
    values = {column: list(range(6)), **({"key": list(range(6))} if column == "id" else {})}
    source = _write(tmp_path / "c.jsonl", _texts(6), field=field, **values)
    with pytest.raises(
        QuackError, match=f"input column '{column}' clashes with the '{column}' column quackae writes \\(in "
    ):
        _prepare(source, tmp_path / "p", **flags)


def test_own_names_pass_where_they_are_the_text_or_id_field_and_other_names_stay(tmp_path):
    source = _write(tmp_path / "c.jsonl", _texts(6), _truncated=[True] * 6)
    dataset, _, _ = load_prepared(_prepare(source, tmp_path / "p"))
    assert dataset["_truncated"] == [True] * 6 and dataset["id"] == [0, 10, 20, 30, 40, 50]


def test_over_long_words_and_lines_are_cut_before_the_tokenizer_and_counted(tmp_path):
    texts = _texts(8)
    word = "x" * 1_000_000  # one word: unbounded, BPE training on it ran for minutes
    line = " ".join(["goose duck"] * 400_000)  # 4 MB of words on one line
    texts[3], texts[5] = word, line
    summary = prepare(
        PrepareConfig(inputs=(str(_write(tmp_path / "c.jsonl", texts)),), out=str(tmp_path / "p"), vocab_size=300)
    )
    cut = summary["cut_before_tokenizing"]
    assert cut["texts"] == 2 and cut["training_texts"] == 2 and cut["training_runs"] >= 1
    dataset, tokenizer, _ = load_prepared(tmp_path / "p")
    assert dataset["text"][3] == word and dataset["text"][5] == line  # stored whole
    assert dataset["truncated"][3] and dataset["truncated"][5] and max(dataset["length"]) <= 128
    # the cut keeps the tokens of text made of ordinary words: the same as tokenizing the whole line
    eos = special_ids(tokenizer).eos
    whole = tokenizer.encode(" ".join(["goose duck"] * 3000), add_special_tokens=False).ids[:127] + [eos]
    assert dataset["input_ids"][5] == whole
    assert tokenize_batch({"t": [line]}, tokenizer, "t", 127, eos)["input_ids"] == [whole]


def _damage(prepared: Path, case: str) -> tuple[Path, str]:
    """Damage one file of a prepared folder; returns the file and the words its error must hold."""
    arrow = next((prepared / "dataset").glob("*.arrow"))
    if case == "truncated arrow":
        data = arrow.read_bytes()
        arrow.write_bytes(data[: len(data) // 2])
        return arrow, "is damaged|rows where prepare wrote"
    if case == "zeroed arrow":
        arrow.write_bytes(bytes(arrow.stat().st_size))
        return arrow, "is damaged"
    if case == "empty arrow":
        arrow.write_bytes(b"")
        return arrow, "is empty"
    if case == "arrow is a directory":
        arrow.unlink()
        arrow.mkdir()
        return arrow, "is a directory"
    if case == "arrow is a FIFO":
        arrow.unlink()
        os.mkfifo(arrow)
        return arrow, "is a FIFO"
    if case == "arrow is a link loop":
        arrow.unlink()
        arrow.symlink_to(arrow.name)
        return arrow, "symbolic-link loop"
    if case == "dataset_info.json is []":
        (prepared / "dataset" / "dataset_info.json").write_text("[]")
        return prepared / "dataset" / "dataset_info.json", "holds a JSON array"
    if case == "state.json broken":
        (prepared / "dataset" / "state.json").write_text('{"_data_files": [')
        return prepared / "dataset" / "state.json", "is not valid JSON"
    if case == "state.json lists nothing":
        (prepared / "dataset" / "state.json").write_text('{"_data_files": 5}')
        return prepared / "dataset" / "state.json", "lists no data files"
    if case == "prepare.json broken":
        (prepared / "prepare.json").write_text("[1, 2")
        return prepared / "prepare.json", "is not valid JSON"
    if case == "tokenizer is a FIFO":
        (prepared / "tokenizer.json").unlink()
        os.mkfifo(prepared / "tokenizer.json")
        return prepared / "tokenizer.json", "is a FIFO"
    assert case == "marker is a directory"
    (prepared / COMPLETE).unlink()
    (prepared / COMPLETE).mkdir()
    return prepared / COMPLETE, "is a directory"


DAMAGES = [
    "truncated arrow",
    "zeroed arrow",
    "empty arrow",
    "arrow is a directory",
    "arrow is a FIFO",
    "arrow is a link loop",
    "dataset_info.json is []",
    "state.json broken",
    "state.json lists nothing",
    "prepare.json broken",
    "tokenizer is a FIFO",
    "marker is a directory",
]


@pytest.mark.parametrize("case", DAMAGES)
def test_every_file_of_a_prepared_folder_damaged_is_one_line_naming_it(tmp_path, case, capsys):
    prepared = _prepare(_write(tmp_path / "c.jsonl", _texts(12)), tmp_path / "p")
    run = _run(tmp_path, prepared)
    path, words = _damage(prepared, case)
    with pytest.raises(QuackError, match=words) as raised:
        load_prepared(prepared)
    assert str(path) in str(raised.value) and "prepare" in str(raised.value)
    capsys.readouterr()
    for command in (["encode", str(prepared), "--model", str(run), "--out", str(tmp_path / "s")],
                    ["train", str(prepared), "--out", str(tmp_path / "r"), "--max-steps", "1"]):  # fmt: skip
        assert main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(path) in err[0], err


def test_a_full_disk_during_prepare_is_one_line_naming_the_path(tmp_path, monkeypatch, capsys):
    import errno

    import datasets

    def full(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", full)
    source = _write(tmp_path / "c.jsonl", _texts(6))
    capsys.readouterr()
    assert main(["prepare", str(source), "--out", str(tmp_path / "p"), "--vocab-size", "300"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("quackae")]  # no progress bars
    assert len(err) == 1 and "No space left on device" in err[0] and str(tmp_path / ".p.prepare-") in err[0]
    assert not (tmp_path / "p").exists() and not list(tmp_path.glob(".p.prepare-*"))


def test_ctrl_c_during_encode_is_exit_130_in_one_line_and_a_rerun_finishes(tiny, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    original = QuackAutoEncoder.predict_step

    def interrupted(self, batch, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, batch, *args, **kwargs)

    monkeypatch.setattr(QuackAutoEncoder, "predict_step", interrupted)
    handler = signal.getsignal(signal.SIGINT)
    out = tmp_path / "s"
    args = ["encode", str(tiny / "p"), "--model", str(tiny / "run"), "--out", str(out), "--batch-size", "8"]
    capsys.readouterr()
    try:
        assert main([*args, "--shard-size", "8", "--accelerator", "cpu"]) == 130
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C while it shuts down
    assert capsys.readouterr().err.strip().splitlines()[-1] == "quackae encode: interrupted"
    monkeypatch.setattr(QuackAutoEncoder, "predict_step", original)
    assert main([*args, "--shard-size", "8", "--accelerator", "cpu"]) == 0
    assert len(EncodingStore(out)) == ROWS


def test_a_folder_prepared_before_the_text_column_still_encodes(tiny, tmp_path, caplog):
    import shutil

    import datasets

    old = tmp_path / "old"
    shutil.copytree(tiny / "p", old)
    rows = datasets.load_from_disk(str(old / "dataset")).remove_columns(["text", "truncated"])
    rows.save_to_disk(str(tmp_path / "rows"))
    shutil.rmtree(old / "dataset")
    (tmp_path / "rows").rename(old / "dataset")
    sha = json.loads((old / COMPLETE).read_text())["tokenizer_sha256"]
    (old / COMPLETE).write_text(json.dumps({"tokenizer_sha256": sha}))  # as the marker was before
    _encode(old, tiny / "run", tmp_path / "s")
    assert f"{old} was prepared before quackae kept each item's original text" in caplog.text
    store = EncodingStore(tmp_path / "s")
    tokenizer = load_tokenizer(old / "tokenizer.json")
    whole = [i for i, t in enumerate(_texts()) if len(tokenizer.encode(t).ids) < MAX_LENGTH and t.isascii()]
    for i in whole:
        _, metadata = store[10 * i]
        assert metadata["text"] == _texts()[i] and metadata["truncated"] is None  # decoded from tokens; unknown
    assert whole


def test_row_takes_match_a_row_by_row_reference_on_many_chunks():
    from quackae.data.module import RowTaker

    rng = np.random.default_rng(0)
    lists = [rng.integers(1, 9, rng.integers(1, 6)).tolist() for _ in range(300)]
    table = pa.table({"input_ids": lists, "text": [f"row {i}" for i in range(300)]})
    chunked = pa.Table.from_batches(table.to_batches(max_chunksize=7))
    taker = RowTaker(chunked)
    rows = table.to_pylist()
    for indices in ([], [5], [299, 0, 7, 7, 150], rng.integers(0, 300, 200).tolist(), list(range(40, 90))):
        assert taker.take(indices).to_pylist() == [rows[i] for i in indices]
    with pytest.raises(IndexError):
        taker.take([300])


@pytest.mark.parametrize("layout", ["shards", "files"])
def test_the_overlapped_path_stores_what_the_plain_path_stores(tiny, tmp_path, monkeypatch, layout):
    """The GPU path's pieces (the next batch fetched on a thread, the device-to-host copy handed to the writer's
    thread and waited for there) run on CPU threads here and store exactly what the plain path stores."""
    import quackae.core.cores as cores
    import quackae.store.transfer as transfer

    monkeypatch.setattr(cores, "cores_to_spare", lambda trainer: False)
    _encode(tiny / "p", tiny / "run", tmp_path / "plain", layout=layout)
    monkeypatch.setattr(cores, "cores_to_spare", lambda trainer: True)
    monkeypatch.setattr(transfer, "OVERLAP_ON_CPU", True)
    waited = []
    original = transfer.HostCopy.array
    monkeypatch.setattr(transfer.HostCopy, "array", lambda self: waited.append(1) or original(self))
    _encode(tiny / "p", tiny / "run", tmp_path / "overlap", layout=layout)
    assert waited  # the overlapped copies were taken
    plain, overlapped = EncodingStore(tmp_path / "plain"), EncodingStore(tmp_path / "overlap")
    ids, matrix = plain.to_numpy()
    other_ids, other = overlapped.to_numpy()
    assert np.array_equal(ids, other_ids) and np.array_equal(matrix, other)
    assert [plain[i][1] for i in ids[::5]] == [overlapped[i][1] for i in ids[::5]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_encode_on_a_gpu_stores_float32_close_to_the_cpu(tiny, tmp_path, precision):
    _encode(tiny / "p", tiny / "run", tmp_path / "cpu")
    _encode(tiny / "p", tiny / "run", tmp_path / "gpu", accelerator="cuda", precision=precision, batch_size=16)
    ids, cpu = EncodingStore(tmp_path / "cpu").to_numpy()
    gpu_ids, gpu = EncodingStore(tmp_path / "gpu").to_numpy()
    assert np.array_equal(ids, gpu_ids) and gpu.dtype == np.float32
    np.testing.assert_allclose(gpu, cpu, atol=1e-4 if precision == "32-true" else 5e-2)
    assert [EncodingStore(tmp_path / "gpu")[i][1]["text"] for i in ids] == [
        EncodingStore(tmp_path / "cpu")[i][1]["text"] for i in ids
    ]
