from __future__ import annotations

import os
import subprocess
import sys

import pytest

from quackae.runtime import keep_freed_memory, settled_heap

# page faults of five rounds of a step's pattern (eight 3 MB temporaries made, written and freed), in a fresh
# process, after two warm-up rounds; ctypes' malloc so that nothing else allocates in between
FAULTS = """
import ctypes, resource, sys
if sys.argv[1] == "keep":
    from quackae.runtime import keep_freed_memory
    assert keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 3 << 20

def step():
    blocks = [libc.malloc(size) for _ in range(8)]
    for block in blocks:
        ctypes.memset(block, 1, size)
    for block in blocks:
        libc.free(block)

for _ in range(2):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_keep_freed_memory_stops_the_per_step_page_faults():
    # glibc's defaults: once a 3 MB block has been freed, such blocks come from the heap, and the 24 MB free at
    # its top after each step is handed back (trimmed past twice the block size), so every step faults its
    # temporaries in again: 5 x 24 MB / 4 KB pages = 30,720
    default = _faults("default")
    assert default > 20_000
    assert _faults("keep") < 1_000  # kept: the next step reuses the same pages


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
    from quackae.runtime import keep_freed_memory, settled_heap
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


def test_settled_heap_freezes_inside_gives_back_after_and_leaves_nesting_to_the_outermost():
    import gc

    assert gc.get_freeze_count() == 0  # pytest itself freezes nothing
    kept = [[i] for i in range(1000)]  # container objects the collector tracks
    with settled_heap():
        outer = gc.get_freeze_count()
        assert outer >= len(kept)
        with settled_heap():
            assert gc.get_freeze_count() == outer  # nested: no second freeze holding an earlier stage's garbage
        assert gc.get_freeze_count() == outer
    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), settled_heap():
        raise RuntimeError("a stage failed")
    assert gc.get_freeze_count() == 0  # given back on the way out of an error too


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


def test_the_quackae_command_runs_its_stage_with_the_heap_settled(monkeypatch, capsys):
    import gc
    from dataclasses import dataclass

    import quackae.cli as cli

    @dataclass(frozen=True)
    class Config:
        pass

    seen = []

    def stage(config):
        seen.append(gc.get_freeze_count())
        return {"lines": ["done"]}

    monkeypatch.setattr(cli, "_load", lambda name: (Config, stage))
    monkeypatch.setattr(cli, "build_parser", lambda command: _Parser())
    assert cli.main(["verify"]) == 0
    assert seen and seen[0] > 1000 and gc.get_freeze_count() == 0
    assert capsys.readouterr().out.strip() == "done"


class _Parser:
    def parse_args(self, argv):
        import argparse

        return argparse.Namespace(command=argv[0], log_level="WARNING", verbose=True, json=False)
