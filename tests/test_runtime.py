from __future__ import annotations

import os
import subprocess
import sys

import pytest

from quackae.runtime import keep_freed_memory

# page faults of five GRU forwards in a fresh process, after three warm-up forwards
FAULTS = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from quackae.runtime import keep_freed_memory
    assert keep_freed_memory()
torch.manual_seed(0)
gru = torch.nn.GRU(64, 256, batch_first=True, bidirectional=True)
x = torch.randn(128, 48, 64)
with torch.inference_mode():
    for _ in range(3):
        gru(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        gru(x)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_keep_freed_memory_stops_the_per_step_page_faults():
    default, kept = _faults("default"), _faults("keep")
    assert default > 5_000  # glibc's defaults fault the GRU's temporaries in at every step
    assert kept < default / 10


def test_keep_freed_memory_leaves_malloc_settings_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert keep_freed_memory() is False
