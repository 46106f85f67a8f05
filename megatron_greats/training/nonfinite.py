"""Steps whose loss, gradients or Gram hold NaN/Inf are skipped: no selection, no update.

Gram / scoring losses: the selecting rank checks them; every rank then agrees (MAX over the world) and
the whole step is skipped on every replica, so data-parallel collectives stay aligned.
Training: DeepSpeed's ZeRO, bf16 and fp16 optimizers already skip a step whose gradients overflow
(they carry an `overflow` flag and the engine counts the step as skipped). The plain fp32 optimizer
(ZeRO stage 0) does not: guard_optimizer() wraps its step with the same check over the world.
The trainer reads engine.was_step_applied() after each step.
"""

from __future__ import annotations

import torch

from megatron_greats.parallel.state import any_rank


def guard_optimizer(engine, device) -> None:
    """Give an optimizer without DeepSpeed's overflow check one: skip the step when any rank's
    gradients are non-finite, and report it through `overflow` (the engine then counts the step as
    skipped and does not advance the LR schedule, as for its own optimizers)."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "overflow"):
        return  # DeepSpeed's own optimizers check (and agree on) overflow themselves
    real_step = optimizer.step

    def step(*args, **kwargs):
        local_bad = any(p.grad is not None and not torch.isfinite(p.grad).all()
                        for group in optimizer.param_groups for p in group["params"])
        optimizer.overflow = any_rank(local_bad, device)
        if optimizer.overflow:
            return None
        return real_step(*args, **kwargs)

    optimizer.step = step
