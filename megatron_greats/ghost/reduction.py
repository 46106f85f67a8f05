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
import os
import time
from enum import Enum
from typing import Optional

import torch
import torch.distributed as dist

from megatron_greats.errors import ConfigError
from megatron_greats.ghost import products
from megatron_greats.ghost.products import Path
from megatron_greats.phases import ALLREDUCE, GHOST_PRODUCTS


class Reduction(str, Enum):
    SUM = "sum"
    ONCE = "once"
    SUM_VECTORS = "sum_vectors"


def reduction_of(param) -> Reduction:
    """A parameter's reduction from megatron-core's own mark of tensor-sharded parameters."""
    return Reduction.SUM if getattr(param, "tensor_model_parallel", False) else Reduction.ONCE


_SPLIT_IS_FASTER = {}  # (rows, length, dtype) -> which Gram form GramSum uses on CPU (timed once)

# The two forms round differently (about 1e-7 relative in fp32), so a timed choice can differ between
# processes and flip a selection at a near-exact tie; pinning the form makes reruns bit-identical.
GRAM_FORM_VARIABLE = "MEGATRON_GREATS_GRAM_FORM"


class GramForm(str, Enum):
    """How GramSum adds a long tile's square: TIMED (on CPU the faster form per shape, on accelerators
    SPLIT), or pinned to WHOLE or SPLIT."""
    TIMED = "timed"
    WHOLE = "whole"
    SPLIT = "split"


