"""GhostRecorder: the B x B matrix of per-sample gradient inner products over the recorded layers.

    rec = GhostRecorder(model, include=None, exclude=None)
    with rec.capture():
        losses = per_sample_losses(model, batch)     # [B]
        rec.backward(losses)                         # d(losses.sum()) w.r.t. activations only
    gram = rec.gram()                                # [B, B]
    rec.parameters()                                 # the parameters the Gram covers
    rec.uncovered()                                  # names of trainable parameters it leaves out

During a capture every parameter is frozen (requires_grad=False) so the forward builds a graph over
activations only: rec.backward never computes a weight gradient nor touches .grad, and DeepSpeed's
gradient hooks never fire. Layer outputs that would then be leaves are marked as roots; backward
differentiates w.r.t. them.

Parallel sums (after gram() every rank of the model-parallel group holds the same full Gram):
  tensor-sharded parameters: each rank's partial product over its shard, SUM over ranks;
  replicated parameters: counted on tensor-parallel rank 0 only;
  replicated parameters applied to sequence shards (norms under sequence parallelism): per-sample
  vectors summed over tensor-parallel ranks first;
  pipeline stages hold disjoint parameters: SUM; a weight tied across stages (DeepSpeed TiedLayerSpec)
  is computed on the last stage of its tie group from the operands of all of its stages.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections import defaultdict
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from megatron_greats.ghost import products
from megatron_greats.ghost.layers import recorded_modules, rule_for, samples_first
from megatron_greats.ghost.products import Use

PATHS = ("auto", "ghost", "materialise")


def _matches(name: str, patterns: Optional[Sequence[str]]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


@contextlib.contextmanager
def frozen_parameters(model: nn.Module):
    """requires_grad=False on the model's trainable parameters for the duration: the graph covers activations only."""
    frozen = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _in_backward() -> bool:
    # Non-reentrant activation recomputation reruns forward inside backward: do not record it twice.
    return torch._C._current_graph_task_id() != -1


