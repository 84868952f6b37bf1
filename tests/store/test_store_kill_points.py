"""``quackae export`` killed at each boundary of its write leaves the old file or the whole new one.

The kill is placed, not timed: a child process replaces the Parquet writer (half the bytes, then death) or
``os.replace`` (death just before or just after the rename) and runs the command.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

STORE = Path(__file__).resolve().parents[1] / "legacy" / "store-ee38aa6" / "store-shards"
ITEMS = 40
KILLED = 9

_CHILD = f"""
import io, os, sys
import pyarrow.parquet as pq

point, store, out = sys.argv[1:4]
real_write, real_replace = pq.write_table, os.replace


def half_then_die(table, where, **options):
    buffer = io.BytesIO()
    real_write(table, buffer, **options)
    data = buffer.getvalue()
    where.write(data[: len(data) // 2])
    where.flush()
    os._exit({KILLED})


def replace_then_die(source, target, *args, **options):
    if point == "before-rename":
        os._exit({KILLED})
    real_replace(source, target, *args, **options)
    if point == "after-rename":
        os._exit({KILLED})


if point == "mid-write":
    pq.write_table = half_then_die
os.replace = replace_then_die
from quackae.cli import main

sys.exit(main(["export", store, "--out", out]))
"""


@pytest.mark.parametrize(("point", "left"), [("mid-write", "old"), ("before-rename", "old"), ("after-rename", "new")])
def test_export_killed_at_each_boundary_leaves_the_old_or_the_new_file(tmp_path, point, left):
    store = tmp_path / "store"
    shutil.copytree(STORE, store)
    target = tmp_path / "all.parquet"
    old = pa.table({"id": pa.array([1, 2, 3], type=pa.int64())})
    pq.write_table(old, target)
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, point, str(store), str(target)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == KILLED, f"the export was not killed at {point}: {done.stderr[-500:]}"
    table = pq.read_table(target)
    if left == "old":
        assert table.equals(old)
    else:
        assert table.num_rows == ITEMS and table.column_names[:2] == ["id", "encoding"]
