"""Per-sample gradient inner products of one parameter, from layer operands, never from model-sized gradients.

A *use* is one place where a parameter acts on a batch of n samples (a layer call). Its per-sample
gradient is determined by two operands with a token dim T:
  dense  (y = x W^T):      G_i = B_i^T A_i                      A [n, T, d_in], B [n, T, d_out]
  bias   (y = x + b):      G_i = sum_t B_it                     B [n, T, d_out] (A: ones, never read)
  sparse (embedding rows): G_i[r] = sum_{t: id_it = r} B_it     ids [n, T] (-1: row not on this rank)
  diag   (norm weights):   G_i = sum_t B_it * A_it               A, B [n, T, d]
A parameter used several times (tied embeddings, micro-batches) has per-sample gradient = the sum
over its uses, so its Gram is the sum of cross products over all pairs of uses.

Two exact paths per parameter:
  ghost:        token-pair products, cost ~ n^2 T^2 (d_in + d_out), memory bounded by row chunks;
  materialise:  per-sample gradients block by block of parameter rows, then G G^T, cost ~ n T d_in d_out
                + n^2 d_in d_out, memory bounded by the block size.
A sparse use in which every sample looks up the same rows, none twice (a position embedding), needs
neither: its per-sample gradients are its output gradients in place, so G G^T is B B^T (rows_aligned).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional

import torch

# Elements per temporary (token-pair tiles, per-sample gradient blocks): 2^22 x 4 bytes = 16 MiB in fp32.
DEFAULT_CHUNK_ELEMENTS = 1 << 22


class Kind(str, Enum):
    """How a parameter's per-sample gradient follows from a use's operands (see the module doc)."""
    DENSE = "dense"
    BIAS = "bias"
    SPARSE = "sparse"
    DIAG = "diag"


class Path(str, Enum):
    """Which exact method forms a parameter's Gram; AUTO lets the cost model choose per parameter."""
    AUTO = "auto"
    GHOST = "ghost"
    MATERIALISE = "materialise"


class UpdateFrom(str, Enum):
    """What a capture keeps for an update formed from it (GhostRecorder(keep_operands=True)), per parameter.
    BLOCKS: the per-sample gradients the materialised path formed for the Gram (the update is then a sum
    of k blocks, no GEMM); the operands are freed at once. OPERANDS: the layer operands (one GEMM per
    selected sample at the update). AUTO: blocks where they take no more memory than the operands.
    Parameters without blocks (ghost path, unscored, counted on another rank) always keep operands."""
    AUTO = "auto"
    BLOCKS = "blocks"
    OPERANDS = "operands"


@dataclass
class Use:
    kind: Kind
    rows: int                    # parameter rows on this rank (d_out; local vocab; d for diag)
    cols: int                    # parameter columns (d_in; hidden for sparse; 1 for diag)
    samples: slice               # which rows of the Gram this use's samples are
    inputs: torch.Tensor         # dense/diag: A [n, T, cols or d]; sparse: ids [n, T]; bias: ones [n, T, 1]
    grads: Optional[torch.Tensor] = None   # B [n, T, rows] (dense), [n, T, cols] (sparse), [n, T, d] (diag)

    @property
    def n(self) -> int:
        return self.samples.stop - self.samples.start

    @property
    def tokens(self) -> int:
        return self.inputs.shape[1]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as(t: torch.Tensor, dtype) -> torch.Tensor:
    # `t.to(dtype)` returns t itself when it has that dtype, but the call costs more than the check
    return t if t.dtype == dtype else t.to(dtype)


# ---- cost model ------------------------------------------------------------------------------------
def ghost_cost(uses: list, total: int) -> float:
    cost = 0.0
    for u in uses:
        width = u.cols + u.rows if u.kind == Kind.DENSE else u.cols + 1
        cost += u.n * total * u.tokens ** 2 * width
    return cost


