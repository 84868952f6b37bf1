"""Every user mistake is one line on stderr and exit 2; a real bug stays a traceback; rows a user would
keep are kept (byte-order marks, ids as ASCII decimals in [0, 2**63), CSV records over several lines)."""

from __future__ import annotations

import copy
import errno
import json
import os
import re
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from quackae.cli.command import main, user_error
from quackae.core.errors import QuackError
from quackae.data.prepared import COMPLETE, load_prepared
from quackae.stages.prepare import PrepareConfig, prepare
from quackae.stages.train import TrainConfig, train

WORDS = "duck goose swan heron crane apple pear plum hammer saw drill".split()


def corpus(path: Path, rows: int = 48) -> Path:
    with path.open("w") as handle:
        for i in range(rows):
            words = [WORDS[(i * 5 + k * 3) % len(WORDS)] for k in range(2 + i % 4)]
            handle.write(json.dumps({"id": i, "key": 100 + i, "text": " ".join(words), "label": "ab"[i % 2]}) + "\n")
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rel")
    corpus(root / "c.jsonl")
    prepare(PrepareConfig(inputs=(str(root / "c.jsonl"),), out=str(root / "p"), vocab_size=300, min_frequency=1))
    config = TrainConfig(
        data=str(root / "p"),
        out=str(root / "run"),
        embed_size=8,
        hidden_size=8,
        batch_size=8,
        max_steps=3,
        val_check_interval=2,
        accelerator="cpu",
        devices="1",
    )
    train(config)
    checkpoints = root / "bad" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (root / "bad" / "tokenizer.json").write_bytes((root / "run" / "tokenizer.json").read_bytes())
    good = torch.load(root / "run/checkpoints/last.ckpt", weights_only=True)
    (checkpoints / "empty.ckpt").write_bytes(b"")
    unknown = copy.deepcopy(good)
    unknown["hyper_parameters"]["bogus"] = 1
    torch.save(unknown, checkpoints / "unknown.ckpt")
    missing = copy.deepcopy(good)
    missing["state_dict"].pop("start")
    torch.save(missing, checkpoints / "missing.ckpt")
    huge = copy.deepcopy(good)
    huge["hyper_parameters"]["num_embeddings"] = 2**40
    torch.save(huge, checkpoints / "huge.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": {}, "evil": _Evil()}, checkpoints / "evil.ckpt")
    classifier = root / "evilclf"
    (classifier / "checkpoints").mkdir(parents=True)
    (classifier / "checkpoints/best.ckpt").write_bytes((checkpoints / "evil.ckpt").read_bytes())
    (classifier / "classes.json").write_text('{"classes": ["a", "b"]}')
    (root / "afile").write_text("x")
    (root / "adir").mkdir()
    (root / "allbad.jsonl").write_text('{"id": 1, "text": ""}\n{"id": -1, "text": "x"}\n')
    return root


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


TRAIN = ["--embed-size", "8", "--hidden-size", "8", "--batch-size", "8", "--max-steps", "2"]

