"""One small capture rule per supported layer type (a registry, as Opacus keeps one per-sample function per layer).

A rule installs hooks on one module for the duration of a capture. On each forward call it reports
the call's operands as Use records (see products.py) for the parameters involved, together with the
output tensor whose gradient is the B operand of those uses. Where the capture point sits matters:
megatron-core's linear layers are tapped at `_forward_impl(input, weight, ...)`, which receives exactly
the operands of the weight-gradient GEMM (and the weight actually used: a tied output layer passes the
embedding's weight).

Each rule also says which parameters it records (`covers`; the recorder reports the others as
uncovered) and which submodules it records itself (`claims`: their own rules stay off, e.g. the
position embedding inside megatron-core's LanguageModelEmbedding).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_greats.ghost.products import Kind
from megatron_greats.ghost.reduction import Reduction, reduction_of


@dataclass
class Operand:
    """One parameter's share of a layer call, before the output gradient is known."""

    param: torch.Tensor
    kind: Kind
    rows: int
    cols: int
    inputs: torch.Tensor      # already in [n, T, ...] sample-major layout
    reduction: Reduction      # how ranks combine its Gram (see reduction.py)
    # inputs = finish(inputs) once the output gradient arrives (a norm's input -> its normalised input:
    # formed in backward, so no normalised copy is held from the forward on)
    finish: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


