"""On CPU, keep freed memory for reuse, as the caching allocators of accelerators do.

By default glibc serves large blocks with mmap and unmaps them when freed, and trims the heap when
much of it is free. A training step frees its activations, then allocates about as much again (for
GREATS: the per-sample gradient tiles), so every step faulted its pages back in, one page fault per
4 KiB, each zeroing its page: on the embedded default 52,700 faults per single_pass step (9 with
this setting), which made that step 12% and a Regular step 7% slower. Raising both thresholds keeps
freed memory in the process for the next allocation. Applied once per process on CPU (init_distributed,
the ghost benchmark), for every method alike; a no-op where the C library has no mallopt (not glibc).
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1   # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap (glibc's own cap for the threshold it adapts by itself);
# larger ones are still mapped and unmapped, so one huge temporary never stays resident.
MMAP_THRESHOLD = 32 << 20
NEVER_TRIM = 2 ** 31 - 1  # mallopt takes an int

_applied = None


def keep_freed_memory() -> bool:
    """Set the thresholds (once); True where the C library took them."""
    global _applied
    if _applied is None:
        try:
            mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
        except (OSError, AttributeError):  # no glibc (e.g. macOS, musl without mallopt)
            _applied = False
        else:
            _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
    return _applied