def materialise_cost(uses: list, total: int) -> float:
    rows, cols = uses[0].rows, uses[0].cols
    forming = sum(u.n * u.tokens * (rows * cols if u.kind == Kind.DENSE else cols) for u in uses)
    return forming + total * total * rows * cols


def choose_path(uses: list, total: int, forced: Path = Path.AUTO, preconditioned: bool = False) -> Path:
    if any(u.kind in (Kind.DIAG, Kind.BIAS) for u in uses):
        return Path.MATERIALISE  # a per-sample vector: forming it is the whole cost
    if preconditioned and any(u.kind != Kind.DENSE for u in uses):
        return Path.MATERIALISE  # a ghost path scales operands: dense uses only (preconditioning.py)
    if forced != Path.AUTO:
        return forced
    return Path.GHOST if ghost_cost(uses, total) <= materialise_cost(uses, total) else Path.MATERIALISE


# ---- ghost path ------------------------------------------------------------------------------------
def _pair_tile(u: Use, v: Use, i0: int, i1: int, dtype) -> torch.Tensor:
    """<G_u,i, G_v,j> for i in u's samples [i0, i1) and all of v's samples: [i1 - i0, v.n]."""
    c, t_u, n_v, t_v = i1 - i0, u.tokens, v.n, v.tokens
    bu = u.grads[i0:i1].to(dtype)
    if u.kind == Kind.SPARSE and v.kind == Kind.DENSE:
        # sum_{t,s} B_v[j, s, id_u[i,t]] (b_u[i,t] . a_v[j,s])
        ids = u.inputs[i0:i1].reshape(-1)
        valid = ids >= 0
        a_v = v.inputs.to(dtype)
        dots = bu.reshape(c * t_u, -1) @ a_v.reshape(n_v * t_v, -1).T               # [(c t), (n s)]
        picked = v.grads.to(dtype)[:, :, ids.clamp(min=0)]                           # [n, s, (c t)]
        picked = picked.permute(2, 0, 1).reshape(c * t_u, n_v * t_v)
        tile = (dots * picked)[valid]                                                # drop rows not on this rank
        owner = torch.arange(c, device=ids.device).repeat_interleave(t_u)[valid]
        per_token = tile.reshape(-1, n_v, t_v).sum(-1)
        return torch.zeros(c, n_v, dtype=dtype, device=bu.device).index_add_(0, owner, per_token)
    if u.kind == Kind.DENSE and v.kind == Kind.SPARSE:
        return _pair_tile_transposed(u, v, i0, i1, dtype)
    grad_dots = bu.reshape(c * t_u, -1) @ v.grads.to(dtype).reshape(n_v * t_v, -1).T  # [(c t), (n s)]
    if u.kind == Kind.DENSE:
        input_dots = u.inputs[i0:i1].to(dtype).reshape(c * t_u, -1) @ v.inputs.to(dtype).reshape(n_v * t_v, -1).T
        weights = input_dots
    else:  # sparse x sparse: token pairs with the same row id (on this rank)
        ids_u = u.inputs[i0:i1].reshape(-1, 1)
        ids_v = v.inputs.reshape(1, -1)
        weights = ((ids_u == ids_v) & (ids_u >= 0)).to(dtype)
    return (grad_dots * weights).reshape(c, t_u, n_v, t_v).sum(dim=(1, 3))


def _pair_tile_transposed(u: Use, v: Use, i0: int, i1: int, dtype) -> torch.Tensor:
    sub = Use(u.kind, u.rows, u.cols, slice(0, i1 - i0), u.inputs[i0:i1], u.grads[i0:i1])
    return _pair_tile(v, sub, 0, v.n, dtype).T


