from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import pytest

from quackae.cli.command import main
from quackae.core.errors import QuackError, StrictError
from quackae.data.tokenizer import load_tokenizer
from quackae.stages.prepare import PrepareConfig, prepare

BAD_LINES = [
    '{"id": 1, "text": "hello world", "label": "a"}',
    '{"id": 2, "text": "", "label": "b"}',
    "{not json",
    '{"id": 3, "text": null}',
    '{"id": 4, "text": 42}',
    '{"text": "no id here"}',
    '{"id": -5, "text": "negative"}',
    '{"id": "abc", "text": "not an integer"}',
    '{"id": 1, "text": "duplicate"}',
    '{"id": 6, "text": "fine again", "label": "b"}',
    '{"id": 7.5, "text": "fractional"}',
]

WORDS = "the quick brown fox jumps over the lazy dog while a stitch in time saves nine".split()


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def corpus_lines(count: int) -> list[str]:
    lines = []
    for i in range(count):
        words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(3 + i % 9)]
        lines.append(json.dumps({"id": 1000 + i, "text": " ".join(words), "label": ["x", "y", "z"][i % 3]}))
    return lines


def config(tmp_path: Path, *inputs: Path, **kwargs) -> PrepareConfig:
    values = {"out": str(tmp_path / "out"), "vocab_size": 300, "min_frequency": 1}
    values.update(kwargs)
    return PrepareConfig(inputs=tuple(str(p) for p in inputs), **values)


def test_bad_rows_are_counted_and_listed(tmp_path):
    source = write_jsonl(tmp_path / "bad.jsonl", BAD_LINES)
    summary = prepare(config(tmp_path, source))
    assert summary["rows_read"] == 11 and summary["rows_kept"] == 2
    assert summary["rejected"] == {
        "duplicate id": 1,
        "empty text": 1,
        "malformed JSON (Expecting property name enclosed in double quotes)": 1,
        "missing id": 1,
        "negative id": 1,
        "non-integer id": 2,
        "non-string text": 1,
        "null text": 1,
    }
    lines = {(e["line"], e["reason"]) for e in summary["rejected_examples"]}
    assert (2, "empty text") in lines and (9, "duplicate id") in lines and (11, "non-integer id") in lines
    assert all(e["file"] == str(source) for e in summary["rejected_examples"])
    written = json.loads((tmp_path / "out" / "prepare.json").read_text())
    assert written["rejected"] == summary["rejected"]
    dataset = datasets.load_from_disk(str(tmp_path / "out" / "dataset"))
    assert dataset.column_names == ["id", "input_ids", "length", "text", "truncated", "label"]
    assert dataset["id"] == [1, 6] and dataset["label"] == ["a", "b"]
    assert all(ids[-1] == 3 and len(ids) == n for ids, n in zip(dataset["input_ids"], dataset["length"], strict=True))


