"""What one training step does, as a strategy object: draw, score, select, update.

RegularStep: k samples straight from the stream, an ordinary DeepSpeed step on them.
TwoPassStep: score the candidates (and validation samples), select k, then an ordinary DeepSpeed
step on the k selected samples (a second forward/backward).
SinglePassStep (selection.update=single_pass): the same scoring and selection, then an update formed
from the scoring pass's own layer operands, handed to DeepSpeed for the optimizer step.
PhasedStep (selection.early_method, early_steps): one of those for selection.early_method's steps, one
for selection.method's, on the same engine; each step is handed to the one its number falls to.
The strategy owns the step's phase clock; the trainer only keeps the cadence (log, evaluate, save).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from megatron_greats.selection.catalog import SINGLE_PASS
from megatron_greats.parallel.state import Layout, any_rank, device
from megatron_greats.phases import ALLREDUCE, SELECTION, TRAINING
from megatron_greats.selection import SelectorInputs
from megatron_greats.training.candidates import CandidateStream, ReplicaBatches
from megatron_greats.training.executors import data_parallel_mean
from megatron_greats.training.preconditioning import StepScaler
from megatron_greats.training.scoring import ScoredBatch, ScoreWindow, ScoringPass
from megatron_greats.training.selecting import Selector, StepChoice
from megatron_greats.training.target import TargetEMA
from megatron_greats.training.telemetry import PhaseClock


@dataclass
class StepResult:
    choice: StepChoice
    loss: float       # the training loss (NaN when nothing was trained)
    skipped: bool     # NaN/Inf in the scores or the gradients: no update happened
    phase: Optional[int] = None  # phase gating: 0 (selection.early_method took the step) or 1; None: no phases


class StepStrategy:
    """What every strategy shares: the stream of samples, the ordinary DeepSpeed step, the phase clock.
    A strategy chooses this replica's k samples (choose) and updates the model on them (update)."""

    scoring = None  # the scoring pass, where the strategy has one

    def __init__(self, cfg, data, layout: Layout, engine, executor, per_replica: int):
        self.cfg, self.method = cfg, cfg.selection.method  # the config its steps are taken with, and its method
        self.data, self.layout, self.executor, self.engine = data, layout, executor, engine
        # the selector's own split: val and test, which judge the run, are never shown to it
        self.stream = CandidateStream(len(data.train), len(data.selection), per_replica, cfg.selection.val_batch,
                                      layout, cfg.seed)
        self.batches = ReplicaBatches(layout, cfg.train.micro_batch)
        self.use_clock(PhaseClock())

    def use_clock(self, clock: PhaseClock) -> None:
        """Where the phase seconds of each step go (a benchmark passes one that synchronises)."""
        self.clock = clock

    def strategies(self) -> list:
        """The strategies that take this run's steps, in step order: this one."""
        return [self]

    def take(self, step: int, lr: float) -> StepResult:
        try:
            choice = self.choose(step, lr)
            choice.method = self.method
            loss = float("nan")
            if not choice.skipped:
                with self.clock.phase(TRAINING):
                    loss = self.update(choice)
                choice.seconds.update(self.clock.take())
        finally:
            if self.scoring is not None:
                self.scoring.release()  # whatever the scoring pass still holds
        return StepResult(choice, loss, choice.skipped or not self.engine.was_step_applied())

    def choose(self, step: int, lr: float) -> StepChoice:
        raise NotImplementedError

    def update(self, choice: StepChoice) -> float:
        return self.train(choice.ids)

    def save_state(self, folder) -> None:
        """Write what the strategy carries from step to step into a checkpoint folder (step_N)."""

    def load_state(self, folder) -> None:
        """Read it back on resume, before anything is loaded into the engine."""

    def train(self, ids: np.ndarray) -> float:
        """An ordinary DeepSpeed step on this replica's samples `ids`."""
        return self.executor.train(self.batches.micro_batches(self.data.train, ids))


class RegularStep(StepStrategy):
    """Plain training: k samples straight from the stream, an ordinary step on them. Logged like a
    selection that takes all k of k candidates."""

    def __init__(self, cfg, data, layout: Layout, engine, executor, reference_module=None):
        super().__init__(cfg, data, layout, engine, executor, per_replica=cfg.num_selected(layout.world_size))

    def choose(self, step: int, lr: float) -> StepChoice:
        ids = self.stream.candidates(step)
        return StepChoice(ids=ids, candidates=ids, gains=np.zeros(0), picked=np.arange(len(ids)))


