"""Passes of the pipeline engine beyond training and evaluation, as DeepSpeed pipeline schedules.

A new pass is a new schedule (DeepSpeed's style): a PipeSchedule subclass yields instructions, and
run_schedule() executes any schedule with any set of extra instructions on the engine, with state of
its own (`engine.greats_run`). DeepSpeed's own SendActivation / RecvActivation / SendGrad / RecvGrad
move the tensors between stages.

The scoring pass: ScoringSchedule is DeepSpeed's 1F1B TrainSchedule with its compute instructions
swapped for scoring ones and no gradient reduction or optimizer step; ScoringForwardSchedule is its
InferenceSchedule with the same swap (per-sample losses only). The scoring instructions differ from
ForwardPass / BackwardPass in what the engine must not do:
  ScoreForward   runs the stage's module directly (no engine hooks) and, on the last stage, keeps
                 per-sample losses instead of the mean training loss;
  ScoreBackward  differentiates w.r.t. activations only through the GhostRecorder's capture
                 (parameters are frozen): no engine.backward, so no loss scaling, no gradient hooks,
                 no .grad written. The gradient w.r.t. the stage input is left in its .grad for
                 DeepSpeed's SendGrad.

run_schedule() keeps the training exchange state apart: DeepSpeed caches activation and gradient
buffer shapes of the training micro-batches, and partitions activations over tensor-parallel ranks;
a run's micro-batches have other shapes, so shapes are exchanged every time (dynamic_shape), nothing
is partitioned, and the training state is restored afterwards.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch
from deepspeed.runtime.pipe import schedule as ds_schedule

from megatron_greats import deepspeed_internals as ds
from megatron_greats.model import per_sample_losses
from megatron_greats.phases import SCORE_BACKWARD, SCORE_EXCHANGE, SCORE_FORWARD
from megatron_greats.training.telemetry import PhaseClock


class ScoreLoad(ds_schedule.BufferOpInstruction):
    """First stage: the micro-batch's token ids; last stage: its labels."""


class ScoreForward(ds_schedule.BufferOpInstruction):
    """Forward of the stage's module; the last stage keeps per-sample losses."""


class ScoreBackward(ds_schedule.BufferOpInstruction):
    """Backward w.r.t. activations through the capture; the stage input's gradient goes to .grad."""


_NOT_IN_SCORING = (ds_schedule.ReduceTiedGrads, ds_schedule.ReduceGrads, ds_schedule.OptimizerStep)


def _scoring_steps(steps):
    """DeepSpeed's steps with compute swapped for scoring; micro-batch ids follow DeepSpeed's order
    (loads, forwards and backwards each visit micro-batches 0, 1, ... in turn on every stage)."""
    counts = {ScoreLoad: 0, ScoreForward: 0, ScoreBackward: 0}
    swap = {ds_schedule.LoadMicroBatch: ScoreLoad, ds_schedule.ForwardPass: ScoreForward,
            ds_schedule.BackwardPass: ScoreBackward}
    for cmds in steps:
        out = []
        for cmd in cmds:
            if isinstance(cmd, _NOT_IN_SCORING):
                continue
            kind = swap.get(type(cmd))
            if kind is None:
                out.append(cmd)  # DeepSpeed's activation / gradient exchange
                continue
            out.append(kind(cmd.buffer_id, micro_batch_id=counts[kind]))
            counts[kind] += 1
        yield out


class ScoringSchedule(ds_schedule.TrainSchedule):
    """Forward and backward over all scoring micro-batches (1F1B order); no optimizer step."""

    def steps(self):
        yield from _scoring_steps(super().steps())


class ScoringForwardSchedule(ds_schedule.InferenceSchedule):
    """Forward only over all scoring micro-batches: per-sample losses, no Gram."""

    def steps(self):
        yield from _scoring_steps(super().steps())


@dataclass
class ScoringRun:
    """What the scoring instructions of one run read and write (held by the engine during the run)."""
    module: torch.nn.Module
    inputs: list                                  # per micro-batch token ids (first stage)
    labels: list                                  # per micro-batch labels (last stage)
    capture: Optional[object] = None              # a GhostRecorder's GhostCapture; None: forward only
    input_grad: bool = True                       # an earlier stage captures: send it the stage input's gradient
    losses: dict = field(default_factory=dict)    # micro-batch id -> per-sample losses (last stage)
    clock: PhaseClock = field(default_factory=PhaseClock)

    @property
    def backward(self) -> bool:
        return self.capture is not None


def _exec_score_load(engine, buffer_id: int, micro_batch_id: int):
    run = engine.greats_run
    if engine.is_first_stage():
        ds.set_pipe_buffer(engine, "inputs", buffer_id, run.inputs[micro_batch_id])
    if engine.is_last_stage():
        ds.set_pipe_buffer(engine, "labels", buffer_id, run.labels[micro_batch_id])


def _exec_score_forward(engine, buffer_id: int, micro_batch_id: int):
    run = engine.greats_run
    inputs = ds.pipe_buffer(engine, "inputs", buffer_id)
    if run.backward and len(run.inputs) > 1:
        # the Gram spans all micro-batches: tell the capture where these samples sit
        run.capture.begin_micro_batch(micro_batch_id, run.inputs[0].shape[0])
    if not run.input_grad and not engine.is_first_stage():
        # nothing below is scored: the backward stops at this stage's first captured layer
        inputs = inputs.detach()
    with torch.set_grad_enabled(run.backward):
        outputs = run.module(inputs)
        if engine.is_last_stage():
            losses = per_sample_losses(outputs, ds.pipe_buffer(engine, "labels", buffer_id))
            run.losses[micro_batch_id] = losses.detach().float()
            outputs = losses.sum()
    ds.set_pipe_buffer(engine, "outputs", buffer_id, outputs if run.backward or not engine.is_last_stage() else None)