CASES = [
    (["train", "{r}/p", "--out", "{t}/o", *TRAIN, "--accelerator", "gpu"], "--accelerator gpu: .*sees no GPU"),
    (["encode", "{r}/p", "--model", "{r}/run", "--out", "{t}/s", "--accelerator", "cuda"], "--accelerator cuda"),
    (["train", "{r}/p", "--out", "{t}/o", *TRAIN, "--max-time", "garbage"], "--max-time must be DD:HH:MM:SS"),
    (["train", "{r}/p", "--out", "{t}/o", *TRAIN, "--max-time", "2m"], "--max-time must be DD:HH:MM:SS"),
    (["train", "{r}/p", "--out", "{t}/o", *TRAIN, "--devices", "-3"], "--devices must be auto"),
    (["prepare", "{r}/c.jsonl", "--out", "{t}/o", "--vocab-size", "100000000000000000000"], "--vocab-size must be at"),
    (["prepare", "{r}/c.jsonl", "--out", "{t}/o", "--id-field", "key"], "column 'id' clashes .*--id-field id"),
    (["encode", "{r}/p", "--model", "{r}/bad/checkpoints/empty.ckpt", "--out", "{t}/s"], "is empty \\(0 bytes\\)"),
    (["encode", "{r}/p", "--model", "{r}/bad/checkpoints/unknown.ckpt", "--out", "{t}/s"], "does not know \\(bogus\\)"),
    (["encode", "{r}/p", "--model", "{r}/bad/checkpoints/missing.ckpt", "--out", "{t}/s"], "missing weights start"),
    (["encode", "{r}/p", "--model", "{r}/bad/checkpoints/huge.ckpt", "--out", "{t}/s"], "embed.weight has shape"),
    (["reconstruct", "--model", "{r}/bad/checkpoints/evil.ckpt", "hi"], "cannot be loaded safely: .*GLOBAL"),
    (
        ["classify", "{r}/nostore", "--predict", "{r}/evilclf", "--out", "{t}/c"],
        "evilclf/.*best.ckpt cannot be .*GLOBAL",
    ),
    (["prepare", "{r}/c.jsonl", "--out", "{r}/afile"], "--out .*afile is a file"),
    (["train", "{r}/p", "--out", "{r}/afile", *TRAIN], "--out .*afile is a file"),
    (
        ["encode", "{r}/p", "--model", "{r}/run", "--out", "{r}/afile"],
        "--out .*afile is an existing file, not a store folder",
    ),
    (["prepare", "{r}/adir", "--out", "{t}/o"], "input .*adir is a directory"),
    (["train", "{r}/c.jsonl", "--out", "{t}/o", *TRAIN], "c.jsonl is a file"),
    (["prepare", "{r}/allbad.jsonl", "--out", "{t}/o"], "no usable rows .*2 of 2 rows rejected"),
    (["train", "{r}/p", "--out", "{t}/o", "--max-steps", "x"], "invalid int value: 'x' \\(see quackae train --help\\)"),
]


@pytest.mark.parametrize(("args", "message"), CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in CASES])
def test_user_mistakes_are_one_line_and_exit_2(ws, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    try:
        code = main([a.format(r=ws, t=tmp_path) for a in args])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(err) == 1, err
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "PWNED").exists()


def test_a_real_bug_stays_a_traceback(monkeypatch, tmp_path):
    import quackae.stages.prepare

    def broken(config):
        raise KeyError("a bug")

    monkeypatch.setattr(quackae.stages.prepare, "prepare", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["prepare", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "o")])


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (QuackError("bad flag\n  detail"), "bad flag detail"),
        (ValueError("--x must be positive"), "--x must be positive"),
        (OSError(errno.ENOSPC, "No space left on device", "/d/f"), "No space left on device: /d/f"),
        (PermissionError(errno.EACCES, "Permission denied", "/d"), "Permission denied: /d"),
        (FileExistsError(errno.EEXIST, "File exists", "/d"), "File exists: /d (choose another path)"),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "/d"), "Is a directory: /d"),
        (OSError(errno.EIO, "Input/output error", "/d"), None),
        (RuntimeError("shape mismatch"), None),
        (KeyError("k"), None),
        (TypeError("bad call"), None),
    ],
)
def test_user_error_separates_mistakes_from_bugs(error, expected):
    assert user_error(error) == expected


def test_lightning_misconfiguration_is_a_user_error():
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    assert user_error(MisconfigurationException("no such\naccelerator")) == "no such accelerator"


# ---------------------------------------------------------------- prepare: rows a user would keep


def _prepare(tmp_path: Path, source: Path, **kwargs) -> tuple[dict, datasets.Dataset]:
    out = tmp_path / "out"
    summary = prepare(PrepareConfig(inputs=(str(source),), out=str(out), vocab_size=300, min_frequency=1, **kwargs))
    return summary, load_prepared(out)[0]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "txt"])