def ghost_gram(uses: list, total: int, dtype, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    device = uses[0].inputs.device
    gram = torch.zeros(total, total, dtype=dtype, device=device)
    for a, u in enumerate(uses):
        for v in uses[a:]:
            # rows of u per tile so that the [(c T_u), (n_v T_v)] temporaries stay within the budget
            step = max(1, chunk_elements // max(1, u.tokens * v.n * v.tokens))
            block = torch.cat([_pair_tile(u, v, i0, min(u.n, i0 + step), dtype)
                               for i0 in range(0, u.n, step)])
            gram[u.samples, v.samples] += block
            if v is not u:
                gram[v.samples, u.samples] += block.T
    return gram


def scaled_uses(uses: list, samples: slice, r: torch.Tensor, c: torch.Tensor, dtype) -> list:
    """The dense uses with the samples in `samples` rescaled, B * r and A * c: their per-sample gradients
    become (r c^T) * G_i (see preconditioning.py); the other samples' uses are unchanged."""
    out = []
    for u in uses:
        lo, hi = max(u.samples.start, samples.start), min(u.samples.stop, samples.stop)
        if hi <= lo:
            out.append(u)
            continue
        a, b = lo - u.samples.start, hi - u.samples.start
        if a > 0:
            out.append(Use(u.kind, u.rows, u.cols, slice(u.samples.start, lo), u.inputs[:a], u.grads[:a]))
        out.append(Use(u.kind, u.rows, u.cols, slice(lo, hi), u.inputs[a:b].to(dtype) * c.to(dtype),
                       u.grads[a:b].to(dtype) * r.to(dtype)))
        if b < u.n:
            out.append(Use(u.kind, u.rows, u.cols, slice(hi, u.samples.stop), u.inputs[b:], u.grads[b:]))
    return out


# ---- a stored vector (the target of selection.target_ema), from the operands ---------------------------
def _within(u: Use, samples: slice) -> tuple:
    """(lo, hi): the positions in u of the samples in `samples` (hi <= lo: none)."""
    return max(u.samples.start, samples.start) - u.samples.start, min(u.samples.stop, samples.stop) - u.samples.start


def aligned_with(uses: list, samples: slice, vector: torch.Tensor, dtype,
                 chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """<G_i, vector> [len(samples)] for the samples in `samples`, summed over the dense and sparse uses,
    without forming G_i: a dense use gives sum_t b_t^T V a_t = rowsum((B_i V) * A_i) (one GEMM over its
    tokens, as a weight gradient costs), a sparse use sum_t b_t . V[id_t]. vector V: [rows, cols]."""
    out = torch.zeros(samples.stop - samples.start, dtype=dtype, device=vector.device)
    v = _as(vector, dtype)
    for u in uses:
        lo, hi = _within(u, samples)
        step = max(1, chunk_elements // max(1, u.tokens * u.cols))  # [c T, cols] temporaries
        for i0 in range(lo, hi, step):
            i1 = min(hi, i0 + step)
            b = _as(u.grads[i0:i1], dtype)
            if u.kind == Kind.DENSE:
                terms = (b.reshape(-1, u.rows) @ v) * _as(u.inputs[i0:i1], dtype).reshape(-1, u.cols)
            elif u.kind == Kind.SPARSE:
                ids = u.inputs[i0:i1].reshape(-1)  # -1: a row on another rank, or the padding row
                terms = v[ids.clamp(min=0)] * b.reshape(-1, u.cols) * (ids >= 0).to(dtype).unsqueeze(-1)
            else:
                raise ValueError(f"aligned_with: a {u.kind.value} use; allowed: dense or sparse (the others are "
                                 "per-sample vectors, formed on the materialised path)")
            first = u.samples.start + i0 - samples.start
            out[first:first + i1 - i0] += terms.reshape(i1 - i0, -1).sum(dim=1)
    return out


def samples_gradient(uses: list, samples: slice, dtype) -> torch.Tensor:
    """sum_i G_i [rows, cols] over the samples in `samples`, from the dense and sparse uses: one GEMM per
    dense use over all those samples' tokens, B^T A; a sparse use adds its tokens' b_t at their rows."""
    rows, cols = uses[0].rows, uses[0].cols
    grad = torch.zeros(rows, cols, dtype=dtype, device=uses[0].inputs.device)
    for u in uses:
        lo, hi = _within(u, samples)
        if hi <= lo:
            continue
        b = _as(u.grads[lo:hi], dtype)
        if u.kind == Kind.DENSE:
            grad.addmm_(b.reshape(-1, rows).T, _as(u.inputs[lo:hi], dtype).reshape(-1, cols))
        elif u.kind == Kind.SPARSE:
            ids = u.inputs[lo:hi].reshape(-1)
            inside = ids >= 0
            grad.index_add_(0, ids[inside], b.reshape(-1, cols)[inside])
        else:
            raise ValueError(f"samples_gradient: a {u.kind.value} use; allowed: dense or sparse")
    return grad


# ---- materialised path -----------------------------------------------------------------------------
class _SparseTokens:
    """A sparse use's tokens on this rank (row id >= 0) with their samples and output gradients. With
    several row tiles they are sorted by row id, so that each tile's tokens are one contiguous range;
    with one they are added as they come (no sort, no search)."""

    def __init__(self, u: Use, dtype, sort: bool):
        ids = u.inputs.reshape(-1)
        valid = torch.nonzero(ids >= 0, as_tuple=True)[0]  # -1: a row on another rank, or the padding row
        self.ids, token = ids[valid], valid
        if sort:
            self.ids, order = torch.sort(self.ids, stable=True)
            token = valid[order]
        self.sorted = sort
        self.sample = torch.div(token, u.tokens, rounding_mode="floor")
        self.grads = u.grads.reshape(-1, u.cols)[token].to(dtype)

    def add_to(self, block: torch.Tensor, first_sample: int, rows: slice, cols: slice) -> None:
        """block [total, rows, cols] += this use's per-sample gradients of that tile (unsorted: the tile
        has every row)."""
        lo, hi = 0, len(self.ids)
        if self.sorted:
            bounds = torch.tensor([rows.start, rows.stop], device=self.ids.device)
            lo, hi = (int(x) for x in torch.searchsorted(self.ids, bounds))
        if hi > lo:
            flat = (first_sample + self.sample[lo:hi]) * (rows.stop - rows.start) + (self.ids[lo:hi] - rows.start)
            block.view(-1, block.shape[-1]).index_add_(0, flat, self.grads[lo:hi, cols])


def rows_aligned(uses: list, total: int) -> bool:
    """Whether a sparse parameter has one use over every sample in which each sample looks up the same rows,
    none twice (a position embedding): then sample i's gradient is its output gradient B_i placed at those
    rows, and its Gram is that of the B_i (aligned_rows_flat), with no per-sample block formed."""
    if len(uses) != 1 or uses[0].kind != Kind.SPARSE or uses[0].n != total:
        return False
    ids = uses[0].inputs
    first = ids[0]
    if not bool((ids == first).all()):
        return False
    rows = first[first >= 0]  # -1: a row on another rank, or the padding row: no gradient
    return torch.unique(rows).numel() == rows.numel()


def aligned_rows_flat(u: Use, dtype) -> torch.Tensor:
    """[n, L] per-sample gradients of a use whose rows are aligned (rows_aligned), in the order of its tokens:
    the output gradients of the tokens with a row on this rank."""
    valid = u.inputs[0] >= 0
    grads = u.grads if bool(valid.all()) else u.grads[:, valid]
    return _as(grads, dtype).reshape(u.n, -1)


@dataclass
class Tile:
    """Per-sample gradients of one tile of a parameter [rows, cols]: block [total, rows, cols]."""
    rows: slice
    cols: slice
    block: torch.Tensor


VECTOR_KINDS = frozenset({Kind.BIAS, Kind.DIAG})


def is_vector(uses: list) -> bool:
    """A bias or a norm weight: every use a per-sample vector."""
    return all(u.kind in VECTOR_KINDS for u in uses)


def vector_tile(uses: list, total: int, dtype) -> Tile:
    """The per-sample gradients of a bias or a norm weight, summed over its uses, as one Tile
    [total, rows, 1]. Never cut into tiles: it is T times smaller than the output gradients it sums."""
    rows, first = uses[0].rows, uses[0]
    if len(uses) == 1 and first.n == total:
        return Tile(slice(0, rows), slice(0, 1), _token_sum(first, dtype).unsqueeze(-1))
    block = torch.zeros(total, rows, dtype=dtype, device=first.grads.device)
    for u in uses:
        block[u.samples] += _token_sum(u, dtype)
    return Tile(slice(0, rows), slice(0, 1), block.unsqueeze(-1))


def _token_sum(u: Use, dtype) -> torch.Tensor:
    """[n, rows]: a bias' sum_t B_it, or a norm weight's sum_t B_it * A_it."""
    b = _as(u.grads, dtype)
    if u.kind == Kind.DIAG:
        b = b * _as(u.inputs, dtype)
    return b.sum(dim=1)


# Per-sample GEMMs (K = tokens) with fewer output rows than this run far below the rate of one
# weight-gradient GEMM (measured on CPU: 0.65 at 32 rows, 0.85 at 128), so a wide parameter is cut into
# column tiles before its row tiles get that thin.
MIN_TILE_ROWS = 128


def tile_shape(rows: int, cols: int, total: int, chunk_elements: int) -> tuple:
    """(rows, cols) of the tiles of a [rows, cols] parameter whose total x rows x cols block fits in
    chunk_elements: tiles of full rows while they keep MIN_TILE_ROWS rows, else MIN_TILE_ROWS rows of as
    many columns as fit."""
    per_sample = max(1, chunk_elements // max(1, total))
    tile_rows = min(rows, max(1, per_sample // cols))
    tall = min(rows, MIN_TILE_ROWS)
    if tile_rows >= tall or per_sample < tall:  # tall enough, or even one column that tall would not fit
        return _balanced(rows, tile_rows), cols
    return tall, _balanced(cols, min(cols, per_sample // tall))


def _balanced(length: int, most: int) -> int:
    """The tile length that cuts `length` into as few tiles of at most `most` as possible, all nearly
    equal (4096 rows by at most 819: 6 tiles of 683, not 5 of 819 and one of 1)."""
    tiles = -(-length // most)
    return -(-length // tiles)


def materialised_blocks(uses: list, total: int, dtype, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                        fresh: bool = False):
    """Yield Tiles of per-sample gradients [total, tile rows, tile cols], summed over uses, tile by tile
    (tile_shape; a bias or norm weight is one vector_tile).

    One buffer serves every tile (each yielded tile is overwritten by the next): the first use of a
    sample writes its part, later ones add, and sparse uses add their few tokens last. fresh=True: each
    tile in a buffer of its own, which the caller may keep. The caller forms the tile's products while
    it is still in cache."""
    if is_vector(uses):
        yield vector_tile(uses, total, dtype)
        return
    rows, cols = uses[0].rows, uses[0].cols
    tile_rows, tile_cols = tile_shape(rows, cols, total, chunk_elements)
    device = uses[0].inputs.device
    sparse = [(u, _SparseTokens(u, dtype, sort=tile_rows < rows)) for u in uses if u.kind == Kind.SPARSE]
    dense = [u for u in uses if u.kind == Kind.DENSE]
    one_tile = tile_rows == rows and tile_cols == cols
    buffer = None if fresh or one_tile else torch.empty(total * tile_rows * tile_cols, dtype=dtype, device=device)
    for c0 in range(0, cols, tile_cols):  # columns outer: a use's input columns are packed once
        c = slice(c0, min(cols, c0 + tile_cols))
        inputs = [_tile_inputs(u, c if tile_cols < cols else None, dtype) for u in dense]
        for r0 in range(0, rows, tile_rows):
            r = slice(r0, min(rows, r0 + tile_rows))
            shape = (total, r.stop - r.start, c.stop - c.start)
            if buffer is None:
                block = torch.empty(shape, dtype=dtype, device=device)
            else:
                block = buffer[:shape[0] * shape[1] * shape[2]].view(shape)
            _fill_tile(block, dense, inputs, r if tile_rows < rows else None, total, dtype)
            for u, tokens in sparse:
                tokens.add_to(block, u.samples.start, r, c)
            yield Tile(r, c, block)


def _fill_tile(block: torch.Tensor, uses: list, inputs: list, rows: Optional[slice], total: int, dtype) -> None:
    """block = the sum over the dense uses of each sample's gradient tile (rows / cols None: all of
    them); 0 where none covers it. Which samples are written is tracked in Python: at small sizes the
    tensor ops would cost more."""
    if not uses:  # an embedding's tile: its sparse uses add their tokens to zeros
        block.zero_()
        return
    if len(uses) == 1 and uses[0].n == total:  # the common case: one layer call, every sample
        torch.bmm(_tile_grads_t(uses[0], rows, dtype), inputs[0], out=block)
        return
    written = bytearray(total)
    for u, u_inputs in zip(uses, inputs):
        lo, hi = u.samples.start, u.samples.stop
        out = block if lo == 0 and hi == total else block[lo:hi]
        seen = written[lo:hi].count(1)
        if 0 < seen < hi - lo:  # partly written: the rest starts from zero
            out[torch.tensor([not w for w in written[lo:hi]], device=block.device)] = 0
        grads_t = _tile_grads_t(u, rows, dtype)
        if seen:
            out.baddbmm_(grads_t, u_inputs)
        else:
            torch.bmm(grads_t, u_inputs, out=out)
        written[lo:hi] = b"\x01" * (hi - lo)
    if written.count(0):
        block[torch.tensor([not w for w in written], device=block.device)] = 0


# CPU BLAS reads a GEMM operand whose rows lie 4096 or more elements apart (16 KiB in fp32: an up
# projection's output gradient, a down projection's input) far below its rate: cache sets alias. Measured
# at B=32, T=128 with K = T: 4096 x 1024 weights 107-133 -> 144-197 GFLOP/s with the output-gradient tile
# copied to a packed [n, rows, T] first, 1024 x 4096 weights 117-123 -> 155-176 with the input columns
# copied. Copying costs one pass over the tile's operand, 1 / (2 x tile width) of its GEMM; it gains only
# on thin tiles (MIN_TILE_ROWS rows: at 256 and more rows the copy measured slower), and only on CPU.
ALIASING_STRIDE = 4096


def _tile_grads_t(u: Use, rows: Optional[slice], dtype) -> torch.Tensor:
    """B^T [n, r, T] of the tile's rows (a transposed view, or a packed copy where its stride aliases)."""
    g = u.grads if rows is None else u.grads[:, :, rows]
    if g.device.type != "cpu" or g.stride(1) < ALIASING_STRIDE or g.shape[2] > MIN_TILE_ROWS:
        return _as(g, dtype).transpose(1, 2)
    return torch.empty(g.shape[0], g.shape[2], g.shape[1], dtype=dtype, device=g.device).copy_(g.transpose(1, 2))


def _tile_inputs(u: Use, cols: Optional[slice], dtype) -> torch.Tensor:
    """A [n, T, c] of the tile's columns (a view, or a packed copy where its stride aliases)."""
    if cols is None:
        return _as(u.inputs, dtype)
    a = u.inputs[:, :, cols]
    if a.device.type != "cpu" or a.stride(1) < ALIASING_STRIDE:
        return _as(a, dtype)
    return torch.empty(a.shape, dtype=dtype, device=a.device).copy_(a)


def blocks_fit(uses: list, total: int, dtype) -> bool:
    """Whether a parameter's per-sample gradients [total, rows, cols] in `dtype` take no more bytes than
    the operands of its uses (layer inputs and output gradients, e.g. bf16 where the blocks are fp32):
    then keeping blocks costs no memory."""
    operands = sum(t.numel() * t.element_size() for u in uses for t in (u.inputs, u.grads) if t is not None)
    return total * uses[0].rows * uses[0].cols * dtype.itemsize <= operands


# ---- Gram rows averaged into one ----------------------------------------------------------------------
def gram_size(total: int, averaged: Optional[slice]) -> int:
    """Rows of a Gram whose samples in `averaged` (the last ones) are one row: their mean gradient."""
    return total if averaged is None or averaged.stop <= averaged.start else averaged.start + 1


def averaged_gram(gram: torch.Tensor, averaged: Optional[slice]) -> torch.Tensor:
    """A [total, total] Gram with the samples of `averaged` (the last ones) merged into their mean."""
    total = gram.shape[0]
    size = gram_size(total, averaged)
    if size == total:
        return gram
    a = averaged.start
    out = gram.new_empty(size, size)
    out[:a, :a] = gram[:a, :a]
    out[:a, a] = gram[:a, a:].mean(dim=1)
    out[a, :a] = gram[a:, :a].mean(dim=0)
    out[a, a] = gram[a:, a:].mean()
    return out


# ---- the weighted gradient of a parameter (single-pass update) --------------------------------------
def weighted_block_sum(tiles: list, weights: torch.Tensor, shape, dtype) -> torch.Tensor:
    """sum_i weights[i] G_i over the samples with a non-zero weight, from kept per-sample gradient Tiles
    covering the parameter: k additions of parameter-sized blocks instead of k GEMMs over the tokens."""
    rows, cols = max(t.rows.stop for t in tiles), max(t.cols.stop for t in tiles)
    grad = torch.zeros(rows, cols, dtype=tiles[0].block.dtype, device=tiles[0].block.device)
    chosen = torch.nonzero(weights, as_tuple=True)[0]
    for tile in tiles:
        for i, w_i in zip(chosen.tolist(), weights[chosen].tolist()):
            grad[tile.rows, tile.cols].add_(tile.block[i], alpha=w_i)
    return grad.to(dtype).reshape(shape)


def weighted_gradient(uses: list, weights: torch.Tensor, shape, dtype) -> torch.Tensor:
    """sum_i weights[i] G_i over every sample of every use: the parameter's gradient (this rank's shard)
    of a loss that weighs sample i by weights[i] (e.g. 1/k for the k selected samples, 0 elsewhere).
    Only samples with a non-zero weight are touched, one at a time on the operands in place (a dense use
    adds one GEMM per such sample): gathering the selected rows of a large output gradient costs more."""
    rows, cols = uses[0].rows, uses[0].cols
    grad = torch.zeros(rows, cols, dtype=dtype, device=uses[0].inputs.device)
    for u in uses:
        w = weights[u.samples].to(dtype=dtype, device=grad.device)
        chosen = torch.nonzero(w, as_tuple=True)[0]
        if len(chosen) == 0:
            continue
        if u.kind == Kind.SPARSE:
            ids = u.inputs[chosen].reshape(-1)
            inside = ids >= 0  # -1: a row on another tensor-parallel rank, or the padding row
            b = torch.einsum("s,stc->stc", w[chosen], u.grads[chosen].to(dtype))  # tokens x embedding width
            grad.index_add_(0, ids[inside], b.reshape(-1, cols)[inside])
            continue
        for i, w_i in zip(chosen.tolist(), w[chosen].tolist()):
            b = u.grads[i].to(dtype)                                      # [T, rows]
            if u.kind == Kind.DENSE:
                grad.addmm_(b.T, u.inputs[i].to(dtype), alpha=w_i)
            elif u.kind == Kind.BIAS:
                grad.add_(b.sum(0).unsqueeze(-1), alpha=w_i)
            else:  # DIAG
                grad.add_((b * u.inputs[i].to(dtype)).sum(0).unsqueeze(-1), alpha=w_i)
    return grad.reshape(shape)