def gram_form() -> GramForm:
    """The form MEGATRON_GREATS_GRAM_FORM asks for (default timed); a bad value is a ConfigError."""
    value = os.environ.get(GRAM_FORM_VARIABLE, GramForm.TIMED.value)
    try:
        return GramForm(value)
    except ValueError:
        raise ConfigError(f"{GRAM_FORM_VARIABLE}={value!r}; allowed: "
                          f"{', '.join(f.value for f in GramForm)}") from None


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class GramSum:
    """A Gram summed from parts. With averaged samples (their mean is the last of `size` rows) the
    individual rows' square block and the mean's column are held apart: a tile then adds one GEMM over
    the individual rows and one matrix-vector product for the column (a GEMM of a rows runs faster than
    one of a + 1 on CPU BLAS, and no slice of the Gram is updated piece by piece).

    A long tile's square is summed in one of two forms, whichever runs faster here (split_is_faster):
      whole: one GEMM [a, L] x [L, a];
      split: SPLITS column ranges, one batched GEMM into SPLITS partial Grams. From SYMMETRIC_MIN_ROWS
             rows on, the block below the diagonal of the lower half is not formed (the transpose of
             the one above): a quarter fewer products.
    CPU BLAS libraries differ on which is faster, on the same MKL build: on one Xeon the whole GEMM ran on
    one thread (90-100 GFLOP/s) and the split form on every thread (150-170, 30-60% less time per tile);
    on a Sapphire Rapids the whole GEMM ran on both threads (78-93) and the split form at 41-51, twice
    the time. So on CPU each (rows, length, dtype) is timed once per process on its first tile, unless
    MEGATRON_GREATS_GRAM_FORM pins the form (gram_form).

    Narrow parts (per-sample vectors of biases and norm weights) are deferred and summed together in
    one GEMM once DEFERRED_ELEMENTS have gathered, or at matrix(): one small GEMM each costs more in
    calls than in products."""

    SPLITS = 4
    MIN_SPLIT_COLUMNS = 4096  # below that a plain GEMM is as fast
    SYMMETRIC_MIN_ROWS = 24
    DEFERRED_ELEMENTS = 1 << 20

    def __init__(self, size: int, averaged: bool, dtype, device):
        self.size = size
        a = self.individual = size - 1 if averaged else size
        h = self.upper_rows = a // 2 if a >= self.SYMMETRIC_MIN_ROWS else a
        self.whole = torch.zeros(a, a, dtype=dtype, device=device)                 # short tiles, whole Grams
        self.upper = torch.zeros(self.SPLITS, h, a, dtype=dtype, device=device)     # long tiles: rows [0, h) x all
        self.lower = torch.zeros(self.SPLITS, a - h, a - h, dtype=dtype, device=device)  # rows [h, a) x [h, a)
        self.column = torch.zeros(size, dtype=dtype, device=device) if averaged else None  # <g_i, mean>
        self.deferred, self.deferred_elements = [], 0
        self.form = gram_form()

    def defer_rows(self, flat: torch.Tensor) -> None:
        """add_rows(flat) later, in one GEMM with other deferred parts; the caller leaves `flat` unchanged
        until matrix()."""
        self.deferred.append(flat)
        self.deferred_elements += flat.numel()
        if self.deferred_elements >= self.DEFERRED_ELEMENTS:
            self._add_deferred()

    def add_rows(self, flat: torch.Tensor) -> None:
        """+= the Gram of per-sample gradients flat [size, L] (with averaged samples: the mean last)."""
        a = self.individual
        individual = flat if self.column is None else flat[:a]
        if self._split(individual):
            self._add_split(individual, self.upper, self.lower)
        else:
            self.whole.addmm_(individual, individual.T)
        if self.column is not None:
            self.column.addmv_(flat, flat[a])

    def _add_split(self, individual: torch.Tensor, upper: torch.Tensor, lower: torch.Tensor) -> None:
        a, h = self.individual, self.upper_rows
        parts = individual.view(a, self.SPLITS, -1).transpose(0, 1)  # [splits, a, L / splits]
        if h < a:
            upper.baddbmm_(parts[:, :h], parts.transpose(1, 2))
            lower.baddbmm_(parts[:, h:], parts[:, h:].transpose(1, 2))
        else:
            upper.baddbmm_(parts, parts.transpose(1, 2))

    def _split(self, individual: torch.Tensor) -> bool:
        length = individual.shape[1]
        if length % self.SPLITS or length < self.SPLITS * self.MIN_SPLIT_COLUMNS:
            return False
        if self.form != GramForm.TIMED:
            return self.form == GramForm.SPLIT
        if individual.device.type != "cpu":
            return True
        key = (self.individual, length, individual.dtype)
        if key not in _SPLIT_IS_FASTER:
            _SPLIT_IS_FASTER[key] = self.split_is_faster(individual)
        return _SPLIT_IS_FASTER[key]

    def split_is_faster(self, individual: torch.Tensor, tries: int = 3) -> bool:
        """Time both forms on this tile into scratch sums (best of `tries` each, in turn). The forms round
        differently (sums of L products in another order: about 1e-7 relative in fp32); the choice holds
        for the rest of the process."""
        upper, lower, whole = (torch.zeros_like(t) for t in (self.upper, self.lower, self.whole))
        split_s, whole_s = [], []
        for _ in range(tries):
            split_s.append(_seconds(lambda: self._add_split(individual, upper, lower)))
            whole_s.append(_seconds(lambda: whole.addmm_(individual, individual.T)))
        return min(split_s) < min(whole_s)

    def _add_deferred(self) -> None:
        if self.deferred:
            parts, self.deferred, self.deferred_elements = self.deferred, [], 0
            self.add_rows(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])

    def add(self, gram: torch.Tensor) -> None:
        """+= a whole symmetric [size, size] Gram."""
        a = self.individual
        self.whole += gram[:a, :a]
        if self.column is not None:
            self.column += gram[:, a]

    def _square(self) -> torch.Tensor:
        h = self.upper_rows
        upper = self.upper.sum(dim=0)
        square = self.whole.clone()
        square[:h] += upper
        square[h:, :h] += upper[:, h:].T
        square[h:, h:] += self.lower.sum(dim=0)
        return square

    def matrix(self) -> torch.Tensor:
        self._add_deferred()
        a = self.individual
        square = self._square()
        if self.column is None:
            return square
        out = square.new_empty(self.size, self.size)
        out[:a, :a] = square
        out[:, a] = self.column
        out[a, :a] = self.column[:a]
        return out


