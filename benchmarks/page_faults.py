"""How many page faults a training step's allocation pattern takes, with glibc's defaults and with
``keep_freed_memory`` (the setting ``quackae encode`` applies): platform behaviour, measured here rather than
asserted in the unit tests.

usage: python benchmarks/page_faults.py   (Linux with glibc)
"""

from __future__ import annotations

import os
import subprocess
import sys

# page faults of five rounds of a step's pattern (eight 3 MB temporaries made, written and freed), in a fresh
# process, after two warm-up rounds; ctypes' malloc so that nothing else allocates in between
FAULTS = """
import ctypes, resource, sys
if sys.argv[1] == "keep":
    from quackae.core.process import keep_freed_memory
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


def main() -> None:
    # glibc's defaults: once a 3 MB block has been freed, such blocks come from the heap, and the 24 MB free at
    # its top after each step is handed back (trimmed past twice the block size), so every step faults its
    # temporaries in again: 5 x 24 MB / 4 KB pages = 30,720; kept, the next step reuses the same pages
    print(f"page faults, glibc defaults: {_faults('default')}")
    print(f"page faults, keep_freed_memory: {_faults('keep')}")


if __name__ == "__main__":
    main()
