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
        self.streamed = None  # the Gram part of the parameters reduced during backward
        self.preconditioning = None  # optional: a Preconditioning (preconditioning.py) of some Gram rows
        self.averaged = None  # optional: a slice of the last samples, merged into one Gram row (their mean)
        self.kept = {}  # param -> per-sample gradients kept for an update: [products.Tile]

    def phase(self, name: str):
        return self.clock.phase(name) if self.clock is not None else contextlib.nullcontext()

    def sorted(self, params) -> list:
        return sorted(params, key=lambda p: self.order.get(p, len(self.order)))

    @property
    def tensor_rank(self) -> int:
        return dist.get_rank(self.tensor_group) if self.tensor_group is not None else 0

    def add_streamed(self, param, uses: list, reduction: Reduction, keep: bool = False) -> None:
        """Reduce one parameter during backward (its uses cover a single micro-batch of uses[0].n samples)."""
        if self.streamed is None:
            size = products.gram_size(uses[0].n, self.averaged)
            self.streamed = torch.zeros(size, size, dtype=self.dtype, device=uses[0].inputs.device)
        with self.phase("ghost_products"):
            self.add_param_gram(self.streamed, param, uses, reduction, uses[0].n, keep)

    def add_param_gram(self, gram: torch.Tensor, param, uses: list, reduction: Reduction, total: int,
                       keep: bool = False) -> None:
        """gram += this rank's share of the parameter's Gram (gram_size rows: the averaged samples are
        one); nothing where another rank counts it. keep: where the materialised path forms the
        per-sample gradients, keep them (self.kept[param]: [products.Tile]) for an update."""
        tensor_rank = self.tensor_rank
        if reduction == Reduction.ONCE and tensor_rank != 0:
            return  # replicated over tensor-parallel ranks: rank 0 counts it
        pre = self.preconditioning
        pre = pre if pre is not None and pre.covers(param) else None
        rows, cols = uses[0].rows, uses[0].cols
        if products.choose_path(uses, total, self.path, preconditioned=pre is not None) == Path.GHOST:
            if pre is not None:  # exact for the rank-1 fit r c^T of D
                r, c, _ = pre.factor(param, rows, cols)
                uses = products.scaled_uses(uses, pre.samples, r, c, self.dtype)
            gram += products.averaged_gram(products.ghost_gram(uses, total, self.dtype, self.chunk_elements),
                                           self.averaged)
            return
        # vectors of sequence shards: summed over tensor-parallel ranks (all join), counted on rank 0
        summed = reduction == Reduction.SUM_VECTORS and self.tensor_group is not None
        counted = not summed or tensor_rank == 0
        for tile in products.materialised_blocks(uses, total, self.dtype, self.chunk_elements, fresh=keep):
            if summed:
                with self.phase("allreduce"):
                    dist.all_reduce(tile.block, group=self.tensor_group)
            if keep:
                self.kept.setdefault(param, []).append(tile)
            if counted:
                self._add_block_gram(gram, param, pre, tile, cols, copy_scaled=keep)

    def _add_block_gram(self, part: torch.Tensor, param, pre, tile: products.Tile, cols: int,
                        copy_scaled: bool) -> None:
        """part += the Gram of a tile's per-sample gradients (cols: the parameter's columns). The
        averaged samples' mean goes into the first of their rows (the update never reads them);
        preconditioned rows are scaled in place, or in a copy where the block is kept."""
        block = tile.block
        total, size = block.shape[0], part.shape[0]
        a = size - 1  # with averaged samples: the row of their mean (the first of them)
        if size < total:
            block[a] = block[a:].mean(dim=0)
        flat = block[:size].reshape(size, -1)
        if pre is not None:
            if copy_scaled:
                flat = flat.clone()
            rows_of = flat[pre.samples].view(-1, *block.shape[1:])
            rows_of *= pre.block(param, tile.rows, tile.cols, cols, rows_of.mean(dim=0))
        if size < total:  # the mean row apart: a GEMM of a rows runs faster than one of a + 1 on CPU BLAS
            individual, mean = flat[:a], flat[a]
            part[:a, :a].addmm_(individual, individual.T)
            across = individual @ mean
            part[:a, a] += across
            part[a, :a] += across
            part[a, a] += mean @ mean
        else:
            part.addmm_(flat, flat.T)

    def finish(self, uses_of: dict, reductions: dict, total: int, device, keep=frozenset()) -> torch.Tensor:
        """The full Gram: streamed parts + the parameters in uses_of, summed over the model-parallel group;
        the parameters in `keep` keep their per-sample gradients where they are formed."""
        size = products.gram_size(total, self.averaged)
        gram = torch.zeros(size, size, dtype=self.dtype, device=device)
        if self.streamed is not None:
            gram += self.streamed
        for param in self.sorted(uses_of):
            with self.phase("ghost_products"):
                self.add_param_gram(gram, param, uses_of[param], reductions[param], total, param in keep)
        if self.model_parallel_group is not None and dist.get_world_size(self.model_parallel_group) > 1:
            with self.phase("allreduce"):
                dist.all_reduce(gram, group=self.model_parallel_group)
        return gram
