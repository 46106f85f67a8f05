"""CPU runtime settings that accelerators have by default, applied once per process on CPU
(init_distributed, the ghost benchmark's processes), for every method alike.

Keep freed memory (keep_freed_memory). By default glibc serves large blocks with mmap and unmaps them
when freed, and trims the heap when much of it is free. A training step frees its activations, then
allocates about as much again (for GREATS: the per-sample gradient tiles), so every step faulted its
pages back in, one page fault per 4 KiB, each zeroing its page: on the embedded default 52,700 faults
per single_pass step (9 with this setting), which made that step 12% and a Regular step 7% slower.
Raising both thresholds keeps freed memory in the process for the next allocation, as an
accelerator's caching allocator does. Blocks over 32 MiB (glibc's cap for the mmap threshold) are
served from the heap too (M_MMAP_MAX = 0): mapped afresh, they cost the ghost benchmark's recorder
57,000 faults per call at B=32, T=256, d=256 (8% of its time) and an ordinary step none once the heap
had grown, which skewed every ratio between the two. A no-op where the C library has no mallopt (not
glibc).

Flush denormals (flush_denormals). A Gram multiplies per-sample gradients with each other: the output
layer's rows of very unlikely tokens hold values near 1e-30, whose products fall below float32's
smallest normal number into x86's slow denormal path (a Gram GEMM 4x slower on this CPU). GPUs handle
them at full speed; on CPU the flush-to-zero and denormals-are-zero modes (TensorFlow sets them on its
CPU threads) treat them as zero, which moves no operation's result by more than 2^-126. torch.set_flush_denormal
sets only the calling thread, while the GEMMs run on OpenMP workers, so it is also called once on each
of them, in one parallel region of the OpenMP runtime torch loaded. Workers created later (a larger
torch.set_num_threads) do not have it.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch

M_TRIM_THRESHOLD = -1   # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
# Blocks up to this size come from the heap (glibc's own cap for the threshold it adapts by itself);
# with M_MMAP_MAX = 0 larger ones do too (no block is mapped on its own).
MMAP_THRESHOLD = 32 << 20
NEVER_TRIM = 2 ** 31 - 1  # mallopt takes an int

# OpenMP runtimes that export GNU's GOMP_parallel entry point (GNU, Intel, LLVM)
OPENMP_LIBRARIES = ("libgomp", "libiomp5", "libomp")

_kept = None


def apply() -> None:
    """Both settings (calling again changes nothing)."""
    keep_freed_memory()
    flush_denormals()


def keep_freed_memory() -> bool:
    """Set the thresholds (once); True where the C library took them."""
    global _kept
    if _kept is None:
        try:
            mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
        except (OSError, AttributeError):  # no glibc (e.g. macOS, musl without mallopt)
            _kept = False
        else:
            _kept = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)
                         and mallopt(M_MMAP_MAX, 0))
    return _kept


def _loaded_openmp():
    """The OpenMP runtime this process has loaded (torch's), or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:  # not Linux
        return None
    for path in sorted(paths):
        if any(path.rsplit("/", 1)[-1].startswith(name) for name in OPENMP_LIBRARIES):
            try:
                return ctypes.CDLL(path).GOMP_parallel
            except (OSError, AttributeError):
                continue
    return None


def flush_denormals() -> bool:
    """Flush-to-zero / denormals-are-zero on this thread and on each of torch's OpenMP workers; True
    where every thread took it (False: not supported, or no OpenMP runtime found: this thread only)."""
    if not torch.set_flush_denormal(True):
        return False
    if torch.get_num_threads() == 1:
        return True
    parallel = _loaded_openmp()
    if parallel is None:
        return False
    each_thread = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _: torch.set_flush_denormal(True))
    parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    parallel.restype = None
    # GOMP_parallel(fn, data, num_threads, flags): fn runs once on each thread of the team, this one too
    parallel(ctypes.cast(each_thread, ctypes.c_void_p), None, torch.get_num_threads(), 0)
    return True
