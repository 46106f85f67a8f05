"""Weights a DeepSpeed PipelineModule ties across stages (TiedLayerSpec): their uses, moved to one stage.

A tied weight's per-sample gradient is the sum over its uses on every stage that holds it, so its
Gram needs the operands of all of them in one place: the last stage of the tie group computes it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_greats import deepspeed_internals
from megatron_greats.ghost.products import Kind, Use

_KINDS = tuple(Kind)
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def pipeline_ties(model, wanted: set) -> list:
    """[(param, group, ranks)] for the weights in `wanted` that the PipelineModule ties across stages."""
    ties = []
    for module, weight_attrs, group, ranks in deepspeed_internals.tied_weights(model):
        for attr in weight_attrs:
            param = module
            for part in attr.split("."):
                param = getattr(param, part)
            if param in wanted:
                ties.append((param, group, ranks))
    return ties


def gather_tied_uses(ties: list, uses_of: dict, device) -> set:
    """Ship the uses of each tied weight to the last stage of its tie group (appended to uses_of there).

    Returns the tied parameters this rank does not compute (another stage owns them)."""
    elsewhere = set()
    for param, group, ranks in ties:
        me, compute_rank = dist.get_rank(), max(ranks)
        for src in sorted(ranks):
            if src == compute_rank:
                continue
            received = _broadcast_uses(uses_of.get(param, []) if me == src else None, src, group, device)
            if me == compute_rank:
                uses_of.setdefault(param, []).extend(received)
        if me != compute_rank:
            elsewhere.add(param)
    return elsewhere


def _broadcast_uses(uses: Optional[list], src: int, group, device) -> list:
    """Send a list of Use records from src to the group (shapes and dtype first, then tensors)."""
    header = torch.zeros(1, dtype=torch.int64, device=device)
    if uses is not None:
        header[0] = len(uses)
    dist.broadcast(header, src, group=group)
    received = []
    for k in range(int(header[0])):
        meta = torch.zeros(13, dtype=torch.int64, device=device)
        if uses is not None:
            u = uses[k]
            in_dims = list(u.inputs.shape) + [0] * (3 - u.inputs.dim())
            meta[:] = torch.tensor([_KINDS.index(u.kind), u.rows, u.cols, u.samples.start, u.samples.stop,
                                    u.inputs.dim(), *in_dims, *u.grads.shape, _DTYPES.index(u.grads.dtype)])
        dist.broadcast(meta, src, group=group)
        kind, rows, cols, start, stop, ndim = (int(x) for x in meta[:6])
        dtype = _DTYPES[int(meta[12])]
        if uses is not None:
            inputs, grads = uses[k].inputs.contiguous(), uses[k].grads.contiguous()
        else:
            in_dtype = torch.int64 if _KINDS[kind] == Kind.SPARSE else dtype
            inputs = torch.empty([int(x) for x in meta[6:6 + ndim]], dtype=in_dtype, device=device)
            grads = torch.empty([int(x) for x in meta[9:12]], dtype=dtype, device=device)
        dist.broadcast(inputs, src, group=group)
        dist.broadcast(grads, src, group=group)
        received.append(Use(_KINDS[kind], rows, cols, slice(start, stop), inputs, grads))
    return received
