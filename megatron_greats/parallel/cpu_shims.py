"""Shims for hard-coded CUDA calls inside dependencies, applied only when the accelerator is the CPU.

They change where a dependency allocates, never what it computes; on GPU nothing here runs.
"""

from __future__ import annotations

import torch

_applied = False


def apply() -> None:
    global _applied
    if _applied or torch.cuda.is_available():
        return
    # megatron-core's sequence-parallel gathers and its global memory buffer allocate with
    # device=torch.cuda.current_device(); on a CPU-only torch that call raises.
    torch.cuda.current_device = lambda: "cpu"

    # DeepSpeed compiles a shared-memory all-reduce op at init on CPU; skip the build.
    from megatron_greats import deepspeed_internals

    deepspeed_internals.skip_shm_op_build()
    _applied = True
