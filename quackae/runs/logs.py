"""A RUN's metrics history: one folder per start of the training, joined into ``RUN/metrics.csv``.

Each start of a run (the first, and each ``--resume`` into it) logs into ``RUN/logs/attempt-N/``
(Lightning's CSV logger) and records the step it starts at in ``RUN/logs/attempt-N.json``.
``merge_metrics`` joins them in step order. Every file read here is read whole through
``quackae.core.files`` and checked: a damaged start record is one ``QuackError`` naming it, and a damaged
``metrics.csv`` of one start (Lightning rewrites it in place, so a kill can cut it) is left out of the
join with a warning naming it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from pathlib import Path

from quackae.core.atomic import write_atomic
from quackae.core.errors import QuackError
from quackae.core.files import read_json, read_text

log = logging.getLogger(__name__)

# The largest metrics.csv read whole (about five million logged rows).
MAX_METRICS_FILE = 1 << 30

_FIX = "repair or delete it (its folder's metrics are then left out), or choose another --out"


def _numbered(logs: Path) -> list[tuple[int, Path]]:
    """``(number, RUN/logs/attempt-N)`` of every start of the run so far, in order."""
    found = {}
    for path in logs.glob("attempt-*"):
        number = path.name.removeprefix("attempt-").removesuffix(".json")
        if number.isdigit():
            found[int(number)] = logs / f"attempt-{number}"
    return sorted(found.items())


def attempts(run: Path) -> list[tuple[Path, int]]:
    """``(RUN/logs/attempt-N, the step it started at)`` of every start of the run, in order.

    A start's record must be a JSON object whose ``start_step`` is a whole number of at least 0; a
    missing record counts as a start at step 0 (a start killed before it wrote one).
    """
    found = []
    for _, folder in _numbered(run / "logs"):
        info = folder.with_name(folder.name + ".json")
        start = 0
        if info.exists() or info.is_symlink():
            record = read_json(info, "start record", _FIX)
            start = record.get("start_step", 0)
            if isinstance(start, bool) or not isinstance(start, int) or start < 0:
                raise QuackError(f"start record {info} has start_step {start!r}, not a step number; {_FIX}")
        found.append((folder, start))
    return found


def new_attempt(run: Path, start_step: int, resume: Path | None) -> Path:
    """``RUN/logs/attempt-N`` for this start of the run (the CSV logger creates it), with the step it
    starts at recorded in ``attempt-N.json`` beside it.

    A ``metrics.csv`` written straight into RUN by an older quackae becomes ``attempt-0``.
    """
    logs = run / "logs"
    legacy = run / "metrics.csv"
    if legacy.is_file() and not logs.is_dir():
        (logs / "attempt-0").mkdir(parents=True)
        os.replace(legacy, logs / "attempt-0" / "metrics.csv")
        write_atomic(logs / "attempt-0.json", json.dumps({"start_step": 0}) + "\n")
    logs.mkdir(parents=True, exist_ok=True)
    number = max((n for n, _ in _numbered(logs)), default=0) + 1
    record = {"start_step": start_step, "resume": str(resume) if resume else None}
    write_atomic(logs / f"attempt-{number}.json", json.dumps(record) + "\n")
    return logs / f"attempt-{number}"


def latest_attempt(run: Path) -> Path:
    """The folder of the run's latest start (what the ranks that join a training log under)."""
    numbered = _numbered(run / "logs")
    return numbered[-1][1] if numbered else run / "logs" / "attempt-1"


# What to do about a damaged RUN/metrics.csv (the join of every start's), which train rewrites.
MERGED_FIX = "the next train or --resume into the run writes it again"


def read_metrics_csv(file: Path, fix: str = _FIX) -> tuple[list[str], list[dict[str, str]]]:
    """``(column names, rows)`` of a Lightning ``metrics.csv``; ``QuackError`` naming the file when it is not one."""
    text = read_text(file, "metrics file", fix, limit=MAX_METRICS_FILE)
    if not text.strip():
        raise QuackError(f"metrics file {file} is empty; {fix}")
    if "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise QuackError(f"metrics file {file} line {line} holds NUL bytes (cut short or zeroed by a crash); {fix}")
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    try:
        fields = list(reader.fieldnames or [])
        rows = []
        for row in reader:
            if None in row:
                raise QuackError(f"metrics file {file} line {reader.line_num} has more values than columns; {fix}")
            rows.append(row)
    except csv.Error as error:  # the record that starts after the last whole one is broken
        raise QuackError(f"metrics file {file} line {reader.line_num + 1} is not CSV ({error}); {fix}") from None
    if "step" not in fields:
        raise QuackError(f"metrics file {file} has no step column; {fix}")
    return fields, rows


def merge_metrics(out: Path) -> Path | None:
    """Join every start's ``metrics.csv`` into ``RUN/metrics.csv``, in step order.

    Rows an earlier start logged at or after the step the next start resumed from were undone by that
    resume (the steps ran again), so they are left out: each step appears once, as it finally ran.
    """
    started = attempts(out)
    starts = [start for _, start in started]
    fields: list[str] = []
    rows: list[dict[str, str]] = []
    for index, (attempt, _) in enumerate(started):
        file = attempt / "metrics.csv"
        if not file.exists() and not file.is_symlink():
            continue
        cutoff = min(starts[index + 1 :], default=None)
        try:
            names, found = read_metrics_csv(file)
        except QuackError as error:  # Lightning rewrites it in place: a kill or a crash can leave it cut or zeroed
            log.warning("%s; its rows are left out of %s", error, out / "metrics.csv")
            continue
        fields.extend(name for name in names if name not in fields)
        for row in found:
            step = row.get("step") or ""
            if cutoff is not None and step.isdigit() and int(step) >= cutoff:
                continue
            rows.append(row)
    if not rows:
        return None
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out / "metrics.csv", buffer.getvalue())
    return out / "metrics.csv"


Series = list[tuple[float, float]]


def read_metrics(file: str | Path) -> dict[str, Series]:
    """``{column: [(step, value), ...]}`` of every numeric column of a Lightning ``metrics.csv``.

    A file that is not one (not a regular file, not UTF-8, not CSV, no step column) is a ``QuackError``
    naming it; rows without a step and values that are not finite numbers are left out.
    """
    series: dict[str, Series] = {}
    _, rows = read_metrics_csv(Path(file), MERGED_FIX)
    for row in rows:
        try:
            step = float(row.get("step") or "nan")
        except ValueError:
            continue
        if not math.isfinite(step):
            continue
        for name, text in row.items():
            if name in ("step", "epoch") or not text:
                continue
            try:
                value = float(text)
            except ValueError:
                continue
            if math.isfinite(value):
                series.setdefault(name, []).append((step, value))
    return series
