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


def _torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO, bf16), or the engine's own."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def steps_taken(engine) -> int:
    """Optimizer steps applied so far (skipped non-finite steps do not count): Adam's own t."""
    state = _torch_optimizer(engine).state
    steps = [int(s["step"]) for s in state.values() if "step" in s]
    return max(steps, default=0)


def second_moments(engine, params: list) -> dict:
    """{param: Adam's exp_avg_sq} for this rank's shard of each parameter (collective over the
    data-parallel group under ZeRO-1/2 and bf16: every rank of it calls this with the same params)."""
    mapped = [p for p in params if getattr(p, "_hp_mapping", None) is not None or hasattr(p, "_dp_group")]
    if not mapped:  # ZeRO-0: torch's state per parameter
        state = _torch_optimizer(engine).state
        return {p: state[p]["exp_avg_sq"].detach().float().clone() for p in params}
    # ZeRO-1/2, bf16: fragments of flat partitions; one all-reduce per data-parallel group
    _link_state_fragments(engine)
    by_group = {}
    for p in params:
        by_group.setdefault(p._dp_group, []).append(p)
    out = {}
    for group, members in by_group.items():
        sizes = [p.numel() for p in members]
        buffer = torch.zeros(sum(sizes), dtype=torch.float32, device=members[0].device)
        offset = 0
        for p, size in zip(members, sizes):
            mapping = p._hp_mapping
            if mapping is not None:  # this rank holds part of p's state
                address = mapping.lp_fragment_address
                buffer[offset + address.start: offset + address.start + address.numel].copy_(
                    mapping.get_hp_fragment("exp_avg_sq").reshape(-1))
            offset += size
        dist.all_reduce(buffer, group=group)
        for p, chunk in zip(members, torch.split(buffer, sizes)):
            out[p] = chunk.view(p.shape)
    return out


def _link_state_fragments(engine) -> None:
    """Point every parameter's fragment mapping at the optimizer state of its flat partition.

    DeepSpeed 0.19 links them once, right after the first parameter group's step, when the later
    groups have no state yet (their fragments stay empty); linking again is cheap (views)."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    wrapper, state = engine.optimizer, _torch_optimizer(engine).state
    lp_groups = getattr(wrapper, "bit16_groups", None) or getattr(wrapper, "bf16_groups", None)
    partitions = getattr(wrapper, "single_partition_of_fp32_groups", None) or \
        getattr(wrapper, "fp32_groups_flat_partition", None)
    if lp_groups is None or partitions is None:
        raise NotImplementedError(f"selection.preconditioner=adam: cannot read Adam's state from "
                                  f"{type(wrapper).__name__}")
    for lp, flat in zip(lp_groups, partitions):
        if flat in state:
            lazy_init_hp_params_optimizer_state(lp, flat, state)


class StepScaler:
    """Per step: eta and the preconditioning of the candidates' side of the scores."""

    def __init__(self, cfg, engine, k: int):
        sel, t = cfg.selection, cfg.train
        self.engine, self.k = engine, k
        self.preconditioner, self.eta_setting = sel.preconditioner, sel.eta
        self.beta1, self.beta2, self.eps = t.beta1, t.beta2, t.adam_eps

    def for_step(self, lr: float, params: list, candidates: slice) -> StepScale:
        """params: the parameters the Gram covers (in the recorder's order on every rank)."""
        if self.preconditioner == "none":
            return StepScale(self._eta(lr, adam=False), None, "none")
        t = steps_taken(self.engine)
        if t == 0:
            return StepScale(self._eta(lr, adam=False), None, "none (step 0: Adam has no second moment yet)")
        pre = Preconditioning(candidates, second_moment=second_moments(self.engine, params), beta2=self.beta2,
                              step=t + 1, eps=self.eps)
        return StepScale(self._eta(lr, adam=True, t=t + 1), pre, "adam")

    def _eta(self, lr: float, adam: bool, t: int = 1) -> float:
        if self.eta_setting is None:
            return lr
        if self.eta_setting != "auto":
            return float(self.eta_setting)
        if not adam:
            return lr / self.k
        return lr * (1.0 - self.beta1) / ((1.0 - self.beta1 ** t) * self.k)
