"""Every file a store holds, crafted by a hostile user: one line naming the file (exit 2), a verify problem, or a
unit quarantined and redone by a rerun; never a traceback, a hang or an allocation the file declares."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import struct
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from test_store import ROWS, _corpus, _run

from quackae import EncodingStore
from quackae.cli.command import main
from quackae.core.errors import QuackError
from quackae.stages.encode import EncodeConfig, encode
from quackae.stages.prepare import PrepareConfig, prepare
from quackae.store.items import item_path, npz_bytes, read_item
from quackae.store.shards import shard_files


def build_inputs(root: Path, stores_of: tuple[int, ...] = (1,)) -> Path:
    """A prepared folder, two runs (``run1``, ``run2``) and, for each run in ``stores_of``, one complete store per
    layout to copy (``ref-LAYOUT`` of run 1, ``ref2-LAYOUT`` of run 2)."""
    prepare(PrepareConfig(inputs=(str(_corpus(root / "c.jsonl")),), out=str(root / "prepared"), vocab_size=300))
    _run(root, root / "prepared", 1)
    _run(root, root / "prepared", 2)
    for seed in stores_of:
        for layout in ("shards", "files"):
            _encode(root, root / f"ref{'' if seed == 1 else seed}-{layout}", seed=seed, layout=layout)
    return root


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    return build_inputs(tmp_path_factory.mktemp("hostile"))


def _encode(root: Path, out: Path, seed: int = 1, **flags) -> dict:
    config = {"batch_size": 8, "shard_size": 16, "accelerator": "cpu", "devices": "1", **flags}
    return encode(EncodeConfig(data=str(root / "prepared"), model=str(root / f"run{seed}"), out=str(out), **config))


def _encode_args(made: Path, out: Path) -> list[str]:
    return [str(made / "prepared"), "--model", str(made / "run1"), "--out", str(out)]


def _copy(made: Path, layout: str, to: Path) -> Path:
    shutil.copytree(made / f"ref-{layout}", to)
    return to


@contextlib.contextmanager
def _no_hang(seconds: int = 60):
    """Turn a call that blocks (a FIFO opened for reading) into a failure instead of a stuck suite."""

    def stop(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _cli(capsys, *args: str) -> tuple[int, list[str]]:
    with _no_hang():
        code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines() + captured.out.strip().splitlines()


def _write_table(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _read_table(path: Path) -> pa.Table:
    """A shard read into memory (not mapped: the tests write the result back over the same file)."""
    return pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all()


def _with_provenance(table: pa.Table, raw: bytes) -> pa.Table:
    return table.replace_schema_metadata({b"quackae": raw})


def _rows_declared(path: Path, rows: int) -> None:
    """Patch every length field that says the shard's row count to ``rows`` (a file declaring rows it lacks)."""
    data = bytearray(path.read_bytes())
    count = _read_table(path).num_rows
    needle = struct.pack("<q", count)
    spots = [k for k in range(len(data) - 7) if data[k : k + 8] == needle]
    assert spots
    for k in spots:
        data[k : k + 8] = struct.pack("<q", rows)
    path.write_bytes(bytes(data))


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _directory(path: Path) -> None:
    path.mkdir()
    (path / "inside").write_bytes(b"x")


def _loop(path: Path) -> None:
    path.symlink_to(path.name)


def _socket(path: Path) -> None:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()


SHARD_CRAFTS = {
    "provenance not JSON": lambda p: _write_table(p, _with_provenance(_read_table(p), b"{not json")),
    "provenance a JSON array": lambda p: _write_table(p, _with_provenance(_read_table(p), b"[1, 2]")),
    "provenance nested too deep": lambda p: _write_table(p, _with_provenance(_read_table(p), b"[" * 100_000)),
    "2**40 rows declared": lambda p: _rows_declared(p, 2**40),
    "zero bytes": lambda p: p.write_bytes(b""),
    "cut short": lambda p: p.write_bytes(p.read_bytes()[:300]),
    "not Arrow": lambda p: p.write_bytes(b"PAR1" + b"\0" * 200),
    "null ids": lambda p: _write_table(
        p, _read_table(p).set_column(0, "id", pa.array([None] * _read_table(p).num_rows, pa.int64()))
    ),
    "float64 encodings": lambda p: _write_table(
        p,
        _read_table(p).set_column(
            1, "encoding", _read_table(p).column("encoding").cast(pa.list_(pa.float64(), 16)).combine_chunks()
        ),
    ),
}
NODE_CRAFTS = {"FIFO": _fifo, "directory": _directory, "symlink loop": _loop, "socket": _socket}


