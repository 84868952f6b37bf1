from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torch

from quackae import EncodingStore
from quackae.core.errors import QuackError
from quackae.data.selection import keep_item
from quackae.store.items import item_path, npz_bytes
from quackae.store.job import clean_temporary, stored_ids
from quackae.store.reader import read_item
from quackae.store.writer import AutoencoderWriter


@pytest.mark.parametrize("size", [1, 16, 256])
@pytest.mark.parametrize("meta", [{"id": 3}, {"id": 7, "label": "ü ☃ 🦆", "n": [1, 2]}, {"id": 0, "text": ""}])
def test_npz_bytes_match_numpy_savez(tmp_path, size, meta):
    encoding = np.random.default_rng(size).standard_normal(size).astype(np.float32)
    text = json.dumps(meta, ensure_ascii=False)
    reference = io.BytesIO()
    np.savez(reference, encoding=encoding, metadata=np.array(text))
    reference.seek(0)
    ours = npz_bytes(encoding, text)
    assert zipfile.ZipFile(io.BytesIO(ours)).testzip() is None
    with np.load(io.BytesIO(ours), allow_pickle=False) as a, np.load(reference, allow_pickle=False) as b:
        assert a.files == b.files == ["encoding", "metadata"]
        assert a["encoding"].dtype == np.float32 and np.array_equal(a["encoding"], b["encoding"])
        assert a["metadata"].dtype == b["metadata"].dtype and str(a["metadata"]) == str(b["metadata"])
    for name in ("encoding.npy", "metadata.npy"):
        assert zipfile.ZipFile(io.BytesIO(ours)).read(name) == zipfile.ZipFile(io.BytesIO(reference.getvalue())).read(
            name
        )


def write(writer: AutoencoderWriter, metas, matrix) -> None:
    writer.write_batch(metas, matrix)
    writer.flush()


def test_writer_stores_one_valid_item_per_row_and_skips_existing(tmp_path):
    matrix = np.arange(5 * 4, dtype=np.float32).reshape(5, 4)
    metas = [{"id": 100_000 + i * 1500, "label": f"l{i}"} for i in range(5)]
    writer = AutoencoderWriter(storage_path=tmp_path, layout="files")
    write(writer, metas, matrix)
    assert writer.written == 5
    for meta, row in zip(metas, matrix, strict=True):
        encoding, metadata = read_item(tmp_path / item_path(meta["id"], "npz"))
        assert np.array_equal(encoding, row) and metadata == meta
    again = AutoencoderWriter(storage_path=tmp_path, layout="files")
    write(again, metas, matrix + 1)
    assert again.written == 0 and again.skipped == 5
    assert np.array_equal(read_item(tmp_path / item_path(metas[0]["id"], "npz"))[0], matrix[0])
    assert stored_ids(tmp_path) == sorted(m["id"] for m in metas)


def test_temporary_files_never_count_and_are_cleaned(tmp_path):
    write(AutoencoderWriter(storage_path=tmp_path, layout="files"), [{"id": 5}], np.ones((1, 3), dtype=np.float32))
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["5.npz"]  # no staging left behind
    stray = tmp_path / ".staging" / "0-123-456" / "6.npz.part"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"half a file")
    assert stored_ids(tmp_path) == [5]
    assert EncodingStore(tmp_path).ids() == [5]
    assert clean_temporary(tmp_path) == 1 and not (tmp_path / ".staging").exists()


def test_io_error_stops_with_one_line_error_and_leaves_valid_items(tmp_path):
    writer = AutoencoderWriter(storage_path=tmp_path, threads=1, layout="files")
    write(writer, [{"id": 1}], np.ones((1, 3), dtype=np.float32))
    blocked = tmp_path / "0" / "1"
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_text("a file where a folder should be")
    with pytest.raises(QuackError, match="writing .* failed: .*rerun the same command"):
        writer.write_batch([{"id": 1500}], np.ones((1, 3), dtype=np.float32))
        writer.flush()
    assert stored_ids(tmp_path) == [1]
    assert np.array_equal(read_item(tmp_path / item_path(1, "npz"))[0], np.ones(3, dtype=np.float32))


def test_filtered_and_evaluate_select_labelled_and_unlabelled():
    items = [{"id": i, "label": v} for i, v in enumerate(["a", None, "b", "unknown", "a"])]
    labelled = [
        m["id"]
        for m in items
        if keep_item(m, filtered=True, evaluate=False, label_field="label", unlabeled_value="unknown")
    ]
    unlabelled = [
        m["id"]
        for m in items
        if keep_item(m, filtered=False, evaluate=True, label_field="label", unlabeled_value="unknown")
    ]
    assert labelled == [0, 2, 4] and unlabelled == [1, 3]
    assert all(keep_item(m, filtered=False, evaluate=False, label_field="label") for m in items)


