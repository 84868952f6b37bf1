"""What the README promises about a store, each checked on a store encoded here from the ee38aa6 fixtures."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from quackae import EncodingStore
from quackae.cli import main

LEGACY = Path(__file__).resolve().parents[1] / "legacy" / "store-ee38aa6"


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("claims")
    for name in ("prepared", "run"):
        shutil.copytree(LEGACY / name, root / name)
    assert main(_encode(root, root / "store", "--shard-size", "16")) == 0
    return root


def _encode(root: Path, out: Path, *extra: str) -> list[str]:
    return ["encode", str(root / "prepared"), "--model", str(root / "run"), "--out", str(out), *extra]


def _copy(encoded: Path, tmp_path: Path) -> Path:
    store = tmp_path / "store"
    shutil.copytree(encoded / "store", store)
    return store


def test_shards_read_with_pyarrow_dataset_give_the_stores_rows(encoded):
    import pyarrow.dataset as ds

    table = ds.dataset(encoded / "store" / "shards", format="arrow").to_table()
    ids, matrix = EncodingStore(encoded / "store").to_numpy()
    order = np.argsort(table.column("id").to_numpy())
    assert np.array_equal(table.column("id").to_numpy()[order], np.sort(ids))
    rows = np.stack(table.column("encoding").to_numpy(zero_copy_only=False))[order]
    assert np.array_equal(rows, matrix[np.argsort(ids)])


def test_a_rerun_never_rewrites_a_committed_shard(encoded, tmp_path, capsys):
    store = _copy(encoded, tmp_path)
    shards = sorted((store / "shards").iterdir())
    assert len(shards) >= 3
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    assert main(_encode(encoded, store, "--shard-size", "16")) == 0
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in (store / "shards").iterdir()}
    assert after == before


def test_a_rerun_with_another_selection_is_refused_in_one_line(encoded, tmp_path, capsys):
    store = _copy(encoded, tmp_path)
    capsys.readouterr()
    assert main(_encode(encoded, store, "--filtered", "--label-field", "label")) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert str(store) in line and "selection" in line


def test_a_symlinked_shards_folder_is_refused(encoded, tmp_path, capsys):
    store = _copy(encoded, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    (store / "shards").rename(elsewhere)
    os.symlink(elsewhere, store / "shards")
    capsys.readouterr()
    assert main(_encode(encoded, store)) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "shards" in line and "link" in line
    assert sorted(p.name for p in elsewhere.iterdir())  # what the link pointed at is left alone
