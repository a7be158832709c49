"""Give the worker's free heap pages back to the OS.

The strategies allocate per-step tensors whose sizes change with the batch, and grow or compact their
buffers (recycled's pool). glibc serves allocations below its mmap threshold (raised at run time up to
32 MiB after large frees) from its heaps, and returns their free pages only at the top of a heap; pages
freed in the middle stay resident. Measured in a mixed-strategy soak (2026-12-08, docs/operations.md "Soak"):
the worker's free-but-resident heap bytes rose 97 -> 183 MiB in 9 minutes, while its in-use bytes rose
mostly in the first 5 minutes and then levelled off.
``malloc_trim(0)`` releases every whole free page of every arena (madvise), so the worker calls it at most
every ``TRIM_INTERVAL_S`` while busy and once whenever it goes idle. Elsewhere than glibc it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from typing import Callable, Optional

TRIM_INTERVAL_S = 10.0


def _load_malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()


def release_free_heap() -> bool:
    """Return the free pages of every malloc arena to the OS; False where malloc_trim does not exist."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


class HeapTrimmer:
    """``maybe_release`` once per engine step: releases at most every ``interval_s`` seconds."""

    def __init__(self, interval_s: float = TRIM_INTERVAL_S, clock: Callable[[], float] = time.monotonic,
                 release: Callable[[], bool] = release_free_heap) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.release = release
        self.last = clock()
        self.releases = 0

    def maybe_release(self) -> None:
        now = self.clock()
        if now - self.last >= self.interval_s:
            self.release_now(now)

    def release_now(self, now: Optional[float] = None) -> None:
        self.last = self.clock() if now is None else now
        if self.release():
            self.releases += 1