class TwoPassStep(StepStrategy):
    keep_operands = False  # the scoring pass frees each layer's operands once its Gram part is formed

    def __init__(self, cfg, data, layout: Layout, engine, executor, reference_module=None):
        sel, spec = cfg.selection, cfg.method
        super().__init__(cfg, data, layout, engine, executor, per_replica=cfg.num_candidates(layout.world_size))
        self.selector = Selector(cfg, layout)
        self.scaler = StepScaler(cfg, engine, self.selector.k)
        self.reference = None
        self.window = ScoreWindow.of(cfg) if spec.reads("score_window") else ScoreWindow()
        self.prefilter = sel.prefilter if spec.reads("prefilter") else None
        self.reports_eta = spec.reads("eta")
        if spec.scores:
            gram = spec.needs_gram
            self.scoring = ScoringPass(engine.module, layout, executor, exclude=sel.score_exclude,
                                       micro_batch=sel.score_micro_batch if gram else None, gram=gram,
                                       keep_operands=self.keep_operands,
                                       top_layers=sel.score_layers if gram else None)
        if reference_module is not None:
            self.reference = ScoringPass(reference_module, layout, executor, gram=False)
        # what the Gram covers (fixed for the run): where a preconditioner is read
        self.gram_params = self.scoring.parameters() if spec.needs_gram else []
        # selection.target_ema: the alignment target averaged over steps (training/target.py)
        self.target = TargetEMA(sel.target_ema, self.scoring.recorder.names) \
            if spec.reads("target_ema") and sel.target_ema > 0 else None
        self.use_clock(self.clock)

    def save_state(self, folder) -> None:
        if self.target is not None:
            self.target.save(folder, self.layout)

    def load_state(self, folder) -> None:
        if self.target is not None:
            self.target.load(folder, self.layout)

    def use_clock(self, clock: PhaseClock) -> None:
        self.clock = clock
        for scoring in (self.scoring, getattr(self, "reference", None)):
            if scoring is not None:
                scoring.use_clock(clock)

    # ---- draw, score, select ------------------------------------------------------------------------
    def choose(self, step: int, lr: float) -> StepChoice:
        selector = self.selector
        candidates = self.stream.candidates(step)
        validation = self.stream.validation(step) if selector.needs_gram else None
        self.clock.take()
        with self.clock.phase(ALLREDUCE):  # Adam's state, gathered over data-parallel ranks under ZeRO
            scale = self.scaler.for_step(lr, self.gram_params, slice(0, selector.scored))
        offset = self.window.offset(step)
        kept, losses = self.prefiltered(candidates, offset)
        if kept is not None:
            inputs = self.score(candidates[kept], validation, offset, scale.preconditioning, losses=losses,
                                target=self.target)
        scoring = self.clock.take()
        with self.clock.phase(SELECTION):
            picked, gains = selector.select(step, scale.eta, inputs) if kept is not None else (np.full(1, -1), None)
            skipped = any_rank(bool(picked[0] < 0), device())  # every replica skips the step together
            if self.target is not None and skipped:
                self.target.discard()
            elif self.target is not None:  # the step's g_val joins the target only where the selection stands
                self.target.commit()
            scores = None if skipped else selector.reported_score(inputs)
            alignment_terms = None if skipped else selector.alignment_terms(inputs, picked, scale.eta)
        seconds = {"scoring": sum(scoring.values()), **scoring, **self.clock.take()}
        if skipped:
            return StepChoice(ids=np.zeros(0, dtype=np.int64), candidates=candidates, skipped=True, seconds=seconds)
        picked = kept[picked]  # positions among the N candidates
        if scores is not None and len(kept) < len(candidates):  # NaN for the candidates the prefilter dropped
            spread = np.full(len(candidates), np.nan)
            spread[kept] = scores
            scores = spread
        return StepChoice(ids=candidates[picked], candidates=candidates, gains=gains, picked=picked, scores=scores,
                          seconds=seconds, validation=validation,
                          prefiltered=kept if self.prefilter is not None else None,
                          score_window=self.window.logged(step),
                          eta=scale.eta if self.reports_eta else None,
                          preconditioner=scale.label if selector.needs_gram else None,
                          rank_one_error=scale.rank_one_error(), alignment_terms=alignment_terms)

    def prefiltered(self, candidates: np.ndarray, offset: int) -> tuple:
        """(positions of the candidates to score, ascending; their losses where already known). With
        selection.prefilter = M: a forward over all N, then the M highest losses (None: NaN/Inf losses,
        the step is skipped)."""
        if self.prefilter is None:
            return np.arange(len(candidates)), None
        losses = self.scoring.losses(self.window.cut(self.data.train.get(candidates), offset))
        kept = self.selector.prefilter(losses)
        if kept[0] < 0:
            return None, None
        return kept, losses[torch.as_tensor(kept, device=losses.device)]

    def score(self, candidates: np.ndarray, validation, offset: int = 0, preconditioning=None,
              losses=None, target=None) -> SelectorInputs:
        """The selector's inputs for `candidates` (their losses too, where known: the prefilter's)."""
        if self.scoring is None:
            return SelectorInputs()
        tokens = self.window.cut(self.data.train.get(candidates), offset)
        if validation is not None:
            scored = ScoredBatch.of(tokens, self.window.cut(self.data.selection.get(validation), offset))
            inputs = self.scoring.scores(scored, preconditioning, target=target)
        else:
            inputs = SelectorInputs(losses=self.scoring.losses(tokens) if losses is None else losses)
        if self.reference is not None:
            inputs.reference_losses = self.reference.losses(tokens)
        return inputs


