"""CPU runtime settings (parallel/cpu_runtime.py), each checked in fresh processes.

Freed memory is kept: a step-like pattern (64 MiB in 1 MiB blocks, then one block of 48 MiB, above
glibc's 32 MiB cap for the mmap threshold, allocated, touched and freed together, five times). With
glibc's defaults the big block is mapped and faulted in afresh on every pass (the 1 MiB blocks are
reused once glibc has raised its threshold for them); with the setting the heap settles within a
few passes (measured: the second and third still fault some pages while the free space is laid
out) and the last pass reuses the earlier ones' pages.

Denormals are flushed on every thread: a 2-thread elementwise product of denormal float32 values
comes out all zero only when the OpenMP worker flushes them too (torch.set_flush_denormal alone sets
the calling thread: half of the product stays denormal).
"""

import json
import subprocess
import sys

import pytest

from conftest import REPO, child_env

MEMORY_PROBE = """
import json, resource, sys, torch
from megatron_greats.parallel import cpu_runtime
applied = cpu_runtime.keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(1 << 18) for _ in range(64)] + [torch.ones(12 << 20)]
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""
PAGES = (48 << 20) // 4096  # the big block's: glibc's defaults map it afresh on every pass, whatever they learn

DENORMAL_PROBE = """
import json, sys, torch
from megatron_greats.parallel import cpu_runtime
torch.set_num_threads(2)
tiny = torch.full((1 << 20,), 1e-40)       # below float32's smallest normal number (1.2e-38)
torch.ones(4096, 4096).sum()                # the OpenMP workers exist before the setting
applied = cpu_runtime.flush_denormals() if sys.argv[1] == "all" else torch.set_flush_denormal(True)
print(json.dumps({"applied": applied, "denormal": int((tiny * 1.0 != 0).sum()), "n": tiny.numel()}))
"""


def _probe(code: str, mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, mode], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_faulting_its_pages_in_again():
    kept = _probe(MEMORY_PROBE, "keep")
    if not kept["applied"]:
        pytest.skip("this C library has no glibc mallopt")
    default = _probe(MEMORY_PROBE, "default")
    if default["faults"][-1] < PAGES // 2:
        pytest.skip(f"this C library's defaults already reuse freed memory ({default['faults']} faults)")
    assert kept["faults"][-1] < PAGES // 10, (kept, default)


def test_denormals_are_flushed_on_every_openmp_thread():
    flushed = _probe(DENORMAL_PROBE, "all")
    if not flushed["applied"]:
        pytest.skip("this CPU or OpenMP runtime cannot flush denormals on every thread")
    assert flushed["denormal"] == 0, flushed
    calling_thread_only = _probe(DENORMAL_PROBE, "main")
    assert 0 < calling_thread_only["denormal"] < calling_thread_only["n"], calling_thread_only  # the probe can see it
