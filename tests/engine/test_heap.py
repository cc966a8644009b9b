"""fastclip/heap.py: an engine keeps the process's freed heap for the next step (glibc), and
FASTCLIP_KEEP_HEAP=0 leaves malloc alone. Run in child processes: the settings are per process."""
import json
import platform
import subprocess
import sys

import pytest

from harness import child_env

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the heap settings apply to glibc only")

# A step's pattern: 96 MiB of 8 MiB blocks allocated, written, and all freed; the page faults
# of the third round are counted. Before the engine is made, the child puts glibc's thresholds at
# their un-adapted defaults (mmap and trim at 128 KiB), where every 8 MiB block is mapped afresh
# and faults in all its pages: whether that holds afterwards depends only on what the engine did,
# not on how far glibc's adaptive thresholds had moved in this process (CI's did differently).
_CHILD = """
import ctypes, json, resource
import torch
mallopt = ctypes.CDLL(None).mallopt
mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
assert mallopt(-3, 128 << 10) == 1 and mallopt(-1, 128 << 10) == 1   # M_MMAP_, M_TRIM_THRESHOLD
import fastclip
from fastclip.engine import Engine
from fastclip.heap import keep_heap
Engine(torch.nn.Linear(3, 2), max_grad_norm=1.0)
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(2 << 20) for _ in range(12)]
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": keep_heap(), "faults": faults[-1]}))
"""


def _run(**env):
    out = subprocess.run([sys.executable, "-c", _CHILD], env=child_env(**env), check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_an_engine_keeps_the_freed_heap_for_the_next_step():
    pages = 12 * (8 << 20) // 4096
    kept = _run()
    assert kept["kept"] is True
    # the 96 MiB come back from the heap, not as fresh pages (measured: 0, now and then one
    # block's 2048 pages)
    assert kept["faults"] < pages // 4, kept
    # FASTCLIP_KEEP_HEAP=0 leaves the child's settings in force: every page faults in again
    # (the measurement can tell the two apart)
    left = _run(FASTCLIP_KEEP_HEAP="0")
    assert left["kept"] is False
    assert left["faults"] > pages // 2, left
