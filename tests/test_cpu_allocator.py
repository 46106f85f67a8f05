"""On CPU the process keeps freed memory for its next allocations (parallel/cpu_allocator.py).

Measured in fresh processes, by page faults: a step-like pattern (64 MiB in 1 MiB blocks, allocated,
touched and freed together, three times) with glibc's defaults faults its pages in again, with the
setting the third pass reuses the second's pages.
"""

import json
import subprocess
import sys

import pytest

from conftest import REPO, child_env

PROBE = """
import json, resource, sys, torch
from megatron_greats.parallel import cpu_allocator
applied = cpu_allocator.keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(1 << 18) for _ in range(64)]
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""
PAGES = (64 << 20) // 4096


def _probe(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_faulting_its_pages_in_again():
    kept = _probe("keep")
    if not kept["applied"]:
        pytest.skip("this C library has no glibc mallopt")
    default = _probe("default")
    if default["faults"][1] < PAGES // 2:
        pytest.skip(f"this C library's defaults already reuse freed memory ({default['faults']} faults)")
    assert kept["faults"][2] < PAGES // 10, (kept, default)
