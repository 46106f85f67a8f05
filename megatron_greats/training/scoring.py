"""The scoring pass: per-sample losses of [candidates ; validation], and their gradient Gram.

It runs on the engine's module (not through the engine: no DeepSpeed gradient hooks), in eval mode,
with the GhostRecorder capturing every supported layer (parameters frozen: no weight gradient is
formed, no .grad is written). With pipeline parallelism the stages run a schedule of their own: one
forward from the first stage to the last, then one backward to the first, point to point; no
optimizer step. The samples go through in micro-batches of `micro_batch` (all at once by
default); the Gram covers every pair across micro-batches. After run() every rank of the model-parallel group holds the same losses and Gram.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megatron_greats.ghost import GhostRecorder
from megatron_greats.model import per_sample_losses
from megatron_greats.parallel.state import Layout, device


class ScoringPass:
    def __init__(self, module: torch.nn.Module, layout: Layout, hidden_size: int, seq_len: int,
                 sequence_parallel: bool, exclude=(), micro_batch=None):
        self.module, self.layout, self.micro_batch = module, layout, micro_batch
        self.recorder = GhostRecorder(module, exclude=list(exclude), batch_dim=1)
        self.hidden_size = hidden_size
        self.stage_seq = seq_len // layout.tensor if sequence_parallel else seq_len

    def run(self, tokens: torch.Tensor, with_gram: bool = True):
        """tokens [n, seq+1] -> (losses [n], Gram [n, n] or None)."""
        tokens = tokens.to(device())
        inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        with self._scoring_mode():
            if not with_gram:
                with torch.no_grad():
                    losses = self._forward_only(inputs, labels)
                return losses, None
            size = self.micro_batch or inputs.shape[0]
            with self.recorder.capture():
                parts = []
                for index, start in enumerate(range(0, inputs.shape[0], size)):
                    if size < inputs.shape[0]:
                        self.recorder.begin_micro_batch(index, size)  # the Gram spans all micro-batches
                    part = slice(start, start + size)
                    parts.append(self._forward_backward(inputs[part], labels[part]))
                losses = torch.cat(parts)
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

    # ---- one process per model replica slice ------------------------------------------------------
    def _forward_only(self, inputs, labels):
        if self.layout.pipeline == 1:
            return per_sample_losses(self.module(inputs), labels)
        return self._pipeline(inputs, labels, backward=False)

    def _forward_backward(self, inputs, labels):
        if self.layout.pipeline == 1:
            losses = per_sample_losses(self.module(inputs), labels)
            self.recorder.backward(losses)
            return losses.detach()
        return self._pipeline(inputs, labels, backward=True)

    def _pipeline(self, inputs, labels, backward: bool):
        from megatron.core import parallel_state as ps

        lay, n = self.layout, inputs.shape[0]
        shape = (self.stage_seq, n, self.hidden_size)
        dtype = next(self.module.parameters()).dtype
        if lay.is_first_stage:
            stage_input = inputs
        else:
            stage_input = torch.empty(shape, dtype=dtype, device=inputs.device)
            dist.recv(stage_input, ps.get_pipeline_model_parallel_prev_rank())
            stage_input.requires_grad_(backward)
        out = self.module(stage_input)
        losses = torch.zeros(n, dtype=torch.float32, device=inputs.device)
        if lay.is_last_stage:
            losses = per_sample_losses(out, labels)
        else:
            dist.send(out.detach().contiguous(), ps.get_pipeline_model_parallel_next_rank())
        if backward:
            targets = [] if lay.is_first_stage else [stage_input]
            if lay.is_last_stage:
                grads = self.recorder.backward_from([losses.sum()], [None], inputs=targets)
            else:
                out_grad = torch.empty_like(out)
                dist.recv(out_grad, ps.get_pipeline_model_parallel_next_rank())
                grads = self.recorder.backward_from([out], [out_grad], inputs=targets)
            if not lay.is_first_stage:
                dist.send(grads[0].contiguous(), ps.get_pipeline_model_parallel_prev_rank())
        losses = losses.detach().float()
        # the last stage has the losses; every stage of this pipeline gets them
        dist.broadcast(losses, ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
        return losses
