"""Keeping the freed heap for the next step: the process's malloc settings while fastclip trains.

Why. glibc hands the free top of its heap back to the OS once more than ``M_TRIM_THRESHOLD`` of it
is free (a threshold it adapts, but only up to 64 MiB), and the next step gets that memory back as
fresh zero pages, one page fault per 4 KiB page: 1.8 us each on the development machine, 4.5x the
cost of writing the page. A training step allocates and frees the same blocks every time, so it
pays those faults every step; a private step, which holds its layers' activations until the clip
factors are known and frees them together, pays more of them. Measured with
``bench/page_faults.py`` (2 threads, private and non-private steps interleaved, two runs each
way): with glibc's own settings, cnn 15,000-24,000 faults per step in both methods, resnet
9,000-11,000 private against about 1,000 non-private; with this module's, a few hundred private
and none non-private. Both steps got faster (cnn non-private 126-136 -> 99-108 ms, private
147-154 -> 121-133 ms); their ratio moved within the machine's noise.

What. :func:`keep_heap`, called by every :class:`fastclip.engine.Engine`, fixes glibc's mmap
threshold at 32 MiB (the ceiling its adaptive threshold reaches anyway) and its trim threshold at
1 GiB: a freed block up to 32 MiB stays in the heap for the next step, and the heap is trimmed
only when more than 1 GiB of its top is free. The cost: the process keeps its peak heap resident
between steps, as a training loop that reaches the same peak every step needs anyway. Blocks over
32 MiB are still mapped and unmapped each time, as before. Set ``FASTCLIP_KEEP_HEAP=0`` to leave
malloc as it was; other C libraries (musl, macOS) are left alone.
"""
from __future__ import annotations

import ctypes
import os
import platform
import threading
from typing import Optional

_M_TRIM_THRESHOLD = -1   # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20   # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD_BYTES = 1 << 30

_applied: Optional[bool] = None
_lock = threading.Lock()


def keep_heap() -> bool:
    """Applies the settings above once per process; returns whether they are in force (False
    with ``FASTCLIP_KEEP_HEAP=0``, off glibc, or if glibc refused a value)."""
    global _applied
    with _lock:
        if _applied is None:
            _applied = _apply()
        return _applied


def _apply() -> bool:
    if os.environ.get("FASTCLIP_KEEP_HEAP", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Setting either threshold stops glibc adapting the other, so both are set: the mmap one
    # first, or every block over the 128 KiB default would be mapped afresh.
    return (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
            and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1)