@pytest.mark.parametrize("craft", [*SHARD_CRAFTS, *NODE_CRAFTS])
def test_a_crafted_shard_is_one_line_then_quarantined(made, tmp_path, capsys, craft):
    out = _copy(made, "shards", tmp_path / "s")
    victim = shard_files(out)[2]
    if craft in NODE_CRAFTS:
        victim.unlink()
        NODE_CRAFTS[craft](victim)
    else:
        SHARD_CRAFTS[craft](victim)
    code, lines = _cli(capsys, "verify", str(out))
    assert code == 1 and any(line.startswith(f"{victim}: does not parse") for line in lines), lines
    code, lines = _cli(capsys, "export", str(out), "--out", str(tmp_path / "e.parquet"))
    assert code == 2 and len(lines) == 1 and str(victim) in lines[0], lines
    if craft not in ("provenance not JSON", "provenance a JSON array", "provenance nested too deep"):
        with pytest.raises(QuackError, match=str(victim)), _no_hang():
            EncodingStore(out)  # a shard it cannot map is refused when the store opens
    with _no_hang():
        summary = _encode(made, out)
    assert summary["items_written"] == 16 and summary["items_in_store"] == ROWS
    assert len(list((out / ".quarantine").iterdir())) == 1
    code, lines = _cli(capsys, "verify", str(out), "--data", str(made / "prepared"))
    assert code == 0, lines