class SinglePassStep(TwoPassStep):
    """score -> select -> the update formed from the scoring pass's own operands: the weight gradient of
    the selected samples is sum_i B_i^T A_i / k (one GEMM over the selected rows per layer), so there is
    no second forward/backward. Exact when the scoring forward equals the training forward: same weights,
    and no dropout (refused by the config). The scoring pass keeps every layer's operands until the
    update and frees them right after it."""

    keep_operands = True

    def update(self, choice) -> float:
        k = len(choice.picked)
        # the scoring pass's rows: the candidates the prefilter kept (ascending), or all of them
        rows = torch.as_tensor(choice.picked if choice.prefiltered is None else
                               np.searchsorted(choice.prefiltered, choice.picked))
        self.executor.apply_gradients(self.scoring.mean_gradient(rows))  # over this replica's k selected samples
        losses = self.scoring.last_losses
        return data_parallel_mean(losses[rows.to(losses.device)].mean(), self.layout)


class PhasedStep:
    """Phase gating: steps 0 .. early_steps - 1 are taken by `early` (a strategy built from
    Config.early_config(): selection.method = early_method), the rest by `main`. Each is a whole
    strategy of its own (its candidate stream, scoring pass, selector), so a step is taken exactly as a
    run of its method takes it, and the candidates of a step are those that method's run draws at it
    (a pure function of seed and step). Nothing is carried from one to the other but the engine: a
    run resumed in either phase goes on as it would have. Both scoring passes are built on the one
    module; each records in a capture scoped to its own step (ghost/recorder.py) and releases it at the
    end of the step, so only one step's operands are ever held."""

    def __init__(self, early: StepStrategy, main: StepStrategy, early_steps: int):
        self.early, self.main, self.early_steps = early, main, early_steps

    def strategies(self) -> list:
        return [self.early, self.main]

    def phase(self, step: int) -> int:
        """0 for the early steps, 1 after them."""
        return int(step >= self.early_steps)

    def use_clock(self, clock: PhaseClock) -> None:
        for strategy in self.strategies():
            strategy.use_clock(clock)

    def _carrying(self) -> list:
        """The strategies whose state a checkpoint keeps: a target both phases share, once."""
        shared = getattr(self.early, "target", None) is not None and self.early.target is self.main.target
        return [self.main] if shared else self.strategies()

    def save_state(self, folder) -> None:
        for strategy in self._carrying():
            strategy.save_state(folder)

    def load_state(self, folder) -> None:
        for strategy in self._carrying():
            strategy.load_state(folder)

    def take(self, step: int, lr: float) -> StepResult:
        phase = self.phase(step)
        result = self.strategies()[phase].take(step, lr)
        result.phase = phase
        return result


def step_strategy(cfg, data, layout: Layout, engine, executor, reference_module=None):
    """The step of selection.update, as the config resolves it (Config.update_mode: single_pass needs a
    scoring pass with a backward over every sample, every layer and the whole sequence); with phase
    gating a PhasedStep of the early method's step and selection.method's.
    reference_module: rholoss's reference model, given to the phase whose method reads it."""
    strategies = []
    for phase in cfg.phases():
        if phase.method.from_stream:
            kind = RegularStep
        else:
            kind = SinglePassStep if phase.update_mode() == SINGLE_PASS else TwoPassStep
        reference = reference_module if phase.method.needs_reference else None
        strategies.append(kind(phase, data, layout, engine, executor, reference_module=reference))
    if len(strategies) == 1:
        return strategies[0]
    early, main = strategies
    if getattr(early, "target", None) is not None and getattr(main, "target", None) is not None:
        # both phases read selection.target_ema: one average of the validation gradients over the whole run
        # (it does not depend on the method; one file in a checkpoint)
        early.target = main.target
    return PhasedStep(early, main, early_steps=cfg.selection.early_steps)
