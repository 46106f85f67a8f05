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

import torch
import torch.distributed as dist

from megatron_greats import deepspeed_internals
from megatron_greats.errors import ConfigError
from megatron_greats.ghost import GhostRecorder
from megatron_greats.ghost.recorder import matches
from megatron_greats.ghost.layers import supported_layer_names
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


class ScoringPass:
    def __init__(self, module: torch.nn.Module, layout: Layout, executor=None, exclude=(), micro_batch=None,
                 gram: bool = True, keep_operands: bool = False):
        """module: the model (or this stage of it) to score with; executor: the layout's (executors.py);
        gram: whether Gram-based scores will be asked for (then every trainable parameter must be
        covered by a capture rule or excluded by a pattern); keep_operands: keep every trainable
        parameter's operands for an update formed from them (then every one must be covered)."""
        self.module, self.layout, self.executor, self.micro_batch = module, layout, executor, micro_batch
        self.recorder = GhostRecorder(module, exclude=list(exclude), batch_dim=1, keep_operands=keep_operands)
        uncovered = self.recorder.uncovered() if gram or keep_operands else []
        allowed = ("a supported layer type (selection.update=single_pass forms every parameter's gradient from "
                   "the scoring pass), or selection.update=two_pass") if keep_operands else \
            "a supported layer type, or a selection.score_exclude pattern that names it"
        if uncovered:  # the Gram would silently leave them out of every score
            names = ", ".join(f"'{name}'" for name in uncovered[:5])
            more = f" and {len(uncovered) - 5} more" if len(uncovered) > 5 else ""
            raise ConfigError(f"selection scoring: parameter {names}{more} is in no supported layer "
                              f"(supported: {', '.join(supported_layer_names())}); allowed: {allowed}")
        if gram and exclude:
            self._check_exclude(list(exclude))
        self.use_clock(PhaseClock())  # seconds of score_forward / score_backward / ... per run

    def _check_exclude(self, patterns: list) -> None:
        """Refuse selection.score_exclude patterns that match no parameter (almost always a typo: the user
        would believe something is left out of the score), or that together leave no trainable
        parameter in it (every gain would be 0, and GREATS would take the first k candidates: Regular at
        the cost of scoring). With a pipeline each stage holds some of the names: the stages of the
        model-parallel group decide together, so every rank raises the same line."""
        rec = self.recorder
        names = list(rec.names.values())
        trainable = [rec.names[p] for p in rec.trainable]
        scored = [rec.names[p] for p in rec.trainable if p in rec.scored]
        group = rec.model_parallel_group
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
            raise ConfigError(f"selection.score_exclude={patterns!r} excludes every trainable parameter from the score "
                              f"(all {len(trainable)}): every gain would be 0 and the selection would take the first k "
                              "candidates; allowed: patterns that leave some parameter scored, or "
                              "selection.method=regular")

    def use_clock(self, clock: PhaseClock) -> None:
        self.clock = self.recorder.clock = clock

    def losses(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-sample losses [n] of tokens [n, seq + 1], forward only."""
        with self._scoring_mode():
            return self.executor.score(self.module, micro_batches(tokens, None), clock=self.clock)

    def scores(self, batch: ScoredBatch, preconditioning=None) -> SelectorInputs:
        """The candidates' losses, their Gram and their alignment with the mean validation gradient
        (with a Preconditioning of the candidates: <D g_i, D g_j> and <D g_i, g_val>)."""
        # the validation samples count only through their mean gradient: one Gram row for all of them
        with self._scoring_mode(), self.recorder.capture(preconditioning, averaged=batch.validation):
            losses = self.executor.score(self.module, micro_batches(batch.tokens, self.micro_batch),
                                         recorder=self.recorder, clock=self.clock)
        gram, c, v = self.recorder.gram(), batch.candidates, batch.validation
        return SelectorInputs(losses=losses[c], gram=gram[c, c],
                              val_alignment=gram[c, v.start] if v.stop > v.start else None)

    def release(self) -> None:
        """Free the operands and Gram of the last scoring pass."""
        self.recorder.release()

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
