"""What the optimizer's own state says about the next step: Adam's diagonal and the per-sample step size.

AdamW's step moves parameter p by about lr_t (1 - beta1) / (1 - beta1^t) * D * g, with
D = 1 / (sqrt(v_hat) + eps) from the second moment, for the gradient g of this step. GREATS' utility
assumes an SGD step (D = 1); with `selection.preconditioner: adam` the scores use this D:
    phi_i = eta <D g_i, g_val>,   interaction eta^2 <D g_i, D g_j>
and `selection.eta: auto` is the real per-sample step scale, lr_t (1 - beta1) / ((1 - beta1^t) k)
(a k-sample mean; lr_t / k without the preconditioner, as for SGD).

D is that of the coming step: v_t = beta2 v + (1 - beta2) g^2 with v the optimizer's state and g the
candidates' mean gradient (formed per block of the per-sample gradients, ghost/preconditioning.py), so
a coordinate Adam has not seen yet gets 1 / |g| as Adam's own step will, not 1 / eps. Before the first
step there is no state: no preconditioner (the telemetry says so).

Reading v: ZeRO-0 keeps torch's AdamW state per parameter; ZeRO-1/2 and the bf16 optimizer keep flat
fp32 partitions over the data-parallel ranks, which DeepSpeed maps back to each parameter
(`_hp_mapping`): each rank fills its fragments into one buffer and a single all-reduce over the
data-parallel group assembles every parameter (this rank's tensor/pipeline shard of it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_greats import deepspeed_internals as ds
from megatron_greats.choices import ADAM, ETA_AUTO, NO_PRECONDITIONER
from megatron_greats.ghost.preconditioning import Preconditioning


@dataclass
class StepScale:
    """What the scores of one step are scaled by."""
    eta: float                              # the greedy's step size
    preconditioning: Optional[Preconditioning]
    label: str                              # telemetry: "adam", "none", or why none

    def rank_one_error(self) -> Optional[float]:
        """The largest relative error of the rank-1 fits the ghost path used this step (None: none used)."""
        errors = self.preconditioning.rank_one_errors() if self.preconditioning is not None else {}
        return max(errors.values()) if errors else None


def steps_taken(engine) -> int:
    """Optimizer steps applied so far (skipped non-finite steps do not count): Adam's own t."""
    state = ds.torch_optimizer(engine).state
    steps = [int(s["step"]) for s in state.values() if "step" in s]
    return max(steps, default=0)


def second_moments(engine, params: list) -> dict:
    """{param: Adam's exp_avg_sq} for this rank's shard of each parameter (collective over the
    data-parallel group under ZeRO-1/2 and bf16: every rank of it calls this with the same params)."""
    mapped = [p for p in params if ds.has_state_fragments(p)]
    if not mapped:  # ZeRO-0: torch's state per parameter
        state = ds.torch_optimizer(engine).state
        return {p: state[p]["exp_avg_sq"].detach().float().clone() for p in params}
    # ZeRO-1/2, bf16: fragments of flat partitions; one all-reduce per data-parallel group
    ds.link_state_fragments(engine)
    by_group = {}
    for p in params:
        by_group.setdefault(ds.data_parallel_group(p), []).append(p)
    out = {}
    for group, members in by_group.items():
        sizes = [p.numel() for p in members]
        buffer = torch.zeros(sum(sizes), dtype=torch.float32, device=members[0].device)
        offset = 0
        for p, size in zip(members, sizes):
            fragment = ds.state_fragment(p, "exp_avg_sq")
            if fragment is not None:  # this rank holds part of p's state
                start, numel, values = fragment
                buffer[offset + start: offset + start + numel].copy_(values.reshape(-1))
            offset += size
        dist.all_reduce(buffer, group=group)
        for p, chunk in zip(members, torch.split(buffer, sizes)):
            out[p] = chunk.view(p.shape)
    return out


class StepScaler:
    """Per step: eta and the preconditioning of the candidates' side of the scores."""

    def __init__(self, cfg, engine, k: int):
        sel, t = cfg.selection, cfg.train
        self.engine, self.k = engine, k
        self.preconditioner, self.eta_setting = sel.preconditioner, sel.eta
        self.beta1, self.beta2, self.eps = t.beta1, t.beta2, t.adam_eps

    def for_step(self, lr: float, params: list, candidates: slice) -> StepScale:
        """params: the parameters the Gram covers (in the recorder's order on every rank)."""
        if self.preconditioner == NO_PRECONDITIONER:
            return StepScale(self._eta(lr, adam=False), None, NO_PRECONDITIONER)
        t = steps_taken(self.engine)
        if t == 0:
            return StepScale(self._eta(lr, adam=False), None, "none (step 0: Adam has no second moment yet)")
        pre = Preconditioning(candidates, second_moment=second_moments(self.engine, params), beta2=self.beta2,
                              step=t + 1, eps=self.eps)
        return StepScale(self._eta(lr, adam=True, t=t + 1), pre, ADAM)

    def _eta(self, lr: float, adam: bool, t: int = 1) -> float:
        if self.eta_setting is None:
            return lr
        if self.eta_setting != ETA_AUTO:
            return float(self.eta_setting)
        if not adam:
            return lr / self.k
        return lr * (1.0 - self.beta1) / ((1.0 - self.beta1 ** t) * self.k)
