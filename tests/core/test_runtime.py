from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from quackae.core.process import keep_freed_memory, settled_heap

# bytes glibc holds in mmapped blocks after one 4 MB allocation, in a fresh process
MMAPPED = """
import ctypes, sys

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
if sys.argv[1] == "keep":
    from quackae.core.process import keep_freed_memory, settled_heap
    assert keep_freed_memory()
before = libc.mallinfo2().hblkhd
block = libc.malloc(4 << 20)
print(libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_keep_freed_memory_serves_large_blocks_from_the_heap():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def mmapped(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", MMAPPED, mode], env=env, capture_output=True, text=True)
        if "mallinfo2" in run.stderr:
            pytest.skip("glibc before 2.33 has no mallinfo2")
        return int(run.stdout.split()[-1])

    assert mmapped("default") >= 4 << 20  # a 4 MB block is its own mmap by default
    assert mmapped("keep") == 0  # from the heap, where freed memory is kept for the next one


def test_keep_freed_memory_leaves_malloc_settings_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert keep_freed_memory() is False


def test_settled_heap_freezes_inside_gives_back_after_and_leaves_nesting_to_the_outermost(monkeypatch):
    """The freeze calls quackae makes (the collector's own counts are the platform's, not tested here)."""
    import gc

    calls, frozen = [], [0]
    monkeypatch.setattr(gc, "freeze", lambda: (calls.append("freeze"), frozen.__setitem__(0, 1)))
    monkeypatch.setattr(gc, "unfreeze", lambda: (calls.append("unfreeze"), frozen.__setitem__(0, 0)))
    monkeypatch.setattr(gc, "get_freeze_count", lambda: frozen[0])
    with settled_heap():
        assert calls == ["freeze"]
        with settled_heap():
            pass
        assert calls == ["freeze"]  # nested: no second freeze holding an earlier stage's garbage
    assert calls == ["freeze", "unfreeze"]
    with pytest.raises(RuntimeError), settled_heap():
        raise RuntimeError("a stage failed")
    assert calls[-1] == "unfreeze" and frozen[0] == 0  # given back on the way out of an error too
    frozen[0] = 1  # a heap someone else froze is theirs to give back
    with settled_heap():
        pass
    assert calls == ["freeze", "unfreeze", "freeze", "unfreeze"] and frozen[0] == 1


def test_settled_heap_across_threads_unfreezes_when_the_last_block_closes():
    import gc
    import threading

    first_in, second_in, first_out, second_done = (threading.Event() for _ in range(4))
    seen = {}

    def first():
        with settled_heap():
            first_in.set()
            second_in.wait(5)
        first_out.set()

    def second():
        first_in.wait(5)
        with settled_heap():
            second_in.set()
            first_out.wait(5)
            seen["inside after the first left"] = gc.get_freeze_count()
        second_done.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen["inside after the first left"] > 0  # still settled for the block that is still open
    assert gc.get_freeze_count() == 0
    gc.freeze()  # a heap frozen by someone else is theirs to unfreeze
    calls = []
    try:
        real_freeze, real_unfreeze = gc.freeze, gc.unfreeze
        gc.freeze, gc.unfreeze = (lambda: calls.append("freeze")), (lambda: calls.append("unfreeze"))
        try:
            with settled_heap():
                pass
        finally:
            gc.freeze, gc.unfreeze = real_freeze, real_unfreeze
        # counted by calls, not by gc.get_freeze_count(), which falls whenever another thread frees a frozen object
        assert calls == [] and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


@pytest.fixture
def legacy_run(tmp_path):
    """A prepared folder and a RUN written by ee38aa6 (tests/legacy), copied where a test may write."""
    import shutil

    root = Path(__file__).parents[1] / "legacy" / "store-ee38aa6"
    for name in ("prepared", "run", "store-shards"):
        shutil.copytree(root / name, tmp_path / name)
    return tmp_path


@pytest.fixture
def settings_seen(monkeypatch):
    import gc

    import quackae.core.process as process

    seen: list[str] = []
    monkeypatch.setattr(process, "keep_freed_memory", lambda: seen.append("keep_freed_memory") or True)
    real_freeze = gc.freeze
    monkeypatch.setattr(gc, "freeze", lambda: (seen.append("freeze"), real_freeze()))
    return seen


def test_only_the_command_whose_table_entry_names_a_setting_applies_it(legacy_run, settings_seen, capsys):
    from quackae.cli import main
    from quackae.stages import STAGES

    assert {name for name, stage in STAGES.items() if stage.settings} == {"encode"}
    assert main(["verify", str(legacy_run / "store-shards")]) == 0
    assert settings_seen == []
    out = legacy_run / "store"
    assert main(["encode", str(legacy_run / "prepared"), "--model", str(legacy_run / "run"), "--out", str(out)]) == 0
    assert settings_seen == ["keep_freed_memory", "freeze"]


def test_a_library_call_changes_no_process_setting(legacy_run, settings_seen):
    from quackae import EncodeConfig, encode

    encode(EncodeConfig(data=str(legacy_run / "prepared"), model=str(legacy_run / "run"), out=str(legacy_run / "s")))
    assert settings_seen == []


@pytest.mark.parametrize(
    ("accelerator", "gpu", "given", "used"),
    [("auto", False, None, 128), ("auto", True, None, 1024), ("cpu", True, None, 128), ("gpu", True, 96, 96)],
)
def test_encode_batch_size_defaults_by_accelerator_and_keeps_a_given_one(
    legacy_run, monkeypatch, accelerator, gpu, given, used
):
    import torch

    import quackae.data.module
    import quackae.stages.encode as stage
    from quackae import EncodeConfig

    class Stop(Exception):
        pass

    seen = {}

    def data_module(data, batch_size, **options):
        seen["batch_size"] = batch_size
        raise Stop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(quackae.data.module, "TokenizedDataModule", data_module)
    config = EncodeConfig(
        data=str(legacy_run / "prepared"), model=str(legacy_run / "run"), out=str(legacy_run / "s"),
        accelerator=accelerator, batch_size=given,
    )  # fmt: skip
    with pytest.raises(Stop):
        stage.encode(config)
    assert seen["batch_size"] == used
