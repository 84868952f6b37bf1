"""``quackae prepare``: text files -> ``tokenizer.json`` + a tokenized HF dataset + ``prepare.json``.

The dataset's columns: ``id`` (int64), ``input_ids`` (at most ``--max-length`` tokens, ``[EOS]`` last),
``length`` (tokens, ``[EOS]`` included), ``text`` (the item's original text, whole, from ``--text-field``),
``truncated`` (its tokens were cut to ``--max-length``), then every other input column as metadata. An
input column named like one of quackae's own (those, and the store's ``encoding``) is refused. Over-long
texts and words are cut before the tokenizer sees them (``quackae.data.tokenizer``), counted in ``prepare.json``.

Rows that cannot be used (malformed JSON, empty, null or non-string text, missing, negative,
non-integer, out-of-range or duplicate id) are counted and listed with ``file:line`` (the file's
physical line, also for CSV records that span lines); ``--strict`` refuses them. Ids are integers
in [0, 2**63), written as JSON/Arrow integers or ASCII decimal strings. When the id column does not
exist at all, ids are the row numbers (0-based, across all inputs). Text files may start with a
UTF-8 byte-order mark.

The output appears at once: it is built in a sibling staging folder, completed by a ``COMPLETE``
marker written last, and swapped in for any previous output with one atomic exchange of the two
folders (``atomic.replace_folder``: ``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere two renames).
``load_prepared`` refuses a folder without the marker, including one written by a quackae from before the
marker existed: prepare it again.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from quackae.core.atomic import replace_folder, sibling_staging, write_atomic
from quackae.core.errors import QuackError, StrictError
from quackae.core.files import regular_file
from quackae.core.results import StageResult
from quackae.data.prepared import COMPLETE, DATASET, OWN_COLUMNS, STORE_COLUMNS, dataset_fingerprint, open_rows
from quackae.data.readers import Rows, format_of, metadata_columns, read_jsonl, read_with_datasets, validate
from quackae.data.tokenizer import (
    EOS,
    TRAIN_CHARS_PER_TOKEN,
    load_tokenizer,
    special_ids,
    text_limit,
    tokenize_batch,
    tokenizer_hash,
    train_tokenizer,
)
from quackae.stages.configs import PrepareConfig

log = logging.getLogger(__name__)

MAX_EXAMPLES = 20
_OWN_NAMES = {"dataset", "tokenizer.json", "prepare.json", COMPLETE, ".dataset.tmp"}


def _length_stats(lengths: np.ndarray) -> dict[str, float]:
    if lengths.size == 0:
        return {}
    return {
        "min": int(lengths.min()),
        "max": int(lengths.max()),
        "mean": round(float(lengths.mean()), 2),
        "p50": int(np.percentile(lengths, 50)),
        "p95": int(np.percentile(lengths, 95)),
        "tokens": int(lengths.sum()),
    }


@dataclass(frozen=True)
class PrepareResult(StageResult):
    """What ``quackae prepare`` did, also written to ``OUT/prepare.json``."""

    out: str
    rows_read: int
    rows_kept: int
    rejected: dict[str, int]  # rows per reason
    rejected_total: int
    rejected_examples: tuple[dict[str, Any], ...]  # the first MAX_EXAMPLES: file, line, reason
    truncated: int  # items whose tokens were cut to --max-length
    cut_before_tokenizing: dict[str, int]
    lengths: dict[str, float]  # min, max, mean, p50, p95 and tokens of the kept items
    ids: str  # "column NAME" or "row numbers"
    metadata_columns: tuple[str, ...]
    vocab_size: int
    tokenizer_sha256: str
    inputs: tuple[str, ...]
    config: dict[str, Any]
    seconds: float
    dataset_fingerprint: str = ""


@dataclass
class _Usable:
    """The rows a prepare keeps, and what it says of those it does not."""

    kept: list[int]  # row numbers into the rows read
    ids: list[int]
    texts: list[str]
    text_field: str
    id_field: str | None
    reasons: Counter[str]
    examples: list[dict[str, Any]]
    message: str  # one line on the rejected rows, empty when none


def prepare(config: PrepareConfig) -> PrepareResult:
    """Run ``quackae prepare``; returns the summary also written to ``OUT/prepare.json``.

    The output (``dataset/``, ``tokenizer.json``, ``prepare.json``, ``COMPLETE``) replaces any
    previous one in ``--out`` at once: a reader sees the old output or the new one, whole.
    """
    started = time.time()
    paths = [Path(p) for p in config.inputs]
    for path in paths:
        if path.is_dir():
            raise QuackError(f"input {path} is a directory; give the files inside it")
        regular_file(path, "input file")  # missing, a FIFO, a device or a link loop: named as such
    out = Path(config.out)
    _check_out(out, config.overwrite)
    import datasets  # after the checks above: a mistake is reported without loading it (about 2 s)

    datasets.disable_caching()
    formats = [format_of(path, config.format) for path in paths]
    rows = _read(paths, formats)
    usable = _usable_rows(rows, paths, formats, config)
    training_cut: Counter[str] = Counter()
    tokenizer = _tokenizer(config, usable.texts, training_cut)
    most = text_limit(tokenizer, config.max_length - 1)
    metadata = metadata_columns(rows, usable.kept, {usable.text_field, *([usable.id_field] if usable.id_field else [])})
    mapped, truncated = _tokenized(config, tokenizer, usable, metadata)
    result = PrepareResult(
        out=str(out),
        rows_read=rows.count + len(rows.rejected),
        rows_kept=len(usable.kept),
        rejected=dict(sorted(usable.reasons.items())),
        rejected_total=sum(usable.reasons.values()),
        rejected_examples=tuple(usable.examples),
        truncated=truncated,
        cut_before_tokenizing={
            "texts": sum(len(text) > most for text in usable.texts),
            "chars_read_per_text": most,
            "training_texts": training_cut["texts"],
            "training_runs": training_cut["runs"],
        },
        lengths=_length_stats(mapped.data.column("length").to_numpy()),
        ids="column " + usable.id_field if usable.id_field else "row numbers",
        metadata_columns=tuple(metadata),
        vocab_size=tokenizer.get_vocab_size(),
        tokenizer_sha256=tokenizer_hash(tokenizer),
        inputs=tuple(str(p) for p in paths),
        config=asdict(config),
        seconds=round(time.time() - started, 2),
    )
    result = _write(out, mapped, tokenizer, result)
    if usable.message:
        log.warning("%s; details in %s", usable.message, out / "prepare.json")
    log.info(
        "prepared %d of %d rows into %s (%d rejected, %d truncated)",
        result.rows_kept,
        result.rows_read,
        out,
        result.rejected_total,
        truncated,
    )
    return result


def _read(paths: list[Path], formats: list[str]) -> Rows:
    """Every row of every input file, in order (the files of one format through one reader)."""
    rows = Rows()
    with tempfile.TemporaryDirectory(prefix="quackae-read-") as cache_dir:
        for index, (path, fmt) in enumerate(zip(paths, formats, strict=True)):
            log.info("reading %s (%s)", path, fmt)
            if fmt == "jsonl":
                read_jsonl(path, index, rows)
            else:
                read_with_datasets(path, fmt, index, rows, cache_dir)
    return rows


def _usable_rows(rows: Rows, paths: list[Path], formats: list[str], config: PrepareConfig) -> _Usable:
    """The rows with a usable text and id; the others counted by reason (``--strict`` refuses them)."""
    text_field = "text" if all(fmt == "txt" for fmt in formats) else config.text_field
    columns = sorted(rows.columns)
    if rows.count and text_field not in rows.columns:
        raise QuackError(
            f"--text-field {text_field!r} is not a column of {', '.join(map(str, paths))} "
            f"(columns: {', '.join(columns)})"
        )
    id_field: str | None = config.id_field if config.id_field in rows.columns else None
    _refuse_own_names(columns, text_field, id_field, paths)
    if id_field is None:
        log.info("no %r column: ids are the row numbers", config.id_field)
    if rows.count == 0 and not rows.rejected:
        raise QuackError(f"no rows in {', '.join(map(str, paths))}")
    kept, ids, rejected = validate(rows, text_field, id_field) if rows.count else ([], [], list(rows.rejected))
    rejected.sort()
    reasons = Counter(reason for _, _, reason in rejected)
    examples = [{"file": str(paths[f]), "line": line, "reason": reason} for f, line, reason in rejected[:MAX_EXAMPLES]]
    message = ""
    if rejected:
        first = examples[0]
        summary_text = ", ".join(f"{reason}: {count}" for reason, count in sorted(reasons.items()))
        message = (
            f"{len(rejected)} of {rows.count + len(rows.rejected)} rows rejected ({summary_text}); first at "
            f"{first['file']}:{first['line']} ({first['reason']})"
        )
        if config.strict:
            raise StrictError(message + "; fix them or rerun without --strict to skip them")
    if not kept:
        raise QuackError(f"no usable rows in {', '.join(map(str, paths))}: {message}")
    texts = [rows.columns[text_field][i] for i in kept]
    return _Usable(kept, ids, texts, text_field, id_field, reasons, examples, message)


def _tokenizer(config: PrepareConfig, texts: list[str], training_cut: Counter[str]) -> Any:
    """``--tokenizer``, or a byte-level BPE trained on ``texts``; either must have the ``[EOS]`` token."""
    if config.tokenizer:
        tokenizer = load_tokenizer(config.tokenizer)
    else:
        log.info("training a byte-level BPE tokenizer (vocab %d) on %d texts", config.vocab_size, len(texts))
        tokenizer = train_tokenizer(
            texts,
            config.vocab_size,
            config.min_frequency,
            length=len(texts),
            max_chars=config.max_length * TRAIN_CHARS_PER_TOKEN,
            cut=training_cut,
        )
    if special_ids(tokenizer).eos is None:
        raise QuackError(f"the tokenizer has no {EOS} token; train one with quackae prepare (no --tokenizer)")
    return tokenizer


def _tokenized(config: PrepareConfig, tokenizer: Any, usable: _Usable, metadata: dict[str, Any]) -> tuple[Any, int]:
    """``(dataset, truncated items)``: the kept rows with their tokens, in the prepared folder's columns."""
    import datasets
    import pyarrow.compute as pc

    table = datasets.Dataset.from_dict({"id": usable.ids, "text": usable.texts, **metadata})
    mapped = table.map(
        tokenize_batch,
        batched=True,
        batch_size=2000,
        num_proc=config.num_proc if config.num_proc > 1 else None,
        fn_kwargs={
            "tokenizer": tokenizer,
            "text_field": "text",
            "limit": config.max_length - 1,
            "eos": special_ids(tokenizer).eos,
        },
        new_fingerprint=f"quackae-{tokenizer_hash(tokenizer)[:16]}-{config.max_length}",
        desc="tokenizing",
    )
    truncated = int(pc.sum(mapped.data.column("truncated")).as_py() or 0)
    return mapped.select_columns([*OWN_COLUMNS, *metadata]), truncated


