"""Host-side performance settings for training on CPUs."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse instead of returning it to the OS.

    A training step frees and reallocates the same large activation buffers every step. By
    default glibc serves blocks over a threshold with fresh mmap calls and unmaps them on free,
    so every step page-faults its buffers back in, and a large share of a CPU step goes to the
    kernel. The cost is that the process keeps its peak memory. Returns False (and changes
    nothing) off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_MAX, 0)  # serve every block from the heap
    ok &= mallopt(_M_TRIM_THRESHOLD, 2**30 - 1)  # rarely give the heap top back
    ok &= mallopt(_M_TOP_PAD, 64 << 20)  # and grow it 64 MiB at a time
    return bool(ok)