def test_strict_refuses_rejected_rows(tmp_path, capsys):
    source = write_jsonl(tmp_path / "bad.jsonl", BAD_LINES)
    with pytest.raises(StrictError, match="9 of 11 rows rejected"):
        prepare(config(tmp_path, source, strict=True))
    code = main(["prepare", str(source), "--out", str(tmp_path / "o"), "--vocab-size", "300", "--strict"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("quackae prepare: error: 9 of 11 rows rejected")
    assert f"first at {source}:2 (empty text)" in err[0]


@pytest.mark.parametrize(
    ("name", "content", "flags", "message"),
    [
        ("missing.jsonl", None, [], "input file .*missing.jsonl does not exist"),
        ("data.xyz", "hello", [], "cannot tell the format of .*data.xyz.*--format"),
        ("data.parquet", "not parquet at all", [], "cannot read .*data.parquet as parquet"),
        ("data.jsonl", '{"id": 1, "body": "x"}', [], "--text-field 'text' is not a column of .*columns: body, id"),
        ("data.jsonl", '{"id": 1, "text": "x"}', ["--max-length", "1"], "--max-length must be at least 2"),
    ],
)
def test_user_mistakes_are_one_line_errors(tmp_path, capsys, name, content, flags, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content + "\n")
    code = main(["prepare", str(path), "--out", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err
    assert __import__("re").search(message, err[0]), err[0]


def test_same_input_gives_identical_output(tmp_path):
    source = write_jsonl(tmp_path / "c.jsonl", corpus_lines(300))
    prepare(config(tmp_path, source, out=str(tmp_path / "a")))
    prepare(config(tmp_path, source, out=str(tmp_path / "b")))
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()
    a = datasets.load_from_disk(str(tmp_path / "a/dataset"))
    b = datasets.load_from_disk(str(tmp_path / "b/dataset"))
    assert a.to_dict() == b.to_dict()
    arrow_a = sorted((tmp_path / "a/dataset").glob("*.arrow"))
    arrow_b = sorted((tmp_path / "b/dataset").glob("*.arrow"))
    assert [p.read_bytes() for p in arrow_a] == [p.read_bytes() for p in arrow_b]


def test_truncation_is_counted(tmp_path):
    source = write_jsonl(tmp_path / "c.jsonl", corpus_lines(50))
    summary = prepare(config(tmp_path, source, max_length=4))
    dataset = datasets.load_from_disk(str(tmp_path / "out/dataset"))
    assert max(dataset["length"]) == 4 and summary["lengths"]["max"] == 4
    tokenizer = load_tokenizer(tmp_path / "out")
    texts = [json.loads(line)["text"] for line in corpus_lines(50)]
    expected = sum(1 for t in texts if len(tokenizer.encode(t, add_special_tokens=False).ids) > 3)
    assert summary["truncated"] == expected > 0


@pytest.mark.parametrize("fmt", ["csv", "txt", "parquet", "json"])
def test_other_formats_and_row_number_ids(tmp_path, fmt):
    texts = ["first text", "second text here", "", "fourth"]
    path = tmp_path / f"data.{fmt}"
    if fmt == "txt":
        path.write_text("\n".join(texts) + "\n")
    else:
        table = datasets.Dataset.from_dict({"text": texts, "topic": ["a", "b", "c", "d"]})
        {"csv": table.to_csv, "parquet": table.to_parquet}.get(
            fmt,
            lambda p: path.write_text(json.dumps([dict(text=t, topic=k) for t, k in zip(texts, "abcd", strict=True)])),
        )(str(path))
    summary = prepare(config(tmp_path, path, num_proc=2 if fmt == "csv" else 1))
    dataset = datasets.load_from_disk(str(tmp_path / "out/dataset"))
    assert summary["ids"] == "row numbers"
    assert dataset["id"] == [0, 1, 3]
    # an empty CSV cell reads as a missing value
    assert summary["rejected"] == ({"null text": 1} if fmt == "csv" else {"empty text": 1})
    expected_line = {"csv": 4, "txt": 3, "parquet": 3, "json": 3}[fmt]
    assert summary["rejected_examples"][0]["line"] == expected_line


def test_existing_tokenizer_is_reused(tmp_path):
    source = write_jsonl(tmp_path / "c.jsonl", corpus_lines(100))
    prepare(config(tmp_path, source, out=str(tmp_path / "a")))
    prepare(
        config(tmp_path, source, out=str(tmp_path / "b"), tokenizer=str(tmp_path / "a/tokenizer.json"), vocab_size=999)
    )
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()
    with pytest.raises(QuackError, match="does not exist"):
        prepare(config(tmp_path, source, tokenizer=str(tmp_path / "nope.json")))


@pytest.mark.parametrize("kind", ["fifo", "loop"])
def test_an_input_that_is_no_regular_file_is_named_for_what_it_is(tmp_path, kind, capsys):
    from quackae.cli import main

    path = tmp_path / "in.jsonl"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        os.symlink(path, path)  # a link to itself
    assert main(["prepare", str(path), "--out", str(tmp_path / "p")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    expected = "is a FIFO, not a file" if kind == "fifo" else "is a symbolic-link loop, not a file"
    assert f"input file {path} {expected}" in line, line