def _write(out: Path, mapped: Any, tokenizer: Any, result: PrepareResult) -> PrepareResult:
    """Write the prepared folder in a sibling staging folder, ``COMPLETE`` last, and swap it in for ``out``;
    returns ``result`` with the fingerprint of the rows as written."""
    target = out.resolve()  # "." or a symlink: the real folder is what gets swapped
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = None
    try:
        staging = sibling_staging(target, _STAGING)
        mapped.save_to_disk(str(staging / DATASET))
        (staging / "tokenizer.json").write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
        # the fingerprint of the rows as a reader will see them: read back from the files just written
        fingerprint = dataset_fingerprint(open_rows(staging / DATASET, "run quackae prepare again"))
        result = replace(result, dataset_fingerprint=fingerprint)
        (staging / "prepare.json").write_text(json.dumps(result.figures(), indent=2) + "\n", encoding="utf-8")
        marker = {
            "tokenizer_sha256": result.tokenizer_sha256,
            "dataset_fingerprint": fingerprint,
            "rows": result.rows_kept,
        }
        write_atomic(staging / COMPLETE, json.dumps(marker) + "\n")  # last: the folder is whole
        replace_folder(staging, target)
    except OSError as error:
        where = error.filename or staging or target.parent
        raise QuackError(
            f"writing the prepared data failed at {where}: {error.strerror or error}; {out} keeps what it held, "
            "free space (or fix the permission) and run quackae prepare again"
        ) from None
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return result


