"""The scoring pass: per-sample losses of [candidates ; validation], and their gradient Gram.

It runs on the engine's module (not through the engine: no DeepSpeed gradient hooks), in eval mode,
with the GhostRecorder capturing every supported layer (parameters frozen: no weight gradient is
formed, no .grad is written). With pipeline parallelism the stages run DeepSpeed pipeline schedules
of their own (training/scoring_schedule.py): 1F1B forward and backward over the scoring
micro-batches, no optimizer step. The samples go through in micro-batches of `micro_batch` (all at
once by default); the Gram covers every pair across micro-batches. After run() every rank of the
model-parallel group holds the same losses and Gram.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megatron_greats.errors import ConfigError
from megatron_greats.ghost import GhostRecorder
from megatron_greats.ghost.layers import supported_layer_names
from megatron_greats.model import per_sample_losses
from megatron_greats.parallel.state import Layout, device
from megatron_greats.training.scoring_schedule import ScoringRun, run_schedule
from megatron_greats.training.telemetry import PhaseClock


class ScoringPass:
    def __init__(self, module: torch.nn.Module, layout: Layout, engine=None, exclude=(), micro_batch=None,
                 gram: bool = True):
        """module: the model (or this stage of it) to score with; engine: the DeepSpeed PipelineEngine
        whose pipeline runs the scoring schedules (needed when layout.pipeline > 1); gram: whether the
        Gram will be asked for (then every trainable parameter must be covered or excluded)."""
        self.module, self.layout, self.engine, self.micro_batch = module, layout, engine, micro_batch
        self.recorder = GhostRecorder(module, exclude=list(exclude), batch_dim=1)
        uncovered = self.recorder.uncovered() if gram else []
        if uncovered:  # the Gram would silently leave them out of every score
            names = ", ".join(f"'{name}'" for name in uncovered[:5])
            more = f" and {len(uncovered) - 5} more" if len(uncovered) > 5 else ""
            raise ConfigError(f"selection scoring: parameter {names}{more} is in no supported layer "
                              f"(supported: {', '.join(supported_layer_names())}); allowed: a supported "
                              "layer type, or a selection.score_exclude pattern that names it")
        self.use_clock(PhaseClock())  # seconds of score_forward / score_backward / ... per run

    def use_clock(self, clock: PhaseClock) -> None:
        self.clock = self.recorder.clock = clock

    def run(self, tokens: torch.Tensor, with_gram: bool = True):
        """tokens [n, seq+1] -> (losses [n], Gram [n, n] or None)."""
        tokens = tokens.to(device())
        inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        with self._scoring_mode():
            if not with_gram:
                with torch.no_grad():
                    losses = self._forward_only(inputs, labels)
                return losses, None
            with self.recorder.capture():
                losses = self._forward_backward(inputs, labels)
            return losses, self.recorder.gram()

    @contextlib.contextmanager
    def _scoring_mode(self):
        # eval: no dropout in scores; no activation recomputation (the recorder keeps layer inputs anyway,
        # and DeepSpeed's reentrant recomputation would run the capture inside backward)
        was_training = self.module.training
        saved = {name: getattr(self.module, name) for name in ("checkpoint_activations",
                                                              "activation_checkpoint_interval")
                 if hasattr(self.module, name)}
        self.module.eval()
        for name, value in saved.items():
            setattr(self.module, name, False if isinstance(value, bool) else 0)
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(self.module, name, value)
            self.module.train(was_training)

    # ---- one stage per process, or a pipeline of stages ----------------------------------------------
    def _forward_only(self, inputs, labels):
        if self.layout.pipeline == 1:
            with self.clock.phase("score_forward"):
                return per_sample_losses(self.module(inputs), labels)
        return self._pipeline([inputs], [labels], recorder=None)

    def _forward_backward(self, inputs, labels):
        size = self.micro_batch or inputs.shape[0]
        parts = [slice(start, start + size) for start in range(0, inputs.shape[0], size)]
        if self.layout.pipeline > 1:
            return self._pipeline([inputs[p] for p in parts], [labels[p] for p in parts], self.recorder)
        losses = []
        for index, part in enumerate(parts):
            if len(parts) > 1:
                self.recorder.begin_micro_batch(index, size)  # the Gram spans all micro-batches
            with self.clock.phase("score_forward"):
                part_losses = per_sample_losses(self.module(inputs[part]), labels[part])
            with self.clock.phase("score_backward"):
                self.recorder.backward(part_losses)
            losses.append(part_losses.detach())
        return torch.cat(losses)

    def _pipeline(self, inputs: list, labels: list, recorder):
        from megatron.core import parallel_state as ps

        if self.engine is None:
            raise ValueError("ScoringPass: pipeline parallelism runs on a DeepSpeed PipelineEngine; pass engine=")
        run = ScoringRun(self.module, inputs, labels, recorder, clock=self.clock)
        losses = run_schedule(self.engine, run)
        if losses is None:
            losses = torch.zeros(sum(len(x) for x in inputs), dtype=torch.float32, device=inputs[0].device)
        # the last stage has the losses; every stage of this pipeline gets them
        dist.broadcast(losses, ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
        return losses
