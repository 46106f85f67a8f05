"""The parallel layout, dispatched once: what a step needs from the engine, per layout.

PlainExecutor drives a DeepSpeed engine over the whole model (any ZeRO stage, tensor and data
parallelism); PipelineExecutor a DeepSpeed PipelineEngine, where every pass is a DeepSpeed schedule
(training and evaluation through train_batch / eval_batch, scoring through pipeline_schedules.py).
Both offer the same operations on this replica's micro-batches [(inputs, labels), ...]:
  train(micro)            an ordinary optimizer step; returns the data-parallel mean loss
  evaluate(micro)         the mean loss, no gradients; the data-parallel mean
  apply_gradients(grads)  an optimizer step on given gradients {param: this rank's gradient, the mean
                          over this replica's samples}: DeepSpeed does the rest as after any backward
                          (data-parallel mean, ZeRO partitions, tied weights, global norm and
                          clipping, overflow check, LR schedule)
  score(module, micro, capture, input_grad)
                          per-sample losses of every sample, on every rank of the model-parallel
                          group; with a capture (a GhostRecorder's): a forward and a backward w.r.t.
                          activations through it (the Gram spans the micro-batches), without: forward
                          only. input_grad: whether a pipeline stage sends its input's gradient down
                          (something below is scored); otherwise the backward stops in the stage
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megatron_greats import deepspeed_internals as ds
from megatron_greats.model import mean_loss, per_sample_losses
from megatron_greats.parallel.state import Layout
from megatron_greats.phases import SCORE_BACKWARD, SCORE_FORWARD
from megatron_greats.training import pipeline_schedules
from megatron_greats.training.telemetry import PhaseClock


def data_parallel_mean(value: torch.Tensor, layout: Layout) -> float:
    value = value.detach().clone().float()
    if layout.data > 1:
        from megatron.core import parallel_state as ps

        dist.all_reduce(value, group=ps.get_data_parallel_group())
        value /= layout.data
    return float(value)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """Eval mode inside the block, the module's own mode after it, also when the block fails (dropout
    must not silently stay off for the rest of training)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class PlainExecutor:
    def __init__(self, engine, layout: Layout):
        self.engine, self.layout = engine, layout

    def train(self, micro: list) -> float:
        losses = []
        for inputs, labels in micro:
            loss = mean_loss(self.engine(inputs), labels)
            self.engine.backward(loss)
            self.engine.step()  # applies the update at the gradient-accumulation boundary
            losses.append(loss.detach())
        return data_parallel_mean(torch.stack(losses).mean(), self.layout)

    def apply_gradients(self, grads: dict) -> None:
        engine = self.engine
        # one backward carries the whole step; the gradients are already the mean
        ds.backward_whole_step(engine, pipeline_schedules.surrogate_loss(grads))
        engine.step()

    @torch.no_grad()
    def evaluate(self, micro: list) -> float:
        module = self.engine.module
        with eval_mode(module):
            losses = [per_sample_losses(module(inputs), labels).mean() for inputs, labels in micro]
        return data_parallel_mean(torch.stack(losses).mean(), self.layout)

    def score(self, module, micro: list, capture=None, clock: PhaseClock = None, input_grad: bool = False) -> torch.Tensor:
        clock = clock or PhaseClock()  # input_grad: for the pipeline's stages; the model's input is token ids
        losses = []
        for index, (inputs, labels) in enumerate(micro):
            if capture is None:
                with clock.phase(SCORE_FORWARD), torch.no_grad():
                    losses.append(per_sample_losses(module(inputs), labels))
                continue
            if len(micro) > 1:
                capture.begin_micro_batch(index, inputs.shape[0])  # the Gram spans all micro-batches
            with clock.phase(SCORE_FORWARD):
                part = per_sample_losses(module(inputs), labels)
            with clock.phase(SCORE_BACKWARD):
                capture.backward(part)
            losses.append(part.detach())
        return torch.cat(losses)


class PipelineExecutor:
    def __init__(self, engine, layout: Layout):
        self.engine, self.layout = engine, layout

    def train(self, micro: list) -> float:
        return float(self.engine.train_batch(iter(micro)))

    def evaluate(self, micro: list) -> float:
        with eval_mode(self.engine.module):  # DeepSpeed's eval_batch leaves the module in eval mode
            return float(self.engine.eval_batch(iter(micro), num_micro_batches=len(micro)))

    def apply_gradients(self, grads: dict) -> None:
        pipeline_schedules.apply_gradients(self.engine, grads)

    def score(self, module, micro: list, capture=None, clock: PhaseClock = None, input_grad: bool = True) -> torch.Tensor:
        from megatron.core import parallel_state as ps

        inputs, labels = [m[0] for m in micro], [m[1] for m in micro]
        run = pipeline_schedules.ScoringRun(module, inputs, labels, capture, input_grad=input_grad,
                                            clock=clock or PhaseClock())
        losses = pipeline_schedules.score(self.engine, run)
        if losses is None:
            losses = torch.zeros(sum(len(x) for x in inputs), dtype=torch.float32, device=inputs[0].device)
        # the last stage has the losses; every stage of this pipeline gets them
        dist.broadcast(losses, ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
        return losses


def executor_for(engine, layout: Layout):
    """The one place where the layout decides how a pass runs."""
    return PipelineExecutor(engine, layout) if layout.pipeline > 1 else PlainExecutor(engine, layout)