def test_reduction_threshold_thins_only_the_named_class_deterministically():
    items = [{"id": i, "label": "big" if i % 4 else "small"} for i in range(4000)]

    def kept():
        return [
            m["id"]
            for m in items
            if keep_item(
                m,
                filtered=True,
                evaluate=False,
                label_field="label",
                reduce_label="big",
                reduction_threshold=0.25,
                seed=1,
            )
        ]

    first = kept()
    big = sum(1 for i in first if i % 4)
    assert sum(1 for i in first if i % 4 == 0) == 1000
    assert 600 < big < 900
    assert first == kept()


def test_writer_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError, match="exclude each other"):
        AutoencoderWriter(storage_path=tmp_path, filtered=True, evaluate=True, label_field="label")
    with pytest.raises(ValueError, match="label field"):
        AutoencoderWriter(storage_path=tmp_path, filtered=True)
    with pytest.raises(ValueError, match="per batch"):
        AutoencoderWriter(write_interval="epoch", storage_path=tmp_path)


@pytest.mark.parametrize("layout", ["shards", "files"])
def test_store_readers(tmp_path, layout):
    matrix = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    metas = [{"id": i * 7, "label": ["x", "y"][i % 2], "score": i} for i in range(6)]
    writer = AutoencoderWriter(storage_path=tmp_path, manifest={"checkpoint": "c"}, layout=layout, shard_size=4)
    write(writer, metas, matrix)
    manifest = writer.write_manifest()
    assert manifest["items"] == 6 and manifest["encoding_size"] == 4 and manifest["dtype"] == "float32"
    store = EncodingStore(tmp_path)
    assert len(store) == 6 and store.ids() == [0, 7, 14, 21, 28, 35] and 14 in store
    encoding, metadata = store[14]
    assert np.array_equal(encoding, matrix[2]) and metadata == metas[2]
    with pytest.raises(KeyError):
        store[15]
    ids, dense = store.to_numpy()
    assert ids.tolist() == store.ids() and np.array_equal(dense, matrix)
    view = store.torch_dataset(label_field="label")
    assert len(view) == 6 and view.classes == ["x", "y"]
    tensor, label = view[3]
    assert torch.equal(tensor, torch.from_numpy(matrix[3])) and label == 1
    dataset = store.to_dataset()
    assert dataset.column_names == ["id", "encoding", "label", "score"]
    assert np.allclose(np.asarray(dataset["encoding"][1]), matrix[1])
    import pyarrow.parquet as pq

    assert store.export(tmp_path / "out.parquet") == 6
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column("id").to_pylist() == store.ids()
    assert np.allclose(np.asarray(table.column("encoding").to_pylist()), matrix)
    assert table.column("label").to_pylist() == [m["label"] for m in metas]


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(QuackError, match="does not exist; run quackae encode"):
        EncodingStore(tmp_path / "nothing")


@pytest.mark.parametrize("layout", ["shards", "files"])
def test_a_bug_on_the_writer_thread_stops_the_job_with_its_traceback(tmp_path, layout, monkeypatch):
    """Not a silent loss: an exception that is no I/O error reaches the caller as itself."""

    def broken(self, ids, matrix, extra):
        raise TypeError("a bug in the picture code")

    monkeypatch.setattr(AutoencoderWriter, "_write_pngs", broken)
    writer = AutoencoderWriter(storage_path=tmp_path, threads=1, layout=layout)
    with pytest.raises(TypeError, match="a bug in the picture code"):
        write(writer, [{"id": 1}], np.ones((1, 3), dtype=np.float32))
    assert stored_ids(tmp_path) == []


def test_a_failed_shard_commit_stops_the_job_and_keeps_earlier_shards(tmp_path, monkeypatch):
    import errno

    import quackae.store.shards as shards_module

    real, calls = shards_module.write_shard, []

    def failing(table, staging, shards, name):
        calls.append(name)
        # the second shard hits a full disk in its committer thread (named by its sequence number: two committer
        # threads may start their shards in either order)
        if name.endswith("-000002.arrow"):
            raise OSError(errno.ENOSPC, "No space left on device", str(shards / name))
        return real(table, staging, shards, name)

    monkeypatch.setattr(shards_module, "write_shard", failing)
    writer = AutoencoderWriter(storage_path=tmp_path, shard_size=4)
    with pytest.raises(QuackError, match="No space left on device.*rerun the same command"):
        for start in range(0, 40, 3):
            writer.write_batch([{"id": i} for i in range(start, start + 3)], np.ones((3, 2), dtype=np.float32))
        writer.flush()
    stored = stored_ids(tmp_path)  # whole shards only; another committer may finish a later shard
    assert stored[:4] == [0, 1, 2, 3] and not set(range(4, 8)) & set(stored)
    assert all(stored[k : k + 4] == list(range(stored[k], stored[k] + 4)) for k in range(0, len(stored), 4))
    assert not list((tmp_path / ".staging").rglob("*.arrow*"))
