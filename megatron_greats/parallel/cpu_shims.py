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

    # DeepSpeed compiles a shared-memory all-reduce op at init on CPU (55-90 s with ninja). gloo
    # does the same reductions; skip the build.
    # (through sys.modules: the attribute deepspeed.comm.torch is shadowed by the torch module)
    import importlib

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    _applied = True