class GhostRecorder:
    def __init__(self, model: nn.Module, include: Optional[Sequence[str]] = None,
                 exclude: Optional[Sequence[str]] = None, batch_dim: int = 0, path: str = "auto",
                 tensor_group=None, model_parallel_group=None,
                 chunk_elements: int = products.DEFAULT_CHUNK_ELEMENTS):
        """
        model: any nn.Module; supported layers are found by type (see ghost/layers.py).
        include / exclude: fnmatch patterns over parameter names (model.named_parameters()).
        batch_dim: where the sample index sits in torch layers' activations (0: [B, T, H]; 1: [T, B, H]).
            megatron-core layers are always [T, B, H].
        path: "auto" (cost model per parameter), or force "ghost" / "materialise".
        tensor_group / model_parallel_group: default to megatron-core's groups when initialised.
        """
        if path not in PATHS:
            raise ValueError(f"path={path!r}; allowed: {', '.join(PATHS)}")
        if batch_dim not in (0, 1):
            raise ValueError(f"batch_dim={batch_dim!r}; allowed: 0 ([B, T, H]) or 1 ([T, B, H])")
        self.model, self.batch_dim, self.path, self.chunk_elements = model, batch_dim, path, chunk_elements
        self.names = {}
        for name, p in model.named_parameters(remove_duplicate=True):
            self.names.setdefault(p, name)
        # one order on every rank: collectives inside the reduction must line up
        self._order = {p: i for i, p in enumerate(self.names)}
        self.selected = {p for p, name in self.names.items()
                         if (include is None or _matches(name, include)) and not _matches(name, exclude)}
        self.trainable = {p for p in self.names if p.requires_grad}  # read now: a capture freezes them
        self.modules = recorded_modules(model)
        self.tensor_group, self.model_parallel_group = self._default_groups(tensor_group, model_parallel_group)
        self.tied = self._pipeline_ties(model)
        self._tied_ids = {id(p) for p, _, _ in self.tied}  # computed once: _stream runs in every backward hook
        self.clock = None  # optional: an object with .phase(name) (training/telemetry.py's PhaseClock)
        self._reset()

    # ---- set-up -----------------------------------------------------------------------------------
    @staticmethod
    def _default_groups(tensor_group, model_parallel_group):
        if not dist.is_initialized():
            return None, None
        try:
            from megatron.core import parallel_state as ps

            if ps.model_parallel_is_initialized():
                tensor_group = tensor_group or ps.get_tensor_model_parallel_group()
                model_parallel_group = model_parallel_group or ps.get_model_parallel_group()
        except ImportError:
            pass
        return tensor_group, model_parallel_group

    def _pipeline_ties(self, model) -> list:
        """[(param, group, ranks)] for weights a DeepSpeed PipelineModule ties across stages."""
        ties = []
        for key, comm in sorted(getattr(model, "tied_comms", {}).items()):
            for attr in comm["weight_attr"]:
                param = comm["module"]
                for part in attr.split("."):
                    param = getattr(param, part)
                if param in self.selected:
                    ties.append((param, comm["group"], comm["ranks"]))
        return ties

    def _phase(self, name: str):
        return self.clock.phase(name) if self.clock is not None else contextlib.nullcontext()

    def _reset(self):
        self._uses = defaultdict(list)       # param -> [Use]
        self._streamed = None                # Gram part of parameters already reduced during backward
        self._streaming = True               # off once micro-batches are used (cross terms need every use)
        self._reductions = {}                # param -> reduction
        self._roots = []                     # leaf outputs marked requires_grad
        self._micro_batch = (0, None)        # (index, size)
        self._sizes = {}                     # micro-batch index -> size

    def parameters(self) -> list:
        """Exactly the parameters the Gram covers (those of supported layers that pass include/exclude)."""
        covered, seen = [], set()
        for module in self.modules:
            for p in rule_for(module).covers(module):
                if p in self.selected and p not in seen:
                    covered.append(p)
                    seen.add(p)
        # a tied output layer owns no weight but uses the embedding's; it is covered where it lives
        return covered

    def uncovered(self) -> list:
        """Names of trainable parameters that include/exclude select but no supported layer records.

        The Gram would silently leave them out; a caller that needs every parameter refuses these.
        """
        covered = set(self.parameters())
        return [name for p, name in self.names.items()
                if p in self.selected and p in self.trainable and p not in covered]

    # ---- capture ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def capture(self):
        """Record supported layers' operands; parameters are frozen for the duration (see module doc)."""
        self._reset()
        handles = []
        try:
            with frozen_parameters(self.model):
                for module in self.modules:
                    handles += rule_for(module).install(module, self._report, self.batch_dim)
                yield self
        finally:
            for h in handles:
                h.remove()

    def begin_micro_batch(self, index: int, size: int) -> None:
        """Following layer calls belong to micro-batch `index` (samples index*size ... of the Gram)."""
        self._micro_batch = (index, size)
        self._streaming = False

    def _report(self, operands: list, output: torch.Tensor, batch_dim: int):
        if not torch.is_grad_enabled() or _in_backward():
            return None
        operands = [op for op in operands if op.param in self.selected]
        if not operands:
            return None
        n = operands[0].inputs.shape[0]
        index, size = self._micro_batch
        size = n if size is None else size
        if size != n:
            raise ValueError(f"GhostRecorder: a layer saw {n} samples in micro-batch {index} of size {size}")
        if self._sizes.get(index, n) != n:  # e.g. a wrong batch_dim: samples and tokens swapped
            raise ValueError(f"GhostRecorder: a layer saw {n} samples, an earlier one {self._sizes[index]}; "
                             f"allowed: one sample count per micro-batch (check batch_dim={self.batch_dim})")
        self._sizes[index] = n
        samples = slice(index * n, (index + 1) * n)
        uses = []
        for op in operands:
            use = Use(op.kind, op.rows, op.cols, samples, op.inputs)
            self._uses[op.param].append(use)
            self._reductions[op.param] = op.reduction
            uses.append(use)
        if not output.requires_grad:
            output.requires_grad_(True)
            self._roots.append(output)

        def fill(grad):
            b = samples_first(grad.detach(), batch_dim)
            for use in uses:
                use.grads = b
            if self._streaming:
                self._stream({op.param for op in operands})
        output.register_hook(fill)
        return None

    def _stream(self, params: set) -> None:
        """Reduce parameters whose every use has its gradient now, and drop their operands.

        With one micro-batch nothing else can add to them, so the activations and output gradients
        they hold are freed during backward instead of piling up until gram().
        """
        for param in sorted(params, key=self._order_key):
            uses = self._uses.get(param)
            if id(param) in self._tied_ids or not uses or any(u.grads is None for u in uses):
                continue
            with self._phase("ghost_products"):
                part = self._param_gram_if_counted(param, uses, uses[0].n)
            if part is not None:
                self._streamed = part if self._streamed is None else self._streamed + part
            del self._uses[param]

    def backward(self, losses: torch.Tensor) -> None:
        """Backward of losses.sum() w.r.t. the recorded activations; no parameter gradient is formed."""
        self.backward_from([losses.sum()], [None])

    def backward_from(self, tensors: list, grad_tensors: list, inputs: Sequence[torch.Tensor] = ()) -> list:
        """Backward of a pipeline stage: given output gradients, return d/d(inputs) (e.g. the stage input)."""
        targets = list(inputs) + [r for r in self._roots if r.requires_grad]
        if not targets:
            return []
        grads = torch.autograd.grad(tensors, targets, grad_outputs=grad_tensors, allow_unused=True)
        return list(grads[:len(inputs)])

    # ---- the Gram ---------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return sum(self._sizes.values())

    def gram(self) -> torch.Tensor:
        """[B, B] over all micro-batches recorded, identical on every rank of the model-parallel group."""
        with self._phase("allreduce"):
            total = self._agreed_total()
            local = self._gather_tied_uses()
        first = next(self.model.parameters())
        dtype = products.compute_dtype(first.dtype)  # the same on every rank: the all-reduce needs it
        gram = torch.zeros(total, total, dtype=dtype, device=first.device)
        if self._streamed is not None:
            gram += self._streamed
        for param in sorted(self._uses, key=self._order_key):
            uses = self._uses[param]
            if any(u.grads is None for u in uses):
                raise RuntimeError(f"GhostRecorder: no output gradient reached a layer using '{self.names[param]}'; "
                                   "call rec.backward(losses) inside the capture")
            if param in local:
                with self._phase("ghost_products"):
                    part = self._param_gram_if_counted(param, uses, total)
                    if part is not None:
                        gram += part.to(dtype)
        if self.model_parallel_group is not None and dist.get_world_size(self.model_parallel_group) > 1:
            with self._phase("allreduce"):
                dist.all_reduce(gram, group=self.model_parallel_group)
        return gram

    def _agreed_total(self) -> int:
        total = self.num_samples
        if self.model_parallel_group is not None:
            # stages without recorded layers still need the size
            t = torch.tensor([total], dtype=torch.int64, device=self._device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.model_parallel_group)
            total = int(t)
        return total

    def _device(self):
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _order_key(self, param) -> int:
        return self._order.get(param, len(self._order))

    def _param_gram_if_counted(self, param, uses: list, total: int) -> Optional[torch.Tensor]:
        """This rank's share of the parameter's Gram, or None where another rank counts it."""
        tensor_rank = dist.get_rank(self.tensor_group) if self.tensor_group is not None else 0
        reduction = self._reductions[param]
        if reduction == "once" and tensor_rank != 0:
            return None  # replicated over tensor-parallel ranks: rank 0 counts it
        dtype = products.compute_dtype(next(self.model.parameters()).dtype)
        part = self._param_gram(param, uses, total, dtype, tensor_rank)
        return None if reduction == "sum_vectors" and tensor_rank != 0 else part

    def _param_gram(self, param, uses: list, total: int, dtype, tensor_rank: int) -> torch.Tensor:
        path = products.choose_path(uses, total, None if self.path == "auto" else self.path)
        if path == "ghost":
            return products.ghost_gram(uses, total, dtype, self.chunk_elements)
        gram = torch.zeros(total, total, dtype=dtype, device=uses[0].inputs.device)
        for block in products.materialised_blocks(uses, total, dtype, self.chunk_elements):
            if self._reductions[param] == "sum_vectors" and self.tensor_group is not None:
                with self._phase("allreduce"):
                    dist.all_reduce(block, group=self.tensor_group)  # every rank joins; rank 0 counts it
            gram += block @ block.T
        return gram

    def _gather_tied_uses(self) -> set:
        """Ship the uses of weights tied across pipeline stages to the last stage of each tie group.

        Returns the parameters this rank computes (all of its own, minus tied ones owned elsewhere).
        """
        local = set(self._uses)
        for param, group, ranks in self.tied:
            me, compute_rank = dist.get_rank(), max(ranks)
            for src in sorted(ranks):
                if src == compute_rank:
                    continue
                received = _broadcast_uses(self._uses.get(param, []) if me == src else None, src, group,
                                           self._device())
                if me == compute_rank:
                    self._uses[param].extend(received)
                    self._reductions.setdefault(param, _reduction_of(param))
            if me != compute_rank:
                local.discard(param)
            elif self._uses.get(param):
                local.add(param)
        return local


def _reduction_of(param) -> str:
    return "sum" if getattr(param, "tensor_model_parallel", False) else "once"


_KINDS = ("dense", "sparse", "diag")
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


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
            in_dtype = torch.int64 if _KINDS[kind] == "sparse" else dtype
            inputs = torch.empty([int(x) for x in meta[6:6 + ndim]], dtype=in_dtype, device=device)
            grads = torch.empty([int(x) for x in meta[9:12]], dtype=dtype, device=device)
        dist.broadcast(inputs, src, group=group)
        dist.broadcast(grads, src, group=group)
        received.append(Use(_KINDS[kind], rows, cols, slice(start, stop), inputs, grads))
    return received
