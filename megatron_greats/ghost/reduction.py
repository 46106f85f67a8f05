"""From recorded uses to the Gram: which rank counts each parameter, its exact products, the sums over ranks.

Parallel sums (after finish() every rank of the model-parallel group holds the same full Gram):
  Reduction.SUM          tensor-sharded parameters: each rank's partial product over its shard, summed;
  Reduction.ONCE         parameters replicated over tensor-parallel ranks: counted on tensor rank 0 only;
  Reduction.SUM_VECTORS  replicated parameters applied to sequence shards (norms under sequence
                         parallelism): per-sample vectors summed over tensor-parallel ranks first;
  pipeline stages hold disjoint parameters: summed (weights tied across stages are gathered on one
  stage first, see ties.py).
"""

from __future__ import annotations

import contextlib
from enum import Enum
from typing import Optional

import torch
import torch.distributed as dist

from megatron_greats.ghost import products
from megatron_greats.ghost.products import Path


class Reduction(str, Enum):
    SUM = "sum"
    ONCE = "once"
    SUM_VECTORS = "sum_vectors"


def reduction_of(param) -> Reduction:
    """A parameter's reduction from megatron-core's own mark of tensor-sharded parameters."""
    return Reduction.SUM if getattr(param, "tensor_model_parallel", False) else Reduction.ONCE


class GramReduction:
    def __init__(self, order: dict, path: Path, chunk_elements: int, tensor_group, model_parallel_group, dtype,
                 clock=None):
        """order: param -> position (the same on every rank: collectives inside must line up)."""
        self.order, self.path, self.chunk_elements, self.dtype = order, Path(path), chunk_elements, dtype
        self.tensor_group, self.model_parallel_group, self.clock = tensor_group, model_parallel_group, clock
        self.streamed = None  # the Gram part of parameters reduced during backward
        self.preconditioning = None  # optional: a Preconditioning (preconditioning.py) of some Gram rows

    def phase(self, name: str):
        return self.clock.phase(name) if self.clock is not None else contextlib.nullcontext()

    def sorted(self, params) -> list:
        return sorted(params, key=lambda p: self.order.get(p, len(self.order)))

    @property
    def tensor_rank(self) -> int:
        return dist.get_rank(self.tensor_group) if self.tensor_group is not None else 0

    def add_streamed(self, param, uses: list, reduction: Reduction) -> None:
        """Reduce one parameter during backward (its uses cover a single micro-batch of uses[0].n samples)."""
        with self.phase("ghost_products"):
            part = self.param_gram(param, uses, reduction, uses[0].n)
        if part is not None:
            self.streamed = part if self.streamed is None else self.streamed + part

    def param_gram(self, param, uses: list, reduction: Reduction, total: int) -> Optional[torch.Tensor]:
        """This rank's share of the parameter's Gram, or None where another rank counts it."""
        tensor_rank = self.tensor_rank
        if reduction == Reduction.ONCE and tensor_rank != 0:
            return None  # replicated over tensor-parallel ranks: rank 0 counts it
        pre = self.preconditioning
        pre = pre if pre is not None and pre.covers(param) else None
        rows, cols = uses[0].rows, uses[0].cols
        if products.choose_path(uses, total, self.path, preconditioned=pre is not None) == Path.GHOST:
            if pre is not None:  # exact for the rank-1 fit r c^T of D
                r, c, _ = pre.factor(param, rows, cols)
                uses = products.scaled_uses(uses, pre.samples, r, c, self.dtype)
            part = products.ghost_gram(uses, total, self.dtype, self.chunk_elements)
        else:
            part = torch.zeros(total, total, dtype=self.dtype, device=uses[0].inputs.device)
            for r0, r1, block in products.materialised_blocks(uses, total, self.dtype, self.chunk_elements):
                if reduction == Reduction.SUM_VECTORS and self.tensor_group is not None:
                    with self.phase("allreduce"):
                        dist.all_reduce(block, group=self.tensor_group)  # every rank joins; rank 0 counts it
                if pre is not None:
                    rows_of = block[pre.samples]
                    rows_of *= pre.block(param, r0, r1, cols, rows_of.mean(dim=0))
                flat = block.reshape(total, -1)
                part.addmm_(flat, flat.T)
        return None if reduction == Reduction.SUM_VECTORS and tensor_rank != 0 else part

    def finish(self, uses_of: dict, reductions: dict, total: int, device) -> torch.Tensor:
        """The full Gram: streamed parts + the parameters in uses_of, summed over the model-parallel group."""
        gram = torch.zeros(total, total, dtype=self.dtype, device=device)
        if self.streamed is not None:
            gram += self.streamed
        for param in self.sorted(uses_of):
            with self.phase("ghost_products"):
                part = self.param_gram(param, uses_of[param], reductions[param], total)
                if part is not None:
                    gram += part.to(self.dtype)
        if self.model_parallel_group is not None and dist.get_world_size(self.model_parallel_group) > 1:
            with self.phase("allreduce"):
                dist.all_reduce(gram, group=self.model_parallel_group)
        return gram
