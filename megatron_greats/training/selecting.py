"""Per step and data-parallel replica: select k of the candidates from their scores, and agree on it.

The first rank of the replica's model-parallel group (tensor x pipeline) runs the selection method and
broadcasts the picks to the rest of its group, so every rank of a replica trains on the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_greats.choices import COSINE
from megatron_greats.parallel.state import Layout, device
from megatron_greats.selection import SelectorInputs, select, unit_gradients
from megatron_greats.selection.greedy import greedy_step
from megatron_greats.selection.catalog import EXCESS_LOSS, GRAD_NORM


@dataclass
class StepChoice:
    ids: np.ndarray                       # the k training sample ids of this replica, in pick order
    candidates: Optional[np.ndarray] = None
    gains: Optional[np.ndarray] = None
    scores: Optional[np.ndarray] = None   # per candidate (the method's `reported` score), or None
    picked: Optional[np.ndarray] = None   # positions of the picks among the candidates
    validation: Optional[np.ndarray] = None  # ids in the selection split scored against (Gram methods)
    prefiltered: Optional[np.ndarray] = None  # positions of the M candidates the prefilter kept (None: all)
    score_window: Optional[list] = None   # [offset, length] of the scored tokens (None: the whole sequence)
    eta: Optional[float] = None           # the greedy's step size (greats)
    preconditioner: Optional[str] = None  # what scaled the scores: "adam", "none", or why none (Gram methods)
    rank_one_error: Optional[float] = None  # the largest error of its rank-1 fits (ghost path), if any
    # per pick, the greedy's alignment term step <g_j, g_val> (its gain is this less the interaction with
    # the picks before it, and the self term if on): methods with an interaction term only
    alignment_terms: Optional[np.ndarray] = None
    seconds: dict = field(default_factory=dict)
    skipped: bool = False                 # the scores held NaN/Inf on some replica: no selection, no update
    method: Optional[str] = None          # the selection method that took the step (its strategy's)


class Selector:
    def __init__(self, cfg, layout: Layout):
        sel = cfg.selection
        self.cfg, self.layout, self.method = cfg, layout, sel.method
        self.k, self.n = cfg.num_selected(layout.world_size), cfg.num_candidates(layout.world_size)
        self.scored = cfg.num_scored(layout.world_size)  # N, or the prefilter's M
        self.spec = cfg.method
        self.needs_gram, self.needs_scores = self.spec.needs_gram, self.spec.scores
        self.greats_options = {"self_term": sel.self_term, "batch_mean": sel.batch_mean,
                               "temperature": sel.temperature}
        self.cosine = sel.alignment == COSINE

    def prepared(self, inputs: SelectorInputs) -> SelectorInputs:
        return unit_gradients(inputs) if self.cosine and inputs.gram is not None else inputs

    def select(self, step: int, eta: float, inputs: SelectorInputs) -> tuple:
        """(picked positions [k], gains [k]) on every rank of the model-parallel group; picked[0] < 0
        when the selecting rank found NaN/Inf in the scores."""
        from megatron.core import parallel_state as ps

        picked = torch.zeros(self.k, dtype=torch.int64, device=device())
        gains = torch.zeros(self.k, dtype=torch.float64, device=device())
        selecting = dist.get_rank() == ps.get_model_parallel_src_rank()
        if selecting and not inputs.all_finite():
            picked.fill_(-1)  # NaN/Inf scores: no selection this step
        elif selecting:
            seed = np.random.SeedSequence([self.cfg.seed, step, self.layout.data_rank]).generate_state(1)[0]
            generator = torch.Generator().manual_seed(int(seed))
            choice = select(self.method, self.k, len(inputs.losses) if inputs.losses is not None else self.n, eta=eta, generator=generator,
                            greats_options=self.greats_options, **self.prepared(inputs).tensors())
            picked.copy_(choice.picked)
            gains.copy_(choice.scores.to(torch.float64))
        group = ps.get_model_parallel_group()
        if dist.get_world_size(group) > 1:
            dist.broadcast(picked, ps.get_model_parallel_src_rank(), group=group)
            dist.broadcast(gains, ps.get_model_parallel_src_rank(), group=group)
        return picked.cpu().numpy(), gains.cpu().numpy()

    def alignment_terms(self, inputs: SelectorInputs, picked: np.ndarray, eta: float) -> Optional[np.ndarray]:
        """Per pick (positions among the scored candidates), the greedy's alignment term, as it scored
        it (cosine: of unit gradients); None for methods without an interaction term."""
        if not self.spec.interaction:
            return None
        step = greedy_step(eta, self.k, self.greats_options["batch_mean"])
        alignment = self.prepared(inputs).val_alignment.detach().double().cpu()
        return (step * alignment[torch.as_tensor(picked)]).numpy()

    def prefilter(self, losses: torch.Tensor) -> np.ndarray:
        """The positions (ascending) of the M = selection.prefilter highest losses, ties to the lower
        position; decided on the selecting rank and broadcast, like the picks. All -1 when the losses
        hold NaN/Inf."""
        from megatron.core import parallel_state as ps

        kept = torch.argsort(-losses.to(torch.float64), stable=True)[:self.scored].sort().values
        kept = kept.to(device=device(), dtype=torch.int64)
        if not bool(torch.isfinite(losses).all()):
            kept.fill_(-1)  # NaN/Inf losses: the step is skipped, as with any non-finite score
        group = ps.get_model_parallel_group()
        if dist.get_world_size(group) > 1:
            dist.broadcast(kept, ps.get_model_parallel_src_rank(), group=group)
        return kept.cpu().numpy()

    def reported_score(self, inputs: SelectorInputs) -> Optional[np.ndarray]:
        kind = self.spec.reported
        if kind == GRAD_NORM:
            score = torch.diagonal(inputs.gram)
        elif kind == EXCESS_LOSS:
            score = inputs.losses - inputs.reference_losses
        elif kind is None:
            return None
        else:
            score = getattr(inputs, kind)
        return score.detach().double().cpu().numpy()