def _refuse_own_names(columns: list[str], text_field: str, id_field: str | None, paths: list[Path]) -> None:
    """An input column named like a column quackae writes would be lost or overwritten: refuse it in one line."""
    for name in (*OWN_COLUMNS, *STORE_COLUMNS):
        if name not in columns or name == text_field or name == id_field:
            continue
        hint = {
            "id": "; or pass --id-field id to use it as the ids",
            "text": "; or pass --text-field text to use it as the texts",
        }.get(name, "")
        raise QuackError(
            f"input column {name!r} clashes with the {name!r} column quackae writes (in "
            f"{', '.join(map(str, paths))}); rename it in the input{hint}"
        )


_STAGING = "prepare"  # sibling staging folders ".OUT.prepare-PID" (``atomic.sibling_staging``)


def _check_out(out: Path, overwrite: bool) -> None:
    """``--out`` must be a new folder, an empty one or a previous prepare output (replaced when ``overwrite``)."""
    if out.exists() and not out.is_dir():
        raise QuackError(f"--out {out} is a file; give prepare a directory")
    if not out.is_dir():
        return
    names = {p.name for p in out.iterdir()}
    foreign = sorted(names - _OWN_NAMES)
    if foreign:
        raise QuackError(
            f"--out {out} holds files prepare did not write ({', '.join(foreign[:5])}); "
            "choose a new or empty directory, prepare replaces the whole folder"
        )
    if names & {"dataset", COMPLETE} and not overwrite:
        raise QuackError(f"{out} already holds a prepared dataset; pass --overwrite or choose another --out")
