"""The C allocator's thresholds, so training does not page-fault its activations every step.

A training step allocates and frees the same few activation buffers (MBs each, tens of MBs for a
batched group of clients). glibc serves allocations above its mmap threshold with fresh
``mmap`` pages and returns the freed top of its heap to the system beyond its trim threshold;
either way every step touches new pages, and the page faults (zeroing included) cost about as
much as the element-wise layers themselves: batched-client training measured 1.2x a bare loop
with glibc's defaults and 1.5x with these thresholds. Raising both keeps the buffers in the
heap and reuses them. Nothing computed changes; the process keeps up to ``trim`` bytes of freed
memory, which its peak already held.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling on 64-bit (4 MiB * sizeof(long))
TRIM_THRESHOLD = 2**30


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Set glibc's mmap and trim thresholds for this process; False (nothing changed) where the C
    library is not glibc or refuses a value."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no mallopt thresholds)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # trim first: a trim threshold below the mmap one would hand freed buffers straight back
    return bool(mallopt(M_TRIM_THRESHOLD, trim_threshold)) and bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold))