class GramReduction:
    def __init__(self, order: dict, path: Path, chunk_elements: int, tensor_group, model_parallel_group, dtype,
                 clock=None, preconditioning=None, averaged: Optional[slice] = None, target: Optional[dict] = None):
        """order: param -> position (the same on every rank: collectives inside must line up).
        preconditioning: optional Preconditioning (preconditioning.py) of some Gram rows.
        averaged: optional slice of the last samples, merged into one Gram row (their mean).
        target: optional {param: a stored vector V, param-shaped (this rank's shard)}, with `averaged`:
        then each individual sample's <g_i, V> summed over the parameters (D g_i where preconditioned,
        with the D its Gram rows get) is formed beside the Gram (target_alignment), and the averaged
        samples' mean gradient of each parameter (means); a parameter without a V adds nothing to the
        alignment. Both where this rank counts the parameter's Gram (see add_param_gram)."""
        self.order, self.path, self.chunk_elements, self.dtype = order, Path(path), chunk_elements, dtype
        self.tensor_group, self.model_parallel_group, self.clock = tensor_group, model_parallel_group, clock
        self.tensor_rank = dist.get_rank(tensor_group) if tensor_group is not None else 0
        self.preconditioning, self.averaged = preconditioning, averaged
        if target is not None and averaged is None:
            raise ValueError("GramReduction: a target needs averaged samples (their mean gradient is formed)")
        self.target = target
        self.target_alignment = None  # [averaged.start]: sum over parameters of <g_i, V>, summed over ranks in finish()
        self.means = {}  # param -> the averaged samples' mean gradient [rows, cols] (with a target)
        self.streamed = None  # the Gram part of the parameters reduced during backward
        self._kept = {}  # param -> per-sample gradients kept for an update: [products.Tile]

    def keeps_blocks(self, param) -> bool:
        """Whether the parameter's per-sample gradients are kept for an update (not its operands)."""
        return param in self._kept

    def kept_parameters(self) -> list:
        return list(self._kept)

    def weighted_blocks(self, param, weights: torch.Tensor) -> torch.Tensor:
        """sum_i weights[i] * the kept per-sample gradient i of the parameter."""
        return products.weighted_block_sum(self._kept[param], weights, param.shape, param.dtype)

    def blocks_bytes(self) -> int:
        """The storages of the kept per-sample gradients."""
        return sum(tile.block.untyped_storage().nbytes() for tiles in self._kept.values() for tile in tiles)

    def phase(self, name: str):
        return self.clock.phase(name) if self.clock is not None else contextlib.nullcontext()

    def sorted(self, params) -> list:
        return sorted(params, key=lambda p: self.order.get(p, len(self.order)))

    def add_streamed(self, param, uses: list, reduction: Reduction, keep: bool = False) -> None:
        """Reduce one parameter during backward (its uses cover a single micro-batch of uses[0].n samples)."""
        if self.streamed is None:
            self.streamed = self.gram_sum(uses[0].n, uses[0].inputs.device)
        with self.phase(GHOST_PRODUCTS):
            self.add_param_gram(self.streamed, param, uses, reduction, uses[0].n, keep)

    def gram_sum(self, total: int, device) -> GramSum:
        return GramSum(products.gram_size(total, self.averaged), self.averaged is not None, self.dtype, device)

    def add_param_gram(self, gram: GramSum, param, uses: list, reduction: Reduction, total: int,
                       keep: bool = False) -> None:
        """gram += this rank's share of the parameter's Gram (gram_size rows: the averaged samples are
        one); nothing where another rank counts it. keep: where the materialised path forms the
        per-sample gradients, keep them (self._kept[param]: [products.Tile]) for an update."""
        tensor_rank = self.tensor_rank
        if reduction == Reduction.ONCE and tensor_rank != 0:
            return  # replicated over tensor-parallel ranks: rank 0 counts it
        pre = self.preconditioning
        pre = pre if pre is not None and pre.covers(param) else None
        if pre is None and not keep and products.rows_aligned(uses, total):
            flat = products.aligned_rows_flat(uses[0], self.dtype)
            if gram.size < total:  # the averaged samples' mean (a copy: the update may read the operands)
                flat = torch.cat([flat[:gram.size - 1], flat[gram.size - 1:].mean(dim=0, keepdim=True)])
            if self.target is not None:
                self._target_of_aligned_rows(param, uses[0], flat)
            gram.add_rows(flat)
            return
        rows, cols = uses[0].rows, uses[0].cols
        if products.choose_path(uses, total, self.path, preconditioned=pre is not None) == Path.GHOST:
            if pre is not None:  # exact for the rank-1 fit r c^T of D
                r, c, _ = pre.factor(param, rows, cols)
                uses = products.scaled_uses(uses, pre.samples, r, c, self.dtype)
            if self.target is not None:  # the scaled uses: <(r c^T) * g_i, V>, as the Gram rows
                self._target_of_operands(param, uses)
            gram.add(products.averaged_gram(products.ghost_gram(uses, total, self.dtype, self.chunk_elements),
                                            self.averaged))
            return
        # vectors of sequence shards: summed over tensor-parallel ranks (all join), counted on rank 0
        summed = reduction == Reduction.SUM_VECTORS and self.tensor_group is not None
        counted = not summed or tensor_rank == 0
        vector = products.is_vector(uses)  # its one tile is fresh: its Gram can wait for the others'
        for tile in products.materialised_blocks(uses, total, self.dtype, self.chunk_elements, fresh=keep):
            if summed:
                with self.phase(ALLREDUCE):
                    dist.all_reduce(tile.block, group=self.tensor_group)
            if keep:
                self._kept.setdefault(param, []).append(tile)
            if counted:
                self._add_block_gram(gram, param, pre, tile, cols, copy_scaled=keep, defer=vector)

    def _add_block_gram(self, gram: GramSum, param, pre, tile: products.Tile, cols: int,
                        copy_scaled: bool, defer: bool = False) -> None:
        """gram += the Gram of a tile's per-sample gradients (cols: the parameter's columns). The
        averaged samples' mean goes into the first of their rows (the update never reads them);
        preconditioned rows are scaled in place, or in a copy where the block is kept."""
        block = tile.block
        size = gram.size
        if size < block.shape[0]:
            block[size - 1] = block[size - 1:].mean(dim=0)
            block = block[:size]
        flat = block.view(size, -1)
        if pre is not None:
            if copy_scaled:
                flat = flat.clone()
            rows_of = flat[pre.samples].view(-1, *block.shape[1:])
            rows_of *= pre.block(param, tile.rows, tile.cols, cols, rows_of.mean(dim=0))
        if self.target is not None:
            self._target_of_tile(param, tile, flat, cols)
        (gram.defer_rows if defer else gram.add_rows)(flat)

    # ---- the stored target (selection.target_ema) ---------------------------------------------------------
    def _vector(self, param, rows: int, cols: int) -> Optional[torch.Tensor]:
        vector = self.target.get(param)
        return None if vector is None else vector.reshape(rows, cols)

    def _align(self, terms: torch.Tensor) -> None:
        if self.target_alignment is None:
            self.target_alignment = torch.zeros(self.averaged.start, dtype=self.dtype, device=terms.device)
        self.target_alignment += terms

    def _mean_of(self, param, rows: int, cols: int, device) -> torch.Tensor:
        if param not in self.means:
            self.means[param] = torch.zeros(rows, cols, dtype=self.dtype, device=device)
        return self.means[param]

    def _target_of_tile(self, param, tile: products.Tile, flat: torch.Tensor, cols: int) -> None:
        """A tile's rows (individual samples, preconditioned where the Gram's are, then the averaged
        samples' mean): their products with V's tile, and the mean into the parameter's mean gradient
        (a copy: the tile's buffer is reused)."""
        a, rows = self.averaged.start, param.numel() // cols
        vector = self._vector(param, rows, cols)
        if vector is not None:
            self._align(flat[:a] @ vector[tile.rows, tile.cols].reshape(-1).to(self.dtype))
        mean = self._mean_of(param, rows, cols, flat.device)
        mean[tile.rows, tile.cols] = flat[a].view(tile.block.shape[1:])

    def _target_of_aligned_rows(self, param, use: products.Use, flat: torch.Tensor) -> None:
        """Aligned rows (products.rows_aligned): each sample's gradient is its output gradients placed at
        the rows the samples share, in token order."""
        a, valid = self.averaged.start, use.inputs[0] >= 0
        ids = use.inputs[0][valid]
        vector = self._vector(param, use.rows, use.cols)
        if vector is not None:
            self._align(flat[:a] @ vector[ids].reshape(-1).to(self.dtype))
        self._mean_of(param, use.rows, use.cols, flat.device)[ids] = flat[a].view(-1, use.cols)

    def _target_of_operands(self, param, uses: list) -> None:
        """The ghost path: products with V and the mean gradient from the operands (products.aligned_with,
        products.samples_gradient), no per-sample gradient formed."""
        averaged, rows, cols = self.averaged, uses[0].rows, uses[0].cols
        vector = self._vector(param, rows, cols)
        if vector is not None:
            self._align(products.aligned_with(uses, slice(0, averaged.start), vector, self.dtype,
                                              self.chunk_elements))
        self.means[param] = products.samples_gradient(uses, averaged, self.dtype) / (averaged.stop - averaged.start)

    def finish(self, uses_of: dict, reductions: dict, total: int, device, keep=frozenset()) -> torch.Tensor:
        """The full Gram: streamed parts + the parameters in uses_of, summed over the model-parallel group;
        the parameters in `keep` keep their per-sample gradients where they are formed."""
        gram = self.streamed if self.streamed is not None else self.gram_sum(total, device)
        for param in self.sorted(uses_of):
            with self.phase(GHOST_PRODUCTS):
                self.add_param_gram(gram, param, uses_of[param], reductions[param], total, param in keep)
        gram = gram.matrix()
        summed = gram
        if self.target is not None:  # summed over ranks with the Gram, in one all-reduce
            if self.target_alignment is None:  # nothing counted here (e.g. a stage without scored layers)
                self.target_alignment = gram.new_zeros(self.averaged.start)
            summed = torch.cat([gram.reshape(-1), self.target_alignment])
        if self.model_parallel_group is not None and dist.get_world_size(self.model_parallel_group) > 1:
            with self.phase(ALLREDUCE):
                dist.all_reduce(summed, group=self.model_parallel_group)
        if self.target is not None:
            gram, self.target_alignment = summed[:gram.numel()].view(gram.shape), summed[gram.numel():]
        return gram
