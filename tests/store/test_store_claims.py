"""What a store is and when it may be used: --overwrite empties only a store, --out never overlaps the inputs,
provenance is checked against every unit in both layouts, and export/classify read only complete, sound stores."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from test_store import ROWS
from test_store_hostile import _cli, _copy, _encode, _read_table, _write_table, build_inputs

from quackae import EncodingStore
from quackae.store.items import item_path, npz_bytes
from quackae.store.shards import shard_files

FLAGS = ["--accelerator", "cpu", "--devices", "1", "--batch-size", "8", "--shard-size", "16"]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """A prepared folder, two runs, and one complete store per layout and run to copy."""
    return build_inputs(tmp_path_factory.mktemp("claims"), stores_of=(1, 2))


def _encode_cli(capsys, made: Path, out: Path, *extra: str, seed: int = 1) -> tuple[int, list[str]]:
    args = [str(made / "prepared"), "--model", str(made / f"run{seed}"), "--out", str(out)]
    return _cli(capsys, "encode", *args, *FLAGS, *extra)


# ---------------------------------------------------------------------------------------------- what a store is
def test_overwrite_refuses_a_folder_quackae_did_not_write(made, tmp_path, capsys):
    folder = tmp_path / "v"
    folder.mkdir()
    (folder / "thesis.tex").write_text("three years of work")
    code, lines = _encode_cli(capsys, made, folder, "--overwrite")
    assert code == 2 and len(lines) == 1 and str(folder / "thesis.tex") in lines[0], lines
    assert (folder / "thesis.tex").read_text() == "three years of work"
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]  # not even a lock file left behind
    code, lines = _encode_cli(capsys, made, folder)  # nor is a store written beside it
    assert code == 2 and len(lines) == 1 and "thesis.tex" in lines[0], lines


@pytest.mark.parametrize(
    "fake",
    [
        "an empty manifest",
        "a manifest with the provenance taken out",
        "a manifest of format 2 and nothing else",
        "a manifest and pictures laid out like items",
        "a manifest and an Arrow file in shards",
    ],
)
def test_overwrite_needs_more_than_a_manifest_made_by_hand(made, tmp_path, capsys, fake):
    folder = tmp_path / "v"
    folder.mkdir()
    manifest = json.loads((made / "ref-shards" / "manifest.json").read_text())
    if fake == "an empty manifest":
        manifest = {}
    elif fake == "a manifest with the provenance taken out":
        manifest = {k: v for k, v in manifest.items() if not k.endswith("sha256")}
    elif fake == "a manifest of format 2 and nothing else":
        manifest = {"format": "quackae-store-2", "complete": True, "items": 1}
    else:
        manifest = {}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    keep = folder / ("0/0/7.png" if "pictures" in fake else "shards/photos.arrow")
    keep.parent.mkdir(parents=True)
    _write_table(keep, pa.table({"id": pa.array([7], pa.int64())}))
    code, lines = _encode_cli(capsys, made, folder, "--overwrite")
    assert code == 2 and len(lines) == 1 and str(folder) in lines[0] and "--overwrite" in lines[0], lines
    assert keep.is_file()


def test_overwrite_still_replaces_a_store_whose_manifest_is_damaged(made, tmp_path, capsys):
    out = _copy(made, "shards", tmp_path / "s")
    (out / "manifest.json").write_text('{"format": "quackae-st')  # cut short: its shards still carry provenance
    code, lines = _encode_cli(capsys, made, out, "--overwrite", seed=2)
    assert code == 0, lines
    assert np.array_equal(EncodingStore(out).to_numpy()[1], EncodingStore(made / "ref2-shards").to_numpy()[1])


@pytest.mark.parametrize(
    "where",
    ["the prepared folder", "inside the prepared folder", "a folder holding it", "the run", "inside the run"],
)
def test_out_never_overlaps_the_data_or_the_model(made, tmp_path, capsys, where):
    root = tmp_path / "w"
    shutil.copytree(made / "prepared", root / "prepared")
    shutil.copytree(made / "run1", root / "run1")
    out = {
        "the prepared folder": root / "prepared",
        "inside the prepared folder": root / "prepared" / "store",
        "a folder holding it": root,
        "the run": root / "run1",
        "inside the run": root / "run1" / "store",
    }[where]
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    for extra in ([], ["--overwrite"]):
        code, lines = _encode_cli(capsys, root, out, *extra)
        assert code == 2 and len(lines) == 1 and f"--out {out}" in lines[0], lines
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


# ---------------------------------------------------------------------------------------------- provenance
@pytest.mark.parametrize("layout", ["shards", "files"])
def test_an_empty_manifest_is_no_manifest(made, tmp_path, capsys, layout):
    out = _copy(made, layout, tmp_path / "s")
    (out / "manifest.json").write_text("{}")
    for _, path in list(enumerate(sorted(out.rglob("*.npz"))))[:20]:
        path.unlink()
    code, lines = _cli(capsys, "verify", str(out))
    assert code == 1 and any("manifest.json: not a valid store manifest" in line for line in lines), lines
    code, lines = _encode_cli(capsys, made, out, "--layout", layout, seed=2)
    assert code == 2 and len(lines) == 1 and "not a valid store manifest" in lines[0], lines


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("format", "quackae-store-1"),
        ("checkpoint_sha256", "garbage"),
        ("tokenizer_sha256", None),
        ("dataset_fingerprint", ""),
        ("layout", "pickles"),
        ("encoding_size", True),
        ("encoding_size", -16),
        ("text", "yes"),
        ("selection", [1, 2]),
        ("complete", "true"),
        ("items", 1.5),
        ("dataset", [1, 2]),
        ("tokenizer", {"a": 1}),
        ("job", 7),
        ("ids_sha256", "abc"),
    ],
)
def test_a_manifest_value_of_the_wrong_kind_makes_it_no_manifest(made, tmp_path, capsys, key, value):
    out = _copy(made, "shards", tmp_path / "s")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest[key] = value
    (out / "manifest.json").write_text(json.dumps(manifest))
    for command in ("export", "classify"):
        code, lines = _cli(capsys, command, str(out), "--out", str(tmp_path / "x.parquet"))
        assert code == 2 and len(lines) == 1 and "not a valid manifest" in lines[0] and key in lines[0], lines
    assert _cli(capsys, "verify", str(out))[0] == 1
    assert _encode_cli(capsys, made, out)[0] == 2


@pytest.mark.parametrize("layout", ["shards", "files"])
def test_a_forged_manifest_mixes_no_models(made, tmp_path, capsys, layout):
    """Units of model 1 under a manifest claiming model 2: each unit's own provenance decides, so a rerun with
    model 2 sets every unit of model 1 aside and the store ends up all model 2."""
    out = _copy(made, layout, tmp_path / "s")
    shutil.copy(made / f"ref2-{layout}" / "manifest.json", out / "manifest.json")
    code, lines = _cli(capsys, "verify", str(out))
    assert code == 1 and any("provenance differs from the manifest (checkpoint_sha256" in line for line in lines)
    code, lines = _encode_cli(capsys, made, out, "--layout", layout, seed=2)
    assert code == 0, lines
    ids, matrix = EncodingStore(out).to_numpy()
    reference = EncodingStore(made / f"ref2-{layout}").to_numpy()
    assert np.array_equal(ids, reference[0]) and np.allclose(matrix, reference[1], atol=1e-6)
    assert _cli(capsys, "verify", str(out), "--data", str(made / "prepared"))[0] == 0


@pytest.mark.parametrize("layout", ["shards", "files"])
def test_a_unit_of_another_model_is_listed_and_redone(made, tmp_path, capsys, layout):
    out = _copy(made, layout, tmp_path / "s")
    if layout == "files":
        victim = out / item_path(4, "npz")
        shutil.copy(made / "ref2-files" / item_path(4, "npz"), victim)
    else:
        victim = shard_files(out)[1]
        other = _read_table(shard_files(made / "ref2-shards")[1])
        _write_table(victim, other)
    code, lines = _cli(capsys, "verify", str(out))
    assert code == 1 and any(line.startswith(f"{victim}: provenance differs") for line in lines), lines
    code, lines = _cli(capsys, "export", str(out), "--out", str(tmp_path / "e.parquet"))
    assert code == 2 and len(lines) == 1 and str(victim) in lines[0], lines
    assert _encode_cli(capsys, made, out, "--layout", layout)[0] == 0
    assert _cli(capsys, "verify", str(out), "--data", str(made / "prepared"))[0] == 0


# ---------------------------------------------------------------------------------------------- sound and complete
def _nan_unit(out: Path, layout: str) -> Path:
    if layout == "files":
        victim = out / item_path(4, "npz")
        with np.load(victim, allow_pickle=False) as item:
            encoding, metadata, provenance = item["encoding"], str(item["metadata"]), item["provenance"].item()
        encoding[3] = np.nan
        victim.write_bytes(npz_bytes(encoding, metadata, provenance))
        return victim
    victim = shard_files(out)[1]
    table = _read_table(victim)
    matrix = np.stack(table.column("encoding").to_numpy(zero_copy_only=False)).astype(np.float32)
    matrix[5, 0] = np.inf
    encoding = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])
    _write_table(victim, table.set_column(1, "encoding", encoding))
    return victim


@pytest.mark.parametrize("layout", ["shards", "files"])
def test_a_store_with_non_finite_encodings_is_refused_then_repaired(made, tmp_path, capsys, layout):
    out = _copy(made, layout, tmp_path / "s")
    victim = _nan_unit(out, layout)
    code, lines = _cli(capsys, "verify", str(out))
    assert code == 1 and any(line.startswith(f"{victim}: id") and "not finite" in line for line in lines), lines
    for command in ("export", "classify"):
        code, lines = _cli(capsys, command, str(out), "--out", str(tmp_path / f"{command}.parquet"))
        assert code == 2 and len(lines) == 1 and "not finite" in lines[0] and str(victim) in lines[0], lines
    summary = _encode(made, out, layout=layout)
    assert summary["items_written"] == (16 if layout == "shards" else 1)
    assert _cli(capsys, "verify", str(out), "--data", str(made / "prepared"))[0] == 0
    assert _cli(capsys, "export", str(out), "--out", str(tmp_path / "ok.parquet"))[0] == 0


@pytest.mark.parametrize("damage", ["killed", "a shard deleted"])
def test_export_and_classify_refuse_an_incomplete_store(made, tmp_path, capsys, damage):
    out = _copy(made, "shards", tmp_path / "s")
    if damage == "killed":
        manifest = json.loads((out / "manifest.json").read_text())
        manifest.pop("items")
        manifest["complete"] = False  # as a killed encode leaves it
        (out / "manifest.json").write_text(json.dumps(manifest))
    else:
        shard_files(out)[0].unlink()
    for command in ("export", "classify"):
        code, lines = _cli(capsys, command, str(out), "--out", str(tmp_path / "x.parquet"))
        assert code == 2 and len(lines) == 1 and f"store {out} is incomplete" in lines[0], lines
        assert "rerun quackae encode" in lines[0]
    assert not (tmp_path / "x.parquet").exists()
    assert len(EncodingStore(out)) < ROWS or damage == "killed"  # the store itself still opens (with a warning)


def test_exported_parquet_that_classify_cannot_use_is_one_line(made, tmp_path, capsys):
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    assert _cli(capsys, "export", str(made / "ref-shards"), "--out", str(good))[0] == 0
    table = pq.read_table(good)
    matrix = np.stack(table.column("encoding").to_numpy(zero_copy_only=False)).astype(np.float32)
    matrix[2, 1] = np.nan
    bad = table.set_column(
        table.column_names.index("encoding"),
        "encoding",
        pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1]),
    )
    pq.write_table(bad, tmp_path / "nan.parquet")
    os.mkfifo(tmp_path / "fifo.parquet")
    (tmp_path / "dir.parquet").mkdir()
    (tmp_path / "cut.parquet").write_bytes(good.read_bytes()[:500])
    for name, message in [
        ("nan", "not finite"),
        ("fifo", "is a FIFO"),
        ("dir", "is a directory"),
        ("cut", "cannot be read"),
    ]:
        path = tmp_path / f"{name}.parquet"
        code, lines = _cli(capsys, "classify", str(path), "--out", str(tmp_path / "c"))
        assert code == 2 and len(lines) == 1 and str(path) in lines[0] and message in lines[0], lines


# ---------------------------------------------------------------------------------------------- item 11
def test_a_string_key_says_ids_are_integers(made):
    store = EncodingStore(made / "ref-shards")
    with pytest.raises(TypeError, match="store ids are integers, and '1' is a str"):
        store["1"]
    with pytest.raises(KeyError, match="id 2 is not in the store"):
        store[2]
    assert store[1][1]["id"] == 1 and store[np.int64(1)][1]["id"] == 1


def test_a_killed_export_leaves_no_partial_file_for_long(made, tmp_path, capsys):
    target = tmp_path / "all.parquet"
    code = (
        "import os, signal, sys\n"
        "from quackae.core.atomic import atomic_file\n"
        "with atomic_file(sys.argv[1], 'wb') as handle:\n"
        "    handle.write(b'PAR1 half a file')\n"
        "    handle.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", code, str(target)], cwd=Path(__file__).parents[2])
    assert killed.returncode == -9
    left = list(tmp_path.glob(".all.parquet.*.partial"))
    assert len(left) == 1 and not target.exists()  # a kill leaves no half file at the final name
    live = tmp_path / f".all.parquet.{os.getpid()}-1.partial"  # a live writer's temporary stays
    live.write_bytes(b"being written")
    assert _cli(capsys, "export", str(made / "ref-shards"), "--out", str(target))[0] == 0
    assert sorted(tmp_path.glob(".all.parquet.*")) == [live]
    assert len(EncodingStore(made / "ref-shards")) == pa.parquet.read_table(target).num_rows


def test_export_refuses_to_write_inside_the_store(made, tmp_path, capsys):
    out = _copy(made, "shards", tmp_path / "s")
    code, lines = _cli(capsys, "export", str(out), "--out", str(out / "shards" / "x.parquet"))
    assert code == 2 and len(lines) == 1 and "inside the store" in lines[0], lines
    assert _cli(capsys, "verify", str(out))[0] == 0


@pytest.mark.parametrize("damage", ["a directory", "NaN", "another id in its metadata", "a FIFO"])
def test_a_bad_entry_at_an_item_path_is_redone_by_the_next_rerun(made, tmp_path, capsys, damage):
    out = _copy(made, "files", tmp_path / "s")
    victim = out / item_path(4, "npz")
    if damage == "NaN":
        _nan_unit(out, "files")
    elif damage == "another id in its metadata":
        victim.write_bytes((out / item_path(7, "npz")).read_bytes())
    else:
        victim.unlink()
        victim.mkdir() if damage == "a directory" else os.mkfifo(victim)
    assert _cli(capsys, "verify", str(out))[0] == 1
    code, lines = _cli(capsys, "export", str(out), "--out", str(tmp_path / "e.parquet"))
    assert code == 2 and len(lines) == 1 and str(victim) in lines[0], lines
    for _ in range(2):  # the first rerun repairs it, the second finds nothing to do
        code, lines = _encode_cli(capsys, made, out, "--layout", "files")
        assert code == 0, lines
    assert _cli(capsys, "verify", str(out), "--data", str(made / "prepared"))[0] == 0
    reference = EncodingStore(made / "ref-files")
    assert np.array_equal(EncodingStore(out)[4][0], reference[4][0])


@pytest.mark.parametrize("layout", ["shards", "files"])
def test_a_unit_whose_ids_were_replaced_is_found_without_the_data(made, tmp_path, capsys, layout):
    """The count unchanged, one stored id swapped for one the dataset lacks: the manifest's digest of the ids
    finds it (verify, export, classify), and a rerun sets the unit aside and encodes the missing id."""
    out = _copy(made, layout, tmp_path / "s")
    if layout == "shards":
        victim = shard_files(out)[0]
        table = _read_table(victim)
        ids = table.column("id").to_numpy().copy()
        ids[-1] = 1_000_000  # still sorted, no longer in the dataset
        _write_table(victim, table.set_column(0, "id", pa.array(ids)))
    else:
        victim = out / item_path(1_000_000, "npz")
        victim.parent.mkdir(parents=True)
        (out / item_path(4, "npz")).rename(victim)
    code, lines = _cli(capsys, "verify", str(out))
    assert code == 1 and any("other ids than it counted" in line for line in lines), lines
    for command in ("export", "classify"):
        code, lines = _cli(capsys, command, str(out), "--out", str(tmp_path / "x.parquet"))
        assert code == 2 and len(lines) == 1 and "not those its manifest counted" in lines[0], lines
    assert _encode_cli(capsys, made, out, "--layout", layout)[0] == 0
    assert _cli(capsys, "verify", str(out), "--data", str(made / "prepared"))[0] == 0


@pytest.mark.parametrize("layout", ["shards", "files"])
def test_units_with_foreign_ids_never_count(made, tmp_path, capsys, layout):
    out = _copy(made, layout, tmp_path / "s")
    if layout == "shards":
        table = _read_table(shard_files(out)[0])
        ids = table.column("id").to_numpy() + 1_000_000  # ids no row of the dataset has
        foreign = out / "shards" / "zz-foreign.arrow"
        _write_table(foreign, table.set_column(0, "id", pa.array(ids)))
    else:
        foreign = out / item_path(1_000_004, "npz")
        foreign.parent.mkdir(parents=True)
        shutil.copy(out / item_path(4, "npz"), foreign)
    code, listed = _cli(capsys, "verify", str(out), "--data", str(made / "prepared"))
    assert code == 1
    code, lines = _encode_cli(capsys, made, out, "--layout", layout)
    assert code == 0, lines
    assert json.loads((out / "manifest.json").read_text())["items"] == ROWS  # what belongs, no more
    assert not foreign.exists() and len(list((out / ".quarantine").iterdir())) == 1
    assert _cli(capsys, "verify", str(out), "--data", str(made / "prepared"))[0] == 0
    assert any(line.startswith(f"{foreign}: holds 1") for line in listed), listed  # verify named the unit


def test_the_manifest_paths_lead_to_the_model_and_data_from_any_working_directory(made, tmp_path, monkeypatch):
    from quackae.eval.probes import store_tokens

    monkeypatch.chdir(made)
    out = tmp_path / "s"
    _encode(Path("."), out)  # --model run1 and the data given relative to the working directory
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"] == str((made / "run1" / "tokenizer.json").resolve())
    assert manifest["dataset"] == str((made / "prepared").resolve())
    assert Path(manifest["checkpoint"]).is_absolute() and Path(manifest["checkpoint"]).samefile(
        made / "run1" / "checkpoints" / Path(manifest["checkpoint"]).name
    )
    ids = np.asarray(EncodingStore(out).ids())
    monkeypatch.chdir("/")
    tokens, source = store_tokens(out, ids, [{} for _ in ids])
    assert tokens is not None and source == f"{(made / 'prepared').resolve()}/dataset input_ids", source
    # a manifest an older quackae wrote, its paths relative to the store's parent folder, reads the same
    for key in ("tokenizer", "dataset", "checkpoint"):
        manifest[key] = os.path.relpath(manifest[key], tmp_path)
    (out / "manifest.json").write_text(json.dumps(manifest))
    tokens_again, source = store_tokens(out, ids, [{} for _ in ids])
    assert source.endswith("/dataset input_ids"), source
    (offsets, values), vocab = tokens
    (offsets_again, values_again), vocab_again = tokens_again
    assert np.array_equal(offsets_again, offsets) and np.array_equal(values_again, values) and vocab_again == vocab


@pytest.mark.parametrize(
    ("layout", "stray"),
    [("shards", "shards/notes.txt"), ("files", "0/0/1.NPZ"), ("files", "0/0/notes.txt"), ("files", "0/notes")],
)
def test_a_file_quackae_does_not_write_is_refused_alike_by_encode_export_and_verify(
    made, tmp_path, capsys, layout, stray
):
    out = _copy(made, layout, tmp_path / "s")
    if stray == "0/0/1.NPZ":
        (out / item_path(1, "npz")).rename(out / stray)  # a user's rename of item 1
    else:
        (out / stray).write_text("mine")
    before = (out / "manifest.json").read_text()
    code, lines = _encode_cli(capsys, made, out, "--layout", layout)
    assert code == 2 and len(lines) == 1 and f"it holds {out / stray}, which quackae does not write" in lines[0], lines
    assert (out / "manifest.json").read_text() == before and (out / stray).exists()
    code, lines = _cli(capsys, "export", str(out), "--out", str(tmp_path / "x.parquet"))
    assert code == 2 and len(lines) == 1, lines
    assert f"store {out} is not usable: it holds {out / stray}, which quackae does not write; move it" in lines[0]
    assert not (tmp_path / "x.parquet").exists()
    code, lines = _cli(capsys, "verify", str(out), "--data", str(made / "prepared"))
    assert code == 1 and f"{out / stray}: not something quackae writes in a store" in lines, lines


@pytest.mark.parametrize("damage", ["no manifest", "a shard copied", "incomplete"])
def test_a_store_export_and_classify_refuse_is_refused_in_one_line_with_no_warning_first(
    made, tmp_path, capsys, caplog, damage
):
    out = _copy(made, "shards", tmp_path / "s")
    if damage == "no manifest":
        (out / "manifest.json").unlink()
    elif damage == "a shard copied":
        shutil.copy(shard_files(out)[0], out / "shards" / "zz-copy.arrow")
    else:
        manifest = json.loads((out / "manifest.json").read_text())
        (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    for command in ("export", "classify"):
        caplog.clear()
        code, lines = _cli(capsys, command, str(out), "--out", str(tmp_path / "x.parquet"))
        assert code == 2 and len(lines) == 1 and f"error: store {out} " in lines[0], lines
        assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [], command
    caplog.clear()
    EncodingStore(out)  # a reader that opens the store anyway still hears that it is not whole
    assert [r.levelname for r in caplog.records] == ["WARNING"]