def samples_first(x: torch.Tensor, batch_dim: int) -> torch.Tensor:
    """[.., n (at batch_dim), .., d] -> [n, T, d]; ids [.., n, ..] -> [n, T]; a 2-D [n, d] input is T = 1."""
    x = x.movedim(batch_dim, 0)
    if x.dim() == 2 and x.is_floating_point():
        return x.unsqueeze(1)
    if not x.is_floating_point():
        return x.reshape(x.shape[0], -1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _ones_like_tokens(a: torch.Tensor) -> torch.Tensor:
    """A bias use's input: never read, so a view of one element (no memory per token)."""
    return torch.ones(1, 1, 1, dtype=a.dtype, device=a.device).expand(a.shape[0], a.shape[1], 1)


# Rule signature: install(module, report, batch_dim) -> list of removable handles, where
# report(operands, output, batch_dim) is called on every forward call to be recorded.
@dataclass(frozen=True)
class Rule:
    install: Callable
    covers: Callable   # covers(module) -> the parameters the rule records
    claims: Callable   # claims(module) -> submodules the rule records itself (their own rules stay off)


RULES: dict = {}


def _own_parameters(module: nn.Module) -> list:
    return list(module.parameters(recurse=False))


def register(*types, covers: Callable = _own_parameters, claims: Callable = lambda module: []):
    def wrap(fn: Callable):
        for t in types:
            RULES[t] = Rule(fn, covers, claims)
        return fn
    return wrap


def rule_for(module: nn.Module):
    _register_loaded()
    for cls in type(module).__mro__:
        if cls in RULES:
            return RULES[cls]
    return None


def recorded_modules(model: nn.Module) -> list:
    """The modules whose rules a capture installs: every module with a rule, less those another rule claims."""
    claimed = {id(sub) for m in model.modules() if rule_for(m) is not None for sub in rule_for(m).claims(m)}
    return [m for m in model.modules() if rule_for(m) is not None and id(m) not in claimed]


def supported_layer_names() -> list:
    """e.g. 'torch.nn.Linear', 'megatron.core.ColumnParallelLinear', 'megatron_greats.RMSNorm'."""
    _register_loaded(every=True)
    home = {"torch": "torch.nn", "megatron": "megatron.core"}
    return sorted(f"{home.get(t.__module__.split('.')[0], t.__module__.split('.')[0])}.{t.__name__}" for t in RULES)


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
        ops = [Operand(mod.weight, Kind.DENSE, mod.out_features, mod.in_features, a, Reduction.ONCE)]
        if mod.bias is not None:
            ops.append(Operand(mod.bias, Kind.BIAS, mod.out_features, 1, _ones_like_tokens(a), Reduction.ONCE))
        return report(ops, output, batch_dim)
    return [module.register_forward_hook(hook)]


@register(nn.Embedding)
def _embedding(module: nn.Embedding, report, batch_dim: int):
    def hook(mod, args, output):
        ids = samples_first(args[0], batch_dim).long().clone()
        if mod.padding_idx is not None:
            ids[ids == mod.padding_idx] = -1  # that row never receives a gradient
        ops = [Operand(mod.weight, Kind.SPARSE, mod.num_embeddings, mod.embedding_dim, ids, Reduction.ONCE)]
        return report(ops, output, batch_dim)
    return [module.register_forward_hook(hook)]


def _norm_operands(mod, x: torch.Tensor, eps: float, rms: bool, batch_dim: int, reduction: Reduction) -> list:
    """A norm weight's operand is its normalised input; it is recomputed from the input (which autograd
    keeps for the norm's own backward anyway) when the output gradient arrives."""
    d = x.shape[-1]

    def normalised(inputs: torch.Tensor) -> torch.Tensor:
        if rms:
            return F.rms_norm(inputs, (d,), None, eps)
        # with a weight of ones: the same values, and torch's CPU kernel takes half the time of its
        # no-weight path (measured: 31 against 51 us at [8, 128, 128])
        return F.layer_norm(inputs, (d,), torch.ones(d, dtype=inputs.dtype, device=inputs.device), None, eps)

    inputs = samples_first(x.detach(), batch_dim)
    ops = [Operand(mod.weight, Kind.DIAG, d, 1, inputs, reduction, finish=normalised)]
    if getattr(mod, "bias", None) is not None:
        ops.append(Operand(mod.bias, Kind.BIAS, d, 1, _ones_like_tokens(inputs), reduction))
    return ops


def _torch_norm_covers(module) -> list:
    return _own_parameters(module) if len(module.normalized_shape) == 1 else []  # one normalised dim only


def _torch_norm(rms: bool):
    """The rule of torch's LayerNorm (rms=False, with or without bias) or RMSNorm (rms=True)."""
    def install(module, report, batch_dim: int):
        if module.weight is None or len(module.normalized_shape) != 1:
            return []
        eps = module.eps if module.eps is not None else torch.finfo(module.weight.dtype).eps

        def hook(mod, args, output):
            return report(_norm_operands(mod, args[0], eps, rms, batch_dim, Reduction.ONCE), output, batch_dim)
        return [module.register_forward_hook(hook)]
    return install


register(nn.LayerNorm, covers=_torch_norm_covers)(_torch_norm(rms=False))
register(nn.RMSNorm, covers=_torch_norm_covers)(_torch_norm(rms=True))


# ---- megatron-core layers -------------------------------------------------------------------------
# Activations are [seq, batch, hidden] (samples on dim 1); token and position ids are [batch, seq]
# (samples on dim 0), as megatron-core's LanguageModelEmbedding passes them.
def _megatron_rules():
    from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
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
            ops = [Operand(weight, Kind.DENSE, rows, weight.shape[1], a, reduction_of(weight))]
            bias = kwargs.get("bias", args[0] if args else None)
            if bias is None and module.skip_bias_add:
                bias = module.bias  # added by the caller to this same output
            if bias is not None:
                ops.append(Operand(bias, Kind.BIAS, rows, 1, _ones_like_tokens(a), reduction_of(bias)))
            return ops
        return tap_forward_impl(module, report, operands)

    @register(RowParallelLinear)
    def _row(module, report, batch_dim: int):
        def operands(input, weight, args, kwargs):
            a = samples_first(input, 1)
            ops = [Operand(weight, Kind.DENSE, weight.shape[0], weight.shape[1], a, reduction_of(weight))]
            if module.bias is not None:
                # Added after the reduction, whatever skip_bias_add says; the gradient of this
                # pre-reduction output is the full output gradient, so the bias' per-sample
                # gradient is its token sum, identical on every tensor-parallel rank.
                ops.append(Operand(module.bias, Kind.BIAS, weight.shape[0], 1, _ones_like_tokens(a), Reduction.ONCE))
            return ops
        return tap_forward_impl(module, report, operands)

    @register(VocabParallelEmbedding)
    def _vocab_embedding(module, report, batch_dim: int):
        if module.reduce_scatter_embeddings:
            raise NotImplementedError("GhostRecorder: VocabParallelEmbedding with reduce_scatter_embeddings=True "
                                      "is not supported (its output gradient is a sequence shard)")

        def hook(mod, args, output):  # ids [batch, seq] -> output [batch, seq, hidden]
            ids = samples_first(args[0], 0).long() - mod.vocab_start_index
            ids[(ids < 0) | (ids >= mod.num_embeddings_per_partition)] = -1  # rows on other ranks
            ops = [Operand(mod.weight, Kind.SPARSE, mod.num_embeddings_per_partition, mod.embedding_dim, ids,
                           reduction_of(mod.weight))]
            return report(ops, output, 0)
        return [module.register_forward_hook(hook)]

    def _id_embeddings(module) -> list:
        """LanguageModelEmbedding's torch embeddings, which it calls with [batch, seq] ids."""
        return [m for m in (getattr(module, "position_embeddings", None), module.tokentype_embeddings)
                if m is not None]

    @register(LanguageModelEmbedding, covers=lambda m: [p for e in _id_embeddings(m) for p in e.parameters()],
              claims=_id_embeddings)
    def _language_model_embedding(module, report, batch_dim: int):
        # Its word embedding is a VocabParallelEmbedding with its own rule. Its position and token-type
        # embeddings see [batch, seq] ids whatever batch_dim the rest of the model uses.
        handles = [h for e in _id_embeddings(module) for h in _embedding(e, report, 0)]
        if getattr(module, "position_embeddings", None) is None:
            return handles
        original = module.forward

        def forward(input_ids, position_ids, *args, **kwargs):
            # Shared position ids ([1, seq]) would add one broadcast lookup whose gradient is the batch
            # sum; one row per sample gives the same values and keeps each sample's gradient its own.
            return original(input_ids, position_ids.expand_as(input_ids), *args, **kwargs)

        module.forward = forward
        return handles + [_Restore(module, "forward")]


def _project_rules():
    from megatron_greats.model.gpt import LayerNorm, RMSNorm

    def gpt_norm(rms: bool):
        def install(module, report, batch_dim: int):
            # Under sequence parallelism each rank normalises its own sequence shard: its per-sample
            # vectors are partial sums over tokens, to be summed over tensor-parallel ranks.
            reduction = Reduction.SUM_VECTORS if module.spec.sequence_parallel else Reduction.ONCE

            def hook(mod, args, output):
                return report(_norm_operands(mod, args[0], mod.spec.norm_eps, rms, 1, reduction), output, 1)
            return [module.register_forward_hook(hook)]
        return install

    register(LayerNorm)(gpt_norm(rms=False))
    register(RMSNorm)(gpt_norm(rms=True))


# The rules of megatron-core's layers and of this project's model are registered on first use, once
# their modules are loaded: a layer of theirs exists only if they are, and importing megatron-core costs
# a process that records plain torch models (the ghost benchmark) about 4 seconds.
_LAZY_RULES = {"megatron.core": _megatron_rules, "megatron_greats.model.gpt": _project_rules}


def _register_loaded(every: bool = False) -> None:
    """Register the lazy rules whose module is loaded (every=True: all of them, importing their modules)."""
    for module_name in [m for m in _LAZY_RULES if every or m in sys.modules]:
        _LAZY_RULES.pop(module_name)()