def test_a_byte_order_mark_loses_no_row(tmp_path, fmt):
    texts = ["first row", "second row", "third row"]
    body = {
        "jsonl": "\n".join(json.dumps({"id": i, "text": t}) for i, t in enumerate(texts)) + "\n",
        "json": json.dumps([{"id": i, "text": t} for i, t in enumerate(texts)]),
        "csv": "id,text\n" + "".join(f"{i},{t}\n" for i, t in enumerate(texts)),
        "txt": "\n".join(texts) + "\n",
    }[fmt]
    source = tmp_path / f"bom.{fmt}"
    source.write_bytes(b"\xef\xbb\xbf" + body.encode())
    summary, dataset = _prepare(tmp_path, source)
    assert summary["rows_kept"] == 3 and summary["rejected_total"] == 0, summary
    assert dataset["id"] == [0, 1, 2]


ID_CASES = [
    (0, None),
    (2**63 - 1, None),
    (2**63, "id out of range"),
    (2**64 + 5, "id out of range"),
    (1e20, "id out of range"),
    (7.0, None),
    (7.5, "non-integer id"),
    ("42", None),
    (" 43 ", None),
    ("²", "non-integer id"),
    ("--5", "non-integer id"),
    ("٣٥", "non-integer id"),
    ("-5", "negative id"),
    ("9223372036854775808", "id out of range"),
    (True, "non-integer id"),
    ([1], "non-integer id"),
    (None, "missing id"),
]


def test_ids_are_ascii_decimal_integers_below_2_to_63(tmp_path):
    source = tmp_path / "ids.jsonl"
    source.write_text(
        "".join(json.dumps({"id": value, "text": f"text {k}"}) + "\n" for k, (value, _) in enumerate(ID_CASES))
    )
    summary, dataset = _prepare(tmp_path, source)
    rejected = {e["line"]: e["reason"] for e in summary["rejected_examples"]}
    for line, (value, reason) in enumerate(ID_CASES, start=1):
        assert rejected.get(line) == reason, (value, rejected.get(line))
    assert sorted(dataset["id"]) == sorted([0, 2**63 - 1, 7, 42, 43])


def test_uint64_parquet_ids(tmp_path):
    source = tmp_path / "ids.parquet"
    table = pa.table({"id": pa.array([1, 2**63 - 1, 2**63, 2**64 - 1], type=pa.uint64()), "text": ["a b"] * 4})
    pq.write_table(table, source)
    summary, dataset = _prepare(tmp_path, source)
    assert summary["rejected"] == {"id out of range": 2}
    assert [e["line"] for e in summary["rejected_examples"]] == [3, 4]
    assert dataset["id"] == [1, 2**63 - 1]


def test_csv_rejections_name_the_physical_line(tmp_path):
    source = tmp_path / "multi.csv"
    source.write_text('id,text\n1,"one\ntwo"\n2,\n\n3,"a\n\nb"\n4,""\n5,fine\n')
    summary, dataset = _prepare(tmp_path, source)
    assert {e["line"]: e["reason"] for e in summary["rejected_examples"]} == {4: "null text", 9: "null text"}
    assert dataset["id"] == [1, 3, 5]


def test_prepare_output_has_a_marker_that_readers_require(tmp_path):
    source = corpus(tmp_path / "c.jsonl", rows=12)
    out = tmp_path / "out"
    prepare(PrepareConfig(inputs=(str(source),), out=str(out), vocab_size=300, min_frequency=1))
    assert (out / COMPLETE).is_file()
    assert sorted(p.name for p in out.iterdir()) == sorted([COMPLETE, "dataset", "prepare.json", "tokenizer.json"])
    assert not list(tmp_path.glob(".out*")), "no staging folder is left behind"
    (out / COMPLETE).unlink()  # as a stopped prepare or an older quackae leaves it
    with pytest.raises(QuackError, match="no COMPLETE marker.*run quackae prepare --out .* again"):
        load_prepared(out)
    # and prepare replaces such a folder whole
    prepare(PrepareConfig(inputs=(str(source),), out=str(out), vocab_size=300, min_frequency=1))
    assert load_prepared(out)[0].num_rows == 12


def test_prepare_will_not_replace_a_folder_of_other_files(tmp_path):
    source = corpus(tmp_path / "c.jsonl", rows=12)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(QuackError, match="holds files prepare did not write \\(notes.txt\\)"):
        prepare(PrepareConfig(inputs=(str(source),), out=str(tmp_path / "mine"), vocab_size=300, min_frequency=1))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
