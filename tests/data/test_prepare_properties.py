"""Property test: ``prepare`` on random rows never crashes, keeps or rejects every row exactly once, and
kept rows round-trip (id, and text through the tokenizer). The expected outcome of each row comes from
a slow, obvious reference written here."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quackae.core.errors import QuackError
from quackae.data.prepared import load_prepared
from quackae.data.tokenizer import decode
from quackae.stages.prepare import PrepareConfig, prepare

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=0, max_value=50),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([7.0, 2.0**63, 1e20, -3.0]),
    st.text(max_size=20),
    st.sampled_from(["12", " 13 ", "²", "--5", "٣٥", "-4", "9223372036854775808", "\ud800x", "", "  ", "[EOS]"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner))
ROW = st.one_of(
    st.fixed_dictionaries({}, optional={"id": VALUES, "text": VALUES, "label": VALUES}),
    st.fixed_dictionaries({"id": st.integers(0, 40), "text": st.text(min_size=1, max_size=30)}),
    st.binary(max_size=20).filter(lambda b: b"\n" not in b and b"\r" not in b),  # a raw line, maybe not JSON
    VALUES,  # valid JSON that is not an object
)


def reference_id(value: object) -> tuple[int | None, str | None]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, "missing id"
    if isinstance(value, bool):
        return None, "non-integer id"
    if isinstance(value, int):
        number = value
    elif isinstance(value, float):
        if math.isinf(value) or value != int(value):
            return None, "non-integer id"
        if abs(value) >= 2**53:
            return None, "id out of range"
        number = int(value)
    elif isinstance(value, str):
        body = value.strip()
        digits = body[1:] if body.startswith("-") else body
        if not digits or any(c not in "0123456789" for c in digits):
            return None, "non-integer id"
        number = int(body)
    else:
        return None, "non-integer id"
    if number < 0:
        return None, "negative id"
    if number >= 2**63:
        return None, "id out of range"
    return number, None


def reference_text(value: object) -> str | None:
    if value is None:
        return "null text"
    if not isinstance(value, str):
        return "non-string text"
    if not value.strip():
        return "empty text"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "invalid text (lone surrogate)"
    return None


def expected(lines: list[bytes]) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """(kept (id, text) in input order, rejected reasons counted) by the README's rules."""
    records, rejected = [], {}
    for line in lines:
        text = line.decode("utf-8")
        if not text.strip():
            continue  # a blank line is no row
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            rejected["malformed"] = rejected.get("malformed", 0) + 1
            continue
        if not isinstance(record, dict):
            rejected["malformed"] = rejected.get("malformed", 0) + 1
            continue
        records.append(record)
    has_ids = any("id" in r for r in records)
    kept, seen = [], set()
    for number, record in enumerate(records):
        reason = reference_text(record.get("text"))
        identifier = number
        if reason is None and has_ids:
            identifier, reason = reference_id(record.get("id"))
            if reason is None and identifier in seen:
                reason = "duplicate id"
        if reason is not None:
            rejected[reason] = rejected.get(reason, 0) + 1
            continue
        seen.add(identifier)
        kept.append((identifier, record["text"]))
    return kept, rejected


def _objects(lines: list[bytes]) -> list[object]:
    """The lines that parse as JSON (a dataset column cannot be named with a NUL character)."""
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            continue
    return parsed


def encode_row(row: object) -> bytes:
    return row if isinstance(row, bytes) else json.dumps(row).encode()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(rows=st.lists(ROW, max_size=12), bom=st.booleans())
def test_prepare_keeps_or_rejects_every_row_once(rows, bom):
    lines = [encode_row(row) for row in rows]
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "rows.jsonl"
        source.write_bytes((b"\xef\xbb\xbf" if bom else b"") + b"\n".join(lines) + b"\n")
        config = PrepareConfig(
            inputs=(str(source),), out=str(Path(tmp) / "out"), vocab_size=300, min_frequency=1, max_length=512
        )
        try:
            valid = [line.decode("utf-8") for line in lines]
        except UnicodeDecodeError:
            valid = None
        if valid is None:
            with pytest.raises(QuackError, match="is not UTF-8 text"):
                prepare(config)
            return
        kept, rejected = expected(lines)
        if not kept:  # one clear error: no rows, no text column at all, or every row rejected
            with pytest.raises(QuackError, match="no rows|no usable rows|--text-field 'text' is not a column"):
                prepare(config)
            return
        if any(isinstance(row, dict) and any("\x00" in key for key in row) for row in _objects(lines)):
            with pytest.raises(QuackError, match="has a NUL character in its name"):
                prepare(config)
            return
        summary = prepare(config)
        dataset, tokenizer, _ = load_prepared(config.out)
        assert summary["rows_kept"] == len(kept) == dataset.num_rows
        assert summary["rejected_total"] == sum(rejected.values())
        assert summary["rows_read"] == len(kept) + sum(rejected.values())
        got = dict(zip(dataset["id"], dataset["input_ids"], strict=True))
        assert sorted(got) == sorted(identifier for identifier, _ in kept)
        for identifier, text in kept:
            assert decode(tokenizer, got[identifier][:-1]) == text
        malformed = sum(n for reason, n in summary["rejected"].items() if reason.startswith("malformed JSON"))
        assert malformed == rejected.pop("malformed", 0)
        assert {k: v for k, v in summary["rejected"].items() if not k.startswith("malformed JSON")} == rejected
