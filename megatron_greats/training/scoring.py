"""The scoring pass: per-sample losses of a step's candidates and validation samples, and their Gram.

It runs on the model's module (not through the engine: no DeepSpeed gradient hooks), in eval mode,
with the GhostRecorder capturing every supported layer (parameters frozen: no weight gradient is
formed, no .grad is written), through the layout's executor (executors.py): with pipeline
parallelism that is a DeepSpeed schedule of its own. The samples go through in micro-batches of
`micro_batch` (all at once by default); the Gram covers every pair across micro-batches. Every rank
of the model-parallel group ends with the same losses and Gram.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_greats import deepspeed_internals
from megatron_greats.choices import WINDOW_START
from megatron_greats.errors import ConfigError
from megatron_greats.ghost import GhostRecorder
from megatron_greats.ghost.recorder import matches
from megatron_greats.ghost.layers import supported_layer_names
from megatron_greats.model.gpt import parameters_below_top_layers
from megatron_greats.parallel.state import Layout
from megatron_greats.selection import SelectorInputs
from megatron_greats.training.candidates import micro_batches
from megatron_greats.training.executors import eval_mode
from megatron_greats.training.telemetry import PhaseClock


@dataclass
class ScoredBatch:
    """The samples of one scoring pass: the N candidates, then the m validation samples."""
    tokens: torch.Tensor      # [N + m, seq + 1]
    candidates: slice
    validation: slice

    @classmethod
    def of(cls, candidate_tokens: torch.Tensor, validation_tokens: Optional[torch.Tensor] = None) -> "ScoredBatch":
        n = candidate_tokens.shape[0]
        m = 0 if validation_tokens is None else validation_tokens.shape[0]
        tokens = candidate_tokens if m == 0 else torch.cat([candidate_tokens, validation_tokens])
        return cls(tokens, slice(0, n), slice(n, n + m))


def closest_names(pattern: str, names: list, count: int = 3) -> list:
    """The `count` parameter names closest to a pattern (its wildcards left out), comparing it with the
    whole name and with each dotted part of it ('*wrod*' is closest to names with a part 'word')."""
    core = re.sub(r"[*?\[\]]", "", pattern)

    def likeness(name: str) -> float:
        return max(difflib.SequenceMatcher(None, core, part).ratio() for part in [name, *name.split(".")])
    return sorted(names, key=lambda name: (-likeness(name), name))[:count]


# one stream of the run's seed per use (data/splits and the selector draw from others)
_WINDOW_STREAM = 0x5C0E


@dataclass(frozen=True)
class ScoreWindow:
    """What the scoring pass reads of each sample (selection.score_window, score_window_at): `length`
    tokens and their labels from `offset` on, or the whole sequence (length None). Training reads the
    whole sequence. The offset depends only on the seed and the step: the same at every layout."""
    length: Optional[int] = None
    at: str = WINDOW_START
    seq_len: int = 0
    seed: int = 0

    @classmethod
    def of(cls, cfg) -> "ScoreWindow":
        sel = cfg.selection
        return cls(sel.score_window, sel.score_window_at, cfg.model.seq_len, cfg.seed)

    def offset(self, step: int) -> int:
        if self.length is None or self.at == WINDOW_START:
            return 0
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, step, _WINDOW_STREAM]))
        return int(rng.integers(0, self.seq_len - self.length + 1))

    def cut(self, tokens: torch.Tensor, offset: int) -> torch.Tensor:
        """tokens [n, seq + 1] -> [n, length + 1] (inputs and labels of the window)."""
        return tokens if self.length is None else tokens[:, offset: offset + self.length + 1]

    def logged(self, step: int) -> Optional[list]:
        """[offset, length] for selection.jsonl; None: the whole sequence."""
        return None if self.length is None else [self.offset(step), self.length]


class ScoringPass:
    def __init__(self, module: torch.nn.Module, layout: Layout, executor=None, exclude=(), micro_batch=None,
                 gram: bool = True, keep_operands: bool = False, top_layers: Optional[int] = None):
        """module: the model (or this stage of it) to score with; executor: the layout's (executors.py);
        gram: whether Gram-based scores will be asked for (then every trainable parameter must be
        covered by a capture rule or excluded by a pattern); keep_operands: keep every trainable
        parameter's operands for an update formed from them (then every one must be covered);
        top_layers: score only the top L transformer layers and what lies above them
        (selection.score_layers). Nothing below them is captured, so nothing there requires grad: the
        scoring forward keeps no autograd state below them and the backward stops there."""
        self.module, self.layout, self.executor, self.micro_batch = module, layout, executor, micro_batch
        self.top_layers = top_layers
        self.capture = None      # the last scores() call's GhostCapture, until release()
        self.last_losses = None  # of the last scores() call, until release()
        below = parameters_below_top_layers(module, top_layers) if top_layers is not None else set()
        below_names = [name for name, p in module.named_parameters() if p in below]
        self.recorder = GhostRecorder(module, exclude=list(exclude) + below_names, batch_dim=1,
                                      keep_operands=keep_operands)
        uncovered = self.recorder.uncovered() if gram or keep_operands else []
        allowed = ("a supported layer type (selection.update=single_pass forms every parameter's gradient from "
                   "the scoring pass), or selection.update=two_pass") if keep_operands else \
            "a supported layer type, or a selection.score_exclude pattern that names it"
        if uncovered:  # the Gram would silently leave them out of every score
            names = ", ".join(f"'{name}'" for name in uncovered[:5])
            more = f" and {len(uncovered) - 5} more" if len(uncovered) > 5 else ""
            raise ConfigError(f"selection scoring: parameter {names}{more} is in no supported layer "
                              f"(supported: {', '.join(supported_layer_names())}); allowed: {allowed}")
        if gram and (exclude or top_layers is not None):
            self._check_exclude(list(exclude))
        # a pipeline stage sends a gradient to the stage below only if something below is scored
        self.input_grad = gram and self._captured_below()
        self.use_clock(PhaseClock())  # seconds of score_forward / score_backward / ... per run

    def _captured_below(self) -> bool:
        """Whether an earlier pipeline stage captures anything (every rank of the pipeline calls this)."""
        if self.layout.pipeline == 1:
            return False  # the first stage's input is token ids
        from megatron.core import parallel_state as ps

        group = ps.get_pipeline_model_parallel_group()
        captured = [None] * dist.get_world_size(group)
        dist.all_gather_object(captured, bool(self.recorder.captured), group=group)
        return any(captured[:ps.get_pipeline_model_parallel_rank()])

    def _check_exclude(self, patterns: list) -> None:
        """Refuse selection.score_exclude patterns that match no parameter (almost always a typo: the user
        would believe something is left out of the score), or that together leave no trainable
        parameter in it (every gain would be 0, and GREATS would take the first k candidates: Regular at
        the cost of scoring). With a pipeline each stage holds some of the names: the stages of the
        model-parallel group decide together, so every rank raises the same line."""
        names, trainable, scored = self.recorder.parameter_names()
        group = self.recorder.model_parallel_group
        if group is not None and dist.get_world_size(group) > 1:
            gathered = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, (names, trainable, scored), group=group)
            names, trainable, scored = ([name for stage in gathered for name in stage[i]] for i in range(3))
        names, trainable = sorted(set(names)), set(trainable)
        for pattern in patterns:
            if not any(matches(name, [pattern]) for name in names):
                close = ", ".join(f"'{name}'" for name in closest_names(pattern, names))
                raise ConfigError(f"selection.score_exclude pattern '{pattern}' matches no parameter of the model; "
                                  f"closest parameter names: {close}; allowed: fnmatch patterns over the parameter "
                                  "names, such as '*word*'")
        if trainable and not scored:
            layers = "" if self.top_layers is None else f" with selection.score_layers={self.top_layers}"
            raise ConfigError(f"selection.score_exclude={patterns!r}{layers} excludes every trainable parameter from "
                              f"the score (all {len(trainable)}): every gain would be 0 and the selection would take "
                              "the first k candidates; allowed: patterns that leave some parameter scored, or "
                              "selection.method=regular")

    def use_clock(self, clock: PhaseClock) -> None:
        self.clock = clock  # the captures time their products and sums over ranks on it too

    def losses(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-sample losses [n] of tokens [n, seq + 1], forward only."""
        with self._scoring_mode():
            return self.executor.score(self.module, micro_batches(tokens, None), clock=self.clock)

    def scores(self, batch: ScoredBatch, preconditioning=None, target=None) -> SelectorInputs:
        """The candidates' losses, their Gram and their alignment with the mean validation gradient
        (with a Preconditioning of the candidates: <D g_i, D g_j> and <D g_i, g_val>). target: optional
        TargetEMA (training/target.py, selection.target_ema): the alignment is then with its bias-corrected
        G_t, and the step's g_val is staged in it (folded in by its commit())."""
        # the validation samples count only through their mean gradient: one Gram row for all of them
        vectors = None if target is None or batch.validation.stop == batch.validation.start else target.vectors()
        with self._scoring_mode(), self.recorder.capture(preconditioning, averaged=batch.validation,
                                                         clock=self.clock, target=vectors) as capture:
            self.capture = capture  # from here on release() frees it, also where the pass fails
            losses = self.executor.score(self.module, micro_batches(batch.tokens, self.micro_batch),
                                         capture=capture, clock=self.clock, input_grad=self.input_grad)
        self.last_losses = losses  # per sample of the batch (validation samples' too)
        gram, c, v = capture.gram(), batch.candidates, batch.validation
        alignment = gram[c, v.start] if v.stop > v.start else None
        if vectors is not None:
            alignment = target.alignment(alignment, capture.target_alignment()[c])
            target.stage(capture.averaged_gradients())
        return SelectorInputs(losses=losses[c], gram=gram[c, c], val_alignment=alignment)

    def parameters(self) -> list:
        """The parameters the Gram covers, in the same order on every rank."""
        return self.recorder.parameters()

    def mean_gradient(self, rows: torch.Tensor) -> dict:
        """{param: the mean gradient of the last scores() call's samples `rows`} for every trainable
        parameter (keep_operands=True), formed from the pass's own operands: this rank's shard."""
        if self.capture is None:
            raise RuntimeError("ScoringPass: mean_gradient() before scores(), or after release()")
        weights = torch.zeros(self.capture.num_samples, dtype=torch.float64)
        weights[rows] = 1.0 / len(rows)
        return self.capture.weighted_gradients(weights)

    def release(self) -> None:
        """Free the operands, Gram and losses of the last scoring pass."""
        if self.capture is not None:
            self.capture.release()
        self.capture = self.last_losses = None

    @contextlib.contextmanager
    def _scoring_mode(self):
        # eval: no dropout in scores; no activation recomputation (the recorder keeps layer inputs anyway,
        # and DeepSpeed's reentrant recomputation would run the capture inside backward)
        saved = getattr(self.module, "checkpoint_activations", None)  # SequentialGPT's
        if saved is not None:
            self.module.checkpoint_activations = False
        try:
            with eval_mode(self.module), deepspeed_internals.without_activation_checkpointing(self.module):
                yield  # a PipelineModule's recomputation is off meanwhile
        finally:
            if saved is not None:
                self.module.checkpoint_activations = saved
