"""One small capture rule per supported layer type (a registry, as Opacus keeps one per-sample function per layer).

A rule installs hooks on one module for the duration of a capture. On each forward call it reports
the call's operands as Use records (see products.py) for the parameters involved, together with the
output tensor whose gradient is the B operand of those uses. Where the capture point sits matters:
megatron-core's linear layers are tapped at `_forward_impl(input, weight, ...)`, which receives exactly
the operands of the weight-gradient GEMM (and the weight actually used: a tied output layer passes the
embedding's weight).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Operand:
    """One parameter's share of a layer call, before the output gradient is known."""

    param: torch.Tensor
    kind: str                 # "dense" | "sparse" | "diag"
    rows: int
    cols: int
    inputs: torch.Tensor      # already in [n, T, ...] sample-major layout
    reduction: str            # "sum" (tensor-sharded), "once" (replicated), "sum_vectors" (sequence-sharded)


def samples_first(x: torch.Tensor, batch_dim: int) -> torch.Tensor:
    """[.., n (at batch_dim), .., d] -> [n, T, d]; ids [.., n, ..] -> [n, T]; a 2-D [n, d] input is T = 1."""
    x = x.movedim(batch_dim, 0)
    if x.dim() == 2 and x.is_floating_point():
        return x.unsqueeze(1)
    if not x.is_floating_point():
        return x.reshape(x.shape[0], -1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _sharded(param) -> str:
    return "sum" if getattr(param, "tensor_model_parallel", False) else "once"


def _ones_like_tokens(a: torch.Tensor) -> torch.Tensor:
    return torch.ones(a.shape[0], a.shape[1], 1, dtype=a.dtype, device=a.device)


# Rule signature: install(module, report, batch_dim) -> list of removable handles, where
# report(operands, output, batch_dim) is called on every forward call to be recorded.
RULES: dict = {}


def register(*types):
    def wrap(fn: Callable):
        for t in types:
            RULES[t] = fn
        return fn
    return wrap


def rule_for(module: nn.Module):
    for cls in type(module).__mro__:
        if cls in RULES:
            return RULES[cls]
    return None


class _Restore:
    """Handle that undoes an instance-attribute patch (same interface as a hook handle)."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def remove(self):
        self.module.__dict__.pop(self.name, None)


# ---- torch layers ---------------------------------------------------------------------------------
@register(nn.Linear)
def _linear(module: nn.Linear, report, batch_dim: int):
    def hook(mod, args, output):
        a = samples_first(args[0].detach(), batch_dim)
        ops = [Operand(mod.weight, "dense", mod.out_features, mod.in_features, a, "once")]
        if mod.bias is not None:
            ops.append(Operand(mod.bias, "dense", mod.out_features, 1, _ones_like_tokens(a), "once"))
        return report(ops, output, batch_dim)
    return [module.register_forward_hook(hook)]


@register(nn.Embedding)
def _embedding(module: nn.Embedding, report, batch_dim: int):
    def hook(mod, args, output):
        ids = samples_first(args[0], batch_dim).long().clone()
        if mod.padding_idx is not None:
            ids[ids == mod.padding_idx] = -1  # that row never receives a gradient
        ops = [Operand(mod.weight, "sparse", mod.num_embeddings, mod.embedding_dim, ids, "once")]
        return report(ops, output, batch_dim)
    return [module.register_forward_hook(hook)]


def _norm_operands(mod, x: torch.Tensor, eps: float, rms: bool, batch_dim: int, reduction: str) -> list:
    shape = (x.shape[-1],)
    xhat = F.rms_norm(x, shape, None, eps) if rms else F.layer_norm(x, shape, None, None, eps)
    xhat = samples_first(xhat.detach(), batch_dim)
    d = x.shape[-1]
    ops = [Operand(mod.weight, "diag", d, 1, xhat, reduction)]
    if getattr(mod, "bias", None) is not None:
        ops.append(Operand(mod.bias, "diag", d, 1, torch.ones_like(xhat), reduction))
    return ops


@register(nn.LayerNorm, nn.RMSNorm)
def _torch_norm(module, report, batch_dim: int):
    if module.weight is None or len(module.normalized_shape) != 1:
        return []
    rms = isinstance(module, nn.RMSNorm)
    eps = module.eps if module.eps is not None else torch.finfo(module.weight.dtype).eps

    def hook(mod, args, output):
        return report(_norm_operands(mod, args[0], eps, rms, batch_dim, "once"), output, batch_dim)
    return [module.register_forward_hook(hook)]


# ---- megatron-core tensor-parallel layers ([seq, batch, hidden]: samples on dim 1) ----------------
def _megatron_rules():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    def tap_forward_impl(module, report, operands):
        """Wrap `_forward_impl(input, weight, ...)`, the call that feeds the weight-gradient GEMM, and
        report operands(input, weight, args, kwargs) for each call."""
        original = module._forward_impl

        def forward_impl(input, weight, *args, **kwargs):
            output = original(input, weight, *args, **kwargs)
            report(operands(input.detach(), weight, args, kwargs), output, 1)
            return output

        module._forward_impl = forward_impl
        return [_Restore(module, "_forward_impl")]

    @register(ColumnParallelLinear)
    def _column(module, report, batch_dim: int):
        def operands(input, weight, args, kwargs):
            if kwargs.get("sequence_parallel", False):
                # the GEMM saw the all-gathered sequence; gather our own copy of it
                input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=False,
                                                             group=module.tp_group)
            a = samples_first(input, 1)
            rows = weight.shape[0]
            ops = [Operand(weight, "dense", rows, weight.shape[1], a, _sharded(weight))]
            bias = kwargs.get("bias", args[0] if args else None)
            if bias is None and module.skip_bias_add:
                bias = module.bias  # added by the caller to this same output
            if bias is not None:
                ops.append(Operand(bias, "dense", rows, 1, _ones_like_tokens(a), _sharded(bias)))
            return ops
        return tap_forward_impl(module, report, operands)

    @register(RowParallelLinear)
    def _row(module, report, batch_dim: int):
        def operands(input, weight, args, kwargs):
            a = samples_first(input, 1)
            ops = [Operand(weight, "dense", weight.shape[0], weight.shape[1], a, _sharded(weight))]
            if module.bias is not None:
                # Added after the reduction, whatever skip_bias_add says; the gradient of this
                # pre-reduction output is the full output gradient, so the bias' per-sample
                # gradient is its token sum, identical on every tensor-parallel rank.
                ops.append(Operand(module.bias, "dense", weight.shape[0], 1, _ones_like_tokens(a), "once"))
            return ops
        return tap_forward_impl(module, report, operands)

    @register(VocabParallelEmbedding)
    def _vocab_embedding(module, report, batch_dim: int):
        if module.reduce_scatter_embeddings:
            raise NotImplementedError("GhostRecorder: VocabParallelEmbedding with reduce_scatter_embeddings=True "
                                      "is not supported (its output gradient is a sequence shard)")

        def hook(mod, args, output):
            ids = samples_first(args[0], 1).long() - mod.vocab_start_index
            ids[(ids < 0) | (ids >= mod.num_embeddings_per_partition)] = -1  # rows on other ranks
            ops = [Operand(mod.weight, "sparse", mod.num_embeddings_per_partition, mod.embedding_dim, ids,
                           _sharded(mod.weight))]
            return report(ops, output, 1)
        return [module.register_forward_hook(hook)]


def _project_rules():
    from megatron_greats.model.gpt import Norm

    @register(Norm)
    def _gpt_norm(module, report, batch_dim: int):
        rms = module.bias is None
        # Under sequence parallelism each rank normalises its own sequence shard: its per-sample
        # vectors are partial sums over tokens, to be summed over tensor-parallel ranks.
        reduction = "sum_vectors" if module.spec.sequence_parallel else "once"

        def hook(mod, args, output):
            return report(_norm_operands(mod, args[0], mod.spec.norm_eps, rms, 1, reduction), output, 1)
        return [module.register_forward_hook(hook)]


_megatron_rules()
_project_rules()
