"""Gradient clipping for the pipeline engine's fp32, non-ZeRO path.

DeepSpeed clips that path with clip_grad_norm_(mpu=grid), which counts a parameter that is not
tensor-sharded only on model-parallel rank 0 (the first stage): the norms and biases of later stages
drop out of the global norm, and a tied embedding is counted on both stages that hold it. Here every
parameter counts exactly once: tensor-sharded ones on every rank, replicated ones on tensor rank 0 of
their stage, pipeline copies of tied weights (ds_pipe_replicated) never.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def global_grad_norm(parameters, tensor_rank: int, model_parallel_group) -> torch.Tensor:
    squares = torch.zeros((), dtype=torch.float64)
    for p in parameters:
        if p.grad is None or getattr(p, "ds_pipe_replicated", False):
            continue
        if getattr(p, "tensor_model_parallel", False) or tensor_rank == 0:
            squares = squares + p.grad.detach().double().pow(2).sum().cpu()
    squares = squares.to(next(iter(parameters)).device)
    dist.all_reduce(squares, group=model_parallel_group)
    return squares.sqrt()


def install_pipeline_clipping(engine) -> None:
    """Replace the engine's clip_fp32_gradients (used only without ZeRO and without bf16/fp16)."""
    grid = engine.grid

    def clip_fp32_gradients():
        params = [p for p in engine.module.parameters() if p.grad is not None]
        norm = global_grad_norm(params, grid.get_slice_parallel_rank(), grid.get_model_parallel_group())
        coef = min(1.0, engine.gradient_clipping() / (float(norm) + 1e-6))
        for p in params:
            p.grad.detach().mul_(coef)

    engine.clip_fp32_gradients = clip_fp32_gradients
