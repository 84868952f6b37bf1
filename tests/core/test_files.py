"""``quackae.core.files``: every wrong kind of file a stage may be handed is one line naming it, never a hang."""

from __future__ import annotations

import os

import pytest

from quackae.core.errors import QuackError
from quackae.core.files import kind_of, read_bytes, read_json, read_text, regular_file


def test_regular_file_and_its_contents(tmp_path):
    file = tmp_path / "a.json"
    file.write_text('{"a": 1}')
    assert regular_file(file) == file
    assert read_json(file) == {"a": 1}
    assert read_text(file) == '{"a": 1}'
    link = tmp_path / "link.json"
    link.symlink_to(file)
    assert read_json(link) == {"a": 1}


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: os.mkfifo(p), "is a FIFO"),
        (lambda p: (p.symlink_to(p.with_name("loop2")), p.with_name("loop2").symlink_to(p)), "symbolic-link loop"),
        (lambda p: p.write_bytes(b""), "is empty"),
        (lambda p: p.write_bytes(b"   \n"), "is empty"),
        (lambda p: p.write_bytes(b'{"a": '), "is not valid JSON"),
        (lambda p: p.write_bytes(b"\xff\xfe{}"), "is not UTF-8"),
        (lambda p: p.write_bytes(b"[1, 2]"), "holds a JSON array, not a JSON object"),
        (lambda p: p.write_bytes(b"null"), "holds a JSON null, not a JSON object"),
        (lambda p: p.write_bytes(b"[" * 100_000 + b"]" * 100_000), "not valid JSON"),
    ],
)
def test_every_wrong_file_is_one_line_naming_it(tmp_path, make, words):
    path = tmp_path / "manifest.json"
    make(path)
    with pytest.raises(QuackError, match=words) as caught:
        read_json(path, "store manifest", "rerun quackae encode")
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and message.endswith("rerun quackae encode")


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "x.arrow"
    os.mkfifo(fifo)
    assert kind_of(fifo) == "a FIFO"
    with pytest.raises(QuackError, match="is a FIFO"):
        read_bytes(fifo)  # an open for reading would wait for a writer forever
    with pytest.raises(QuackError, match="is a FIFO"):
        regular_file(fifo, "shard")


def test_a_file_over_the_limit_is_refused(tmp_path):
    big = tmp_path / "big.json"
    big.write_bytes(b" " * 2000)
    with pytest.raises(QuackError, match="bytes"):
        read_bytes(big, limit=1000)


def test_expected_types(tmp_path):
    file = tmp_path / "c.json"
    file.write_text("[1, 2]")
    assert read_json(file, expect=list) == [1, 2]
    with pytest.raises(QuackError, match="not a JSON object or array"):
        file.write_text('"x"')
        read_json(file, expect=(dict, list))


@pytest.mark.parametrize("kind", ["a FIFO", "a symbolic-link loop", "a file"])
def test_an_input_of_another_kind_is_named_as_what_it_is_not_as_missing(tmp_path, capsys, kind):
    from quackae import EncodingStore
    from quackae.cli import main

    path = tmp_path / "thing"
    if kind == "a FIFO":
        os.mkfifo(path)
    elif kind == "a symbolic-link loop":
        os.symlink(tmp_path / "other", path)
        os.symlink(path, tmp_path / "other")
    else:
        path.write_text("{}\n")
    commands = [
        (["verify", str(path)], f"encoding store {path} is {kind}, not a store folder; pass the folder"),
        (["export", str(path), "--out", str(tmp_path / "x.parquet")], f"encoding store {path} is {kind}, not a"),
        (["train", str(path), "--out", str(tmp_path / "r")], f"prepared data directory {path} is {kind}, not a folder"),
    ]
    if kind != "a file":
        command = ["prepare", str(path), "--format", "jsonl", "--out", str(tmp_path / "p")]
        commands.append((command, f"input file {path} is {kind}, not a file"))
    for args, words in commands:
        assert main(args) == 2, args
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(err) == 1 and words in err[0], (args, err)
    with pytest.raises(QuackError, match=f"encoding store {path} is {kind}, not a store folder"):
        EncodingStore(path)
