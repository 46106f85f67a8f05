"""Around the optimizer step: the global gradient norm, clipping and the skip of non-finite steps.

DeepSpeed's ZeRO, bf16 and fp16 optimizers do all three themselves: they compute the global norm of
the (data-parallel averaged) gradient before clipping, skip a step whose gradients overflow (their
`overflow` flag; the engine then counts the step as skipped and does not advance the LR schedule) and
keep the norm in `_global_grad_norm`, which engine.get_global_grad_norm() returns.

The plain fp32 optimizer (ZeRO stage 0, plain or pipeline engine) does none of that well: DeepSpeed
clips it with clip_grad_norm_(mpu=...), which counts a parameter that is not tensor-sharded only on
model-parallel rank 0 (under a pipeline the norms and biases of later stages drop out, and a tied
embedding is counted on both stages), never records the norm, and never checks for NaN/Inf.
install_plain_step() gives that optimizer the same behaviour as DeepSpeed's own: every parameter counts
exactly once (tensor-sharded ones on every rank, replicated ones on tensor rank 0 of their stage,
pipeline copies of tied weights (ds_pipe_replicated) never), the norm is recorded, the step is
clipped, and a non-finite step is skipped on every rank.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_greats import deepspeed_internals as ds
from megatron_greats.parallel.state import any_rank


def global_grad_norm(parameters, tensor_rank: int, model_parallel_group) -> torch.Tensor:
    """The 2-norm of the whole model's gradient, the same on every rank of the model-parallel group."""
    parameters = list(parameters)
    squares = torch.zeros((), dtype=torch.float64)
    for p in parameters:
        if p.grad is None or ds.is_pipeline_copy(p):
            continue
        if getattr(p, "tensor_model_parallel", False) or tensor_rank == 0:
            squares = squares + p.grad.detach().double().pow(2).sum().cpu()
    squares = squares.to(parameters[0].device if parameters else "cpu")
    if model_parallel_group is not None and dist.get_world_size(model_parallel_group) > 1:
        dist.all_reduce(squares, group=model_parallel_group)
    return squares.sqrt()


def _model_parallel(engine) -> tuple:
    """(tensor rank, model-parallel group) of this rank, from the pipeline grid or megatron-core."""
    grid = ds.pipeline_grid(engine)
    if grid is not None:
        return grid
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank(), ps.get_model_parallel_group()


def install_plain_step(engine, device) -> None:
    """Norm, clipping and non-finite skip for an optimizer that DeepSpeed does not wrap (see module doc)."""
    optimizer = engine.optimizer
    if ds.wraps_optimizer(optimizer):
        return  # DeepSpeed's own optimizers check (and agree on) overflow and record the norm themselves
    tensor_rank, group = _model_parallel(engine)

    def step(real_step, *args, **kwargs):  # instead of DeepSpeed's clipping and the optimizer's step
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = float(global_grad_norm(params, tensor_rank, group))
        skipped = any_rank(not torch.isfinite(torch.tensor(norm)), device)
        ds.record_step(optimizer, norm, skipped)  # the engine reads both: get_global_grad_norm(), the skip
        if skipped:
            return None
        clip = engine.gradient_clipping()
        if clip > 0 and norm + 1e-6 > clip:  # as ZeRO's unscale_and_clip_grads
            coef = clip / (norm + 1e-6)
            for p in params:
                p.grad.detach().mul_(coef)
        return real_step(*args, **kwargs)

    ds.replace_plain_optimizer_step(engine, step)


def grad_norm(engine) -> Optional[float]:
    """The last step's global gradient norm before clipping, or None where the optimizer keeps none."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)