def _exec_score_backward(engine, buffer_id: int, micro_batch_id: int):
    run = engine.greats_run
    outputs = ds.pipe_buffer(engine, "outputs", buffer_id)
    stage_input = ds.pipe_buffer(engine, "inputs", buffer_id)
    targets = [stage_input] if run.input_grad and not engine.is_first_stage() else []
    # the received gradient is a view of a buffer DeepSpeed reuses for the next micro-batch; the capture
    # keeps output gradients (autograd may hand this very tensor to a layer's hook) until gram()
    output_grad = None if engine.is_last_stage() else ds.received_grad(engine).clone()
    grads = run.capture.backward_from([outputs], [output_grad], inputs=targets)
    if not engine.is_first_stage():  # DeepSpeed's SendGrad sends the stage input's .grad: zeros where unused
        grad = grads[0] if targets else None
        stage_input.grad = grad if grad is not None else torch.zeros_like(stage_input)
    ds.set_pipe_buffer(engine, "outputs", buffer_id, None)  # the graph is done with


def _in_phase(name: str, execute):
    def timed(engine, **kwargs):
        with engine.greats_run.clock.phase(name):
            execute(engine, **kwargs)
    return timed


_EXCHANGE = (ds_schedule.SendActivation, ds_schedule.RecvActivation, ds_schedule.SendGrad, ds_schedule.RecvGrad)
SCORING_INSTRUCTIONS = {ScoreLoad: _exec_score_load, ScoreForward: _in_phase(SCORE_FORWARD, _exec_score_forward),
                        ScoreBackward: _in_phase(SCORE_BACKWARD, _exec_score_backward)}


@contextlib.contextmanager
def _own_state(engine, instructions: dict, run, exchange_phase: str):
    exchange = {kind: _in_phase(exchange_phase, ds.deepspeed_instruction(engine, kind)) for kind in _EXCHANGE}
    with ds.separate_exchange(engine), ds.with_instructions(engine, {**exchange, **instructions}):
        engine.greats_run = run
        try:
            yield
        finally:
            del engine.greats_run


def run_schedule(engine, schedule, instructions: dict, run, exchange_phase: str = SCORE_EXCHANGE) -> None:
    """Execute `schedule` on this stage with `instructions` (instruction class -> fn(engine, **kwargs))
    in addition to DeepSpeed's; `run` (with a .clock) is what they read and write, as engine.greats_run."""
    with _own_state(engine, instructions, run, exchange_phase):
        ds.execute_schedule(engine, schedule)


def score(engine, run: ScoringRun) -> Optional[torch.Tensor]:
    """The scoring pass of `run` on this stage; returns the per-sample losses on the last stage (None
    elsewhere)."""
    kind = ScoringSchedule if run.backward else ScoringForwardSchedule
    run_schedule(engine, ds.make_schedule(engine, kind, len(run.inputs)), SCORING_INSTRUCTIONS, run)
    if not engine.is_last_stage():
        return None
    return torch.cat([run.losses[i] for i in range(len(run.inputs))])


# ---- the single-pass update: gradients formed elsewhere, then DeepSpeed's reduction and step --------
def surrogate_loss(grads: dict) -> torch.Tensor:
    """sum_p <p, g_p>: its backward gives each parameter the gradient g_p, so DeepSpeed's gradient hooks
    (ZeRO, bf16 master gradients) see the given gradients as they see any other."""
    return sum((p * g.to(p.dtype)).sum() for p, g in grads.items())


class ApplyGradients(ds_schedule.PipeInstruction):
    """Put the run's gradients into this stage's parameters."""


class ApplyGradientsSchedule(ds_schedule.PipeSchedule):
    """The end of DeepSpeed's TrainSchedule without its forward and backward passes: the gradients
    (already the mean over this replica's samples) go in, then tied-weight and data-parallel reduction
    and the optimizer step, as after any training batch."""

    def steps(self):
        yield [ApplyGradients(), ds_schedule.ReduceTiedGrads(), ds_schedule.ReduceGrads(),
               ds_schedule.OptimizerStep()]

    def num_pipe_buffers(self):
        return 1


@dataclass
class ApplyRun:
    grads: dict                                   # param -> this stage's gradient
    clock: PhaseClock = field(default_factory=PhaseClock)


def _exec_apply_gradients(engine):
    # the surrogate's backward, as DeepSpeed's BackwardPass runs a stage's backward
    grads = engine.greats_run.grads
    with ds.bf16_master_gradients(engine):
        if grads:
            torch.autograd.backward(surrogate_loss(grads))


def apply_gradients(engine, grads: dict) -> None:
    """One optimizer step on `grads` on this stage (every stage calls it)."""
    schedule = ds.make_schedule(engine, ApplyGradientsSchedule, 1)
    engine.module.train()
    run_schedule(engine, schedule, {ApplyGradients: _exec_apply_gradients}, ApplyRun(grads))