def _member(name: str, array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _npz(members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _huge_header() -> bytes:
    """An encoding member whose header declares 2**40 floats and holds four."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2**40,)})
    return header.getvalue() + b"\0" * 16


def _deflate_bomb() -> bytes:
    members = {"encoding.npy": b"\0" * (80 << 20), "metadata.npy": _member("m", np.array("{}"))}
    return _npz(members, zipfile.ZIP_DEFLATED)  # 80 MB of zeros in about 80 KB


def _item(encoding: object = None, metadata: object = None, provenance: bytes | None = None) -> bytes:
    members = {
        "encoding.npy": _member("e", np.ones(16, np.float32) if encoding is None else encoding),
        "metadata.npy": _member("m", np.array('{"id": 4}') if metadata is None else metadata),
    }
    if provenance is not None:
        members["provenance.npy"] = _member("p", np.array(provenance))
    return _npz(members)


ITEM_CRAFTS = {
    "zero bytes": lambda p: b"",
    "cut short": lambda p: p.read_bytes()[:100],
    "not a zip": lambda p: b"\x93NUMPY garbage" * 10,
    "2**40 floats declared": lambda p: _npz({"encoding.npy": _huge_header()}),
    "a pickled member": lambda p: _item(encoding=np.array([{"a": 1}], dtype=object)),
    "no metadata member": lambda p: _npz({"encoding.npy": _member("e", np.ones(16, np.float32))}),
    "metadata not JSON": lambda p: _item(metadata=np.array("{not json")),
    "metadata a JSON array": lambda p: _item(metadata=np.array("[1, 2]")),
    "provenance a JSON array": lambda p: _item(provenance=b"[1, 2]"),
    "text encodings": lambda p: _item(encoding=np.array(["1.0"] * 16)),
    "a deflate bomb": lambda p: _deflate_bomb(),
}


@pytest.mark.parametrize("craft", [*ITEM_CRAFTS, *NODE_CRAFTS])
def test_a_crafted_item_is_one_line_then_quarantined(made, tmp_path, capsys, craft):
    out = _copy(made, "files", tmp_path / "s")
    victim = out / item_path(4, "npz")
    if craft in NODE_CRAFTS:
        victim.unlink()
        NODE_CRAFTS[craft](victim)
    else:
        victim.write_bytes(ITEM_CRAFTS[craft](victim))
    code, lines = _cli(capsys, "verify", str(out))
    assert code == 1 and any(line.startswith(f"{victim}: does not parse") for line in lines), lines
    with pytest.raises(QuackError, match=str(victim)), _no_hang():
        read_item(victim)
    with pytest.raises(QuackError, match=str(victim)), _no_hang():
        EncodingStore(out)[4]
    code, lines = _cli(capsys, "export", str(out), "--out", str(tmp_path / "e.parquet"))
    assert code == 2 and len(lines) == 1 and str(victim) in lines[0], lines
    with _no_hang():
        summary = _encode(made, out, layout="files")
    assert summary["items_written"] == 1 and summary["items_in_store"] == ROWS
    assert len(list((out / ".quarantine").iterdir())) == 1
    assert _cli(capsys, "verify", str(out), "--data", str(made / "prepared"))[0] == 0


MANIFEST_CRAFTS = {
    "empty": lambda p: p.write_bytes(b""),
    "cut short": lambda p: p.write_bytes(p.read_bytes()[:50]),
    "not JSON": lambda p: p.write_text("{not json"),
    "a JSON array": lambda p: p.write_text("[1, 2]"),
    "not UTF-8": lambda p: p.write_bytes(b'{"a": "\xff"}'),
    "nested too deep": lambda p: p.write_text("[" * 100_000),
}


@pytest.mark.parametrize("craft", [*MANIFEST_CRAFTS, *NODE_CRAFTS])
def test_a_crafted_manifest_is_one_line_naming_it(made, tmp_path, capsys, craft):
    out = _copy(made, "shards", tmp_path / "s")
    manifest = out / "manifest.json"
    if craft in NODE_CRAFTS:
        manifest.unlink()
        NODE_CRAFTS[craft](manifest)
    else:
        MANIFEST_CRAFTS[craft](manifest)
    flags = ["--accelerator", "cpu", "--devices", "1", "--batch-size", "8", "--shard-size", "16"]
    code, lines = _cli(capsys, "encode", *_encode_args(made, out), *flags)
    assert code == 2 and len(lines) == 1 and str(manifest) in lines[0], lines
    code, lines = _cli(capsys, "verify", str(out))
    assert code == 1 and any(str(manifest) in line for line in lines[:-1]), lines
    code, lines = _cli(capsys, "export", str(out), "--out", str(tmp_path / "e.parquet"))
    assert code == 2 and len(lines) == 1 and str(manifest) in lines[0], lines


@pytest.mark.parametrize("craft", ["FIFO", "directory", "symlink loop", "socket", "symlink to a file"])
def test_the_lock_file_of_another_kind_is_one_line(made, tmp_path, capsys, craft):
    out = _copy(made, "shards", tmp_path / "s")
    lock = out / ".lock"
    lock.unlink(missing_ok=True)
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    if craft == "symlink to a file":
        lock.symlink_to(precious)
    else:
        NODE_CRAFTS[craft](lock)
    flags = ["--accelerator", "cpu", "--devices", "1"]
    code, lines = _cli(capsys, "encode", *_encode_args(made, out), *flags)
    assert code == 2 and len(lines) == 1 and str(lock) in lines[0], lines
    assert precious.read_text() == "keep me"  # never truncated through the link


@pytest.mark.parametrize("name", [".quarantine", ".staging", "shards"])
@pytest.mark.parametrize("craft", ["a file", "FIFO"])
def test_a_store_folder_of_another_kind_is_one_line(made, tmp_path, capsys, name, craft):
    out = _copy(made, "files", tmp_path / "s")
    shutil.rmtree(out / name, ignore_errors=True)
    if craft == "FIFO":
        os.mkfifo(out / name)
    else:
        (out / name).write_text("x")
    flags = ["--accelerator", "cpu", "--devices", "1", "--layout", "files"]
    code, lines = _cli(capsys, "encode", *_encode_args(made, out), *flags)
    assert code == 2 and len(lines) == 1 and f"{out / name} is" in lines[0], lines
    code, lines = _cli(capsys, "verify", str(out))
    assert code == 1 and any(line.startswith(f"{out / name}: is") for line in lines), lines


def test_items_carry_their_provenance_and_numpy_reads_them_as_savez_writes_them(made):
    path = made / "ref-files" / item_path(4, "npz")
    manifest = json.loads((made / "ref-files" / "manifest.json").read_text())
    with np.load(path, allow_pickle=False) as item:
        assert item.files == ["encoding", "metadata", "provenance"]
        provenance = json.loads(item["provenance"].item())
    keys = ("checkpoint_sha256", "tokenizer_sha256", "dataset_fingerprint", "layout", "encoding_size", "selection")
    assert all(provenance[k] == manifest[k] for k in keys)
    encoding = np.arange(4, dtype=np.float32)
    reference = io.BytesIO()
    np.savez(reference, encoding=encoding, metadata=np.array('{"id": 1}'), provenance=np.array(b'{"a": 1}'))
    ours = zipfile.ZipFile(io.BytesIO(npz_bytes(encoding, '{"id": 1}', b'{"a": 1}')))
    theirs = zipfile.ZipFile(io.BytesIO(reference.getvalue()))
    assert ours.namelist() == theirs.namelist() and all(ours.read(n) == theirs.read(n) for n in ours.namelist())


@pytest.mark.parametrize("command", ["verify", "export", "classify"])
def test_the_fix_for_a_manifest_that_is_not_a_file_fits_the_command_that_prints_it(made, tmp_path, capsys, command):
    out = _copy(made, "shards", tmp_path / "s")
    (out / "manifest.json").unlink()
    (out / "manifest.json").symlink_to("/dev/zero")
    extra = {"verify": [], "export": ["--out", str(tmp_path / "e.parquet")]}
    args = extra.get(command, ["--label-field", "label", "--out", str(tmp_path / "c")])
    code, lines = _cli(capsys, command, str(out), *args)
    line = next(line for line in lines if "manifest.json" in line)
    assert code in (1, 2) and (
        f"{out / 'manifest.json'} is a character device, not a file; replace the store with quackae encode --out "
        f"{out} --overwrite" in line
    ), lines
