"""``quackae bench --what prepare``: ``quackae prepare`` end to end beside the raw tokenizer."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from quackae.data.tokenizer import train_tokenizer
from quackae.stages.prepare import PrepareConfig, prepare

log = logging.getLogger(__name__)


def bench_prepare(config: Any) -> dict[str, Any]:
    """rows/s of ``prepare`` (tokenizer given, so training is excluded) beside raw ``Tokenizer.encode_batch``.

    The corpus is the standard-library docstring corpus repeated to ``config.rows`` rows with fresh ids.
    """
    import datasets

    from quackae.data.corpus import stdlib_docstrings, write_jsonl

    datasets.disable_progress_bars()
    base = stdlib_docstrings()
    rows = [
        {"id": i, "text": base[i % len(base)]["text"], "label": base[i % len(base)]["label"]}
        for i in range(config.rows)
    ]
    texts = [r["text"] for r in rows]
    with tempfile.TemporaryDirectory(prefix="quackae-bench-", dir=config.dir) as tmp:
        source = write_jsonl(rows, Path(tmp) / "corpus.jsonl")
        start = time.perf_counter()
        tokenizer = train_tokenizer(texts, vocab_size=8000, show_progress=False)
        train_seconds = time.perf_counter() - start
        tokenizer.save(str(Path(tmp) / "tokenizer.json"))
        start = time.perf_counter()
        tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        raw_seconds = time.perf_counter() - start
        start = time.perf_counter()
        prepare(
            PrepareConfig(
                inputs=(str(source),), out=str(Path(tmp) / "prepared"), tokenizer=str(Path(tmp) / "tokenizer.json")
            )
        )
        prepare_seconds = time.perf_counter() - start
    return {
        "bench": "prepare",
        "rows": config.rows,
        "prepare_rows_per_s": round(config.rows / prepare_seconds, 1),
        "encode_batch_rows_per_s": round(config.rows / raw_seconds, 1),
        "ratio": round(raw_seconds / prepare_seconds, 3),
        "tokenizer_training_s": round(train_seconds, 2),
        "device": f"cpu ({os.cpu_count()} cores)",
    }
