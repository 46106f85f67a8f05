"""Per step and data-parallel replica: draw candidates, score them, select k, agree on the selection.

The first rank of the replica's model-parallel group (tensor x pipeline) runs the selector and
broadcasts the picks to the rest of its group, so every rank of a replica trains on the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_greats.parallel.state import Layout, any_rank, device
from megatron_greats.selection import METHODS, select
from megatron_greats.training.candidates import CandidateStream
from megatron_greats.training.scoring import ScoringPass
from megatron_greats.training.telemetry import PhaseClock

# The ranking score reported for selected vs rejected candidates, per method.
REPORTED_SCORE = {"greats": "val_alignment", "first_order": "val_alignment", "gradnorm": "grad_norm",
                  "maxloss": "losses", "rholoss": "excess_loss"}


@dataclass
class StepChoice:
    ids: np.ndarray                       # the k training sample ids of this replica, in pick order
    candidates: Optional[np.ndarray] = None
    gains: Optional[np.ndarray] = None
    scores: Optional[np.ndarray] = None   # per candidate (see REPORTED_SCORE), or None
    picked: Optional[np.ndarray] = None   # positions of the picks among the candidates
    validation: Optional[np.ndarray] = None  # the val sample ids scored against (methods that use the Gram)
    eta: Optional[float] = None           # the greedy's step size (greats)
    seconds: dict = field(default_factory=dict)
    skipped: bool = False                 # the scores held NaN/Inf on some replica: no selection, no update


class StepSelector:
    def __init__(self, cfg, engine, data, layout: Layout, reference_module=None):
        sel = cfg.selection
        self.cfg, self.data, self.layout, self.method = cfg, data, layout, sel.method
        self.k, self.n = cfg.num_selected(layout.world_size), cfg.num_candidates(layout.world_size)
        per_replica = self.k if self.method == "regular" else self.n
        self.stream = CandidateStream(len(data.train), len(data.val), per_replica, sel.val_batch, layout, cfg.seed)
        needs = METHODS[self.method].needs
        self.with_gram = "gram" in needs or "val_alignment" in needs
        self.scoring = None
        if needs:
            self.scoring = ScoringPass(engine.module, layout, engine=engine, exclude=sel.score_exclude,
                                       micro_batch=sel.score_micro_batch if self.with_gram else None,
                                       gram=self.with_gram)
        self.reference = None
        if reference_module is not None:
            self.reference = ScoringPass(reference_module, layout, engine=engine, gram=False)
        self.greats_options = {"self_term": sel.self_term, "batch_mean": sel.batch_mean}
        self.use_clock(PhaseClock())

    def use_clock(self, clock: PhaseClock) -> None:
        """Where the phase seconds of each step go (a benchmark passes one that synchronises)."""
        self.clock = clock
        for scoring in (self.scoring, self.reference):
            if scoring is not None:
                scoring.use_clock(clock)

    def choose(self, step: int, lr: float) -> StepChoice:
        if self.method == "regular":  # trains on the stream; logged like a selection of all k "candidates"
            ids = self.stream.candidates(step)
            return StepChoice(ids=ids, candidates=ids, gains=np.zeros(0), picked=np.arange(len(ids)))
        candidates = self.stream.candidates(step)
        validation = self.stream.validation(step) if self.with_gram else None
        self.clock.take()
        inputs = self._score(candidates, validation)
        scoring = self.clock.take()
        with self.clock.phase("selection"):
            eta = self.cfg.selection.eta if self.cfg.selection.eta is not None else lr
            picked, gains = self._select_and_broadcast(step, eta, inputs)
            skipped = any_rank(bool(picked[0] < 0), device())  # every replica skips the step together
            scores = None if skipped else self._reported_score(inputs)
        seconds = {"scoring": sum(scoring.values()), **scoring, **self.clock.take()}
        if skipped:
            return StepChoice(ids=np.zeros(0, dtype=np.int64), candidates=candidates, skipped=True, seconds=seconds)
        return StepChoice(ids=candidates[picked], candidates=candidates, gains=gains, picked=picked, scores=scores,
                          seconds=seconds, validation=validation, eta=eta if self.method == "greats" else None)

    def _score(self, candidates: np.ndarray, validation: Optional[np.ndarray]) -> dict:
        if self.scoring is None:
            return {}
        tokens = self.data.train.get(candidates)
        if validation is not None:
            tokens = torch.cat([tokens, self.data.val.get(validation)])
        losses, gram = self.scoring.run(tokens, with_gram=self.with_gram)
        n = self.n
        inputs = {"losses": losses[:n]}
        if gram is not None:
            inputs["gram"] = gram[:n, :n]
            inputs["val_alignment"] = gram[:n, n:].mean(dim=1)  # <g_i, mean validation gradient>
        if self.reference is not None:
            inputs["reference_losses"], _ = self.reference.run(self.data.train.get(candidates), with_gram=False)
        return inputs

    def _select_and_broadcast(self, step: int, eta: float, inputs: dict):
        from megatron.core import parallel_state as ps

        picked = torch.zeros(self.k, dtype=torch.int64, device=device())
        gains = torch.zeros(self.k, dtype=torch.float64, device=device())
        selecting = dist.get_rank() == ps.get_model_parallel_src_rank()
        if selecting and not _all_finite(inputs):
            picked.fill_(-1)  # NaN/Inf scores: no selection this step
        elif selecting:
            seed = np.random.SeedSequence([self.cfg.seed, step, self.layout.data_rank]).generate_state(1)[0]
            generator = torch.Generator().manual_seed(int(seed))
            choice = select(self.method, self.k, self.n, eta=eta, generator=generator,
                            greats_options=self.greats_options, **inputs)
            picked.copy_(choice.picked)
            gains.copy_(choice.scores.to(torch.float64))
        group = ps.get_model_parallel_group()
        if dist.get_world_size(group) > 1:
            dist.broadcast(picked, ps.get_model_parallel_src_rank(), group=group)
            dist.broadcast(gains, ps.get_model_parallel_src_rank(), group=group)
        return picked.cpu().numpy(), gains.cpu().numpy()

    def _reported_score(self, inputs: dict) -> Optional[np.ndarray]:
        kind = REPORTED_SCORE.get(self.method)
        if kind == "grad_norm":
            score = torch.diagonal(inputs["gram"])
        elif kind == "excess_loss":
            score = inputs["losses"] - inputs["reference_losses"]
        elif kind is None:
            return None
        else:
            score = inputs[kind]
        return score.detach().double().cpu().numpy()


def _all_finite(inputs: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in inputs.values() if torch.is_tensor(v))
