"""GhostRecorder: the B x B matrix of per-sample gradient inner products over the recorded layers.

    rec = GhostRecorder(model, include=None, exclude=None)  # once per model: what is recorded
    rec.parameters()                                         # the parameters the Gram covers
    rec.uncovered()                                          # names of trainable parameters it leaves out
    with rec.capture() as cap:                               # once per step: a GhostCapture
        losses = per_sample_losses(model, batch)             # [B]
        cap.backward(losses)                                 # d(losses.sum()) w.r.t. activations only
    gram = cap.gram()                                        # [B, B]
    cap.weighted_gradients(w)                                # sum_i w_i g_i per parameter (keep_operands=True)
    cap.release()                                            # frees what it holds; nothing is read after it

A step's capture is one object: it records inside its with-block, then gives the Gram and an update
from what the Gram's reduction kept (weighted_gradients forms the Gram first where gram() was not
called), until release(). The recorder holds only what belongs to the model (the names, the scored
and captured parameters, the recorded modules, the groups, the pipeline ties); its next capture()
releases the previous capture, so no two steps' operands are held at once.

During a capture every parameter is frozen (requires_grad=False) so the forward builds a graph over
activations only: cap.backward never computes a weight gradient nor touches .grad, and DeepSpeed's
gradient hooks never fire. Layer outputs that would then be leaves are marked as roots; backward
differentiates w.r.t. them.

The pieces: capture.py keeps the operands of each layer call (the captured parameters: the scored
ones, or with keep_operands=True every trainable parameter, for an update formed from them);
reduction.py turns the uses of the scored parameters into the Gram and sums it over ranks; ties.py
moves the uses of weights tied across pipeline stages to one stage. With a single micro-batch each
scored parameter is reduced during backward, as soon as its last use has its output gradient, and
its operands are freed at once unless an update needs them (keep_operands=True: per parameter either
the per-sample gradients the Gram was formed from are kept, or the operands; see UpdateFrom).
"""

from __future__ import annotations

import fnmatch
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from megatron_greats.ghost import products
from megatron_greats.ghost.capture import CaptureStore, frozen_parameters
from megatron_greats.ghost.layers import recorded_modules, rule_for
from megatron_greats.ghost.products import Path, UpdateFrom
from megatron_greats.ghost.reduction import GramReduction, Reduction
from megatron_greats.ghost.ties import gather_tied_uses, pipeline_ties
from megatron_greats.phases import ALLREDUCE

__all__ = ["GhostCapture", "GhostRecorder", "frozen_parameters"]


def matches(name: str, patterns: Optional[Sequence[str]]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


class GhostRecorder:
    def __init__(self, model: nn.Module, include: Optional[Sequence[str]] = None,
                 exclude: Optional[Sequence[str]] = None, batch_dim: int = 0, path: str = Path.AUTO,
                 tensor_group=None, model_parallel_group=None,
                 chunk_elements: int = products.DEFAULT_CHUNK_ELEMENTS, keep_operands: bool = False,
                 update_from: str = UpdateFrom.AUTO):
        """
        model: any nn.Module; supported layers are found by type (see ghost/layers.py).
        include / exclude: fnmatch patterns over parameter names (model.named_parameters()): what is scored.
        batch_dim: where the sample index sits in torch layers' activations (0: [B, T, H]; 1: [T, B, H]).
            megatron-core layers are always [T, B, H].
        path: "auto" (cost model per parameter), or force "ghost" / "materialise".
        tensor_group / model_parallel_group: default to megatron-core's groups when initialised.
        keep_operands: also capture every trainable parameter's operands, and keep what an update formed
            from them needs until the capture's release (GhostCapture.weighted_gradients).
        update_from: with keep_operands, what a scored parameter keeps: "auto", "blocks" (its per-sample
            gradients, where the materialised path forms them) or "operands" (see UpdateFrom).
        """
        if path not in tuple(Path):
            raise ValueError(f"path={path!r}; allowed: {', '.join(p.value for p in Path)}")
        if update_from not in tuple(UpdateFrom):
            raise ValueError(f"update_from={update_from!r}; allowed: {', '.join(u.value for u in UpdateFrom)}")
        self.update_from = UpdateFrom(update_from)
        if batch_dim not in (0, 1):
            raise ValueError(f"batch_dim={batch_dim!r}; allowed: 0 ([B, T, H]) or 1 ([T, B, H])")
        self.model, self.batch_dim, self.path, self.chunk_elements = model, batch_dim, Path(path), chunk_elements
        self.keep_operands = keep_operands
        self.names = {}
        for name, p in model.named_parameters(remove_duplicate=True):
            self.names.setdefault(p, name)
        # one order on every rank: collectives inside the reduction must line up
        self._order = {p: i for i, p in enumerate(self.names)}
        self._parameters = list(self.names)  # listed once: model.parameters() walks every module each time
        self.scored = {p for p, name in self.names.items()
                       if (include is None or matches(name, include)) and not matches(name, exclude)}
        self.trainable = {p for p in self.names if p.requires_grad}  # read now: a capture freezes them
        self.captured = self.scored | (self.trainable if keep_operands else set())
        self.modules = recorded_modules(model)
        self.tensor_group, self.model_parallel_group = self._default_groups(tensor_group, model_parallel_group)
        self.tied = pipeline_ties(model, self.scored)
        self._tied = {p for p, _, _ in self.tied}
        self._last = None  # the last capture: the next one releases it

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

    def parameters(self) -> list:
        """Exactly the parameters the Gram covers (those of supported layers that pass include/exclude)."""
        covered, seen = [], set()
        for module in self.modules:
            for p in rule_for(module).covers(module):
                if p in self.scored and p not in seen:
                    covered.append(p)
                    seen.add(p)
        # a tied output layer owns no weight but uses the embedding's; it is covered where it lives
        return covered

    def parameter_names(self) -> tuple:
        """(every parameter's name, the trainable ones', the trainable scored ones'), of this module."""
        return (list(self.names.values()), [self.names[p] for p in self.trainable],
                [self.names[p] for p in self.trainable if p in self.scored])

    def uncovered(self) -> list:
        """Names of trainable parameters to capture (those include/exclude select; with keep_operands all
        of them) that no supported layer records.

        The Gram, or an update formed from the operands, would silently leave them out; a caller that
        needs every parameter refuses these.
        """
        covered = {p for module in self.modules for p in rule_for(module).covers(module)}
        return [name for p, name in self.names.items()
                if p in self.captured and p in self.trainable and p not in covered]

    # ---- capture ----------------------------------------------------------------------------------
    def capture(self, preconditioning=None, averaged: Optional[slice] = None, clock=None,
                target: Optional[dict] = None) -> "GhostCapture":
        """A new step's capture (use it as a context manager: it records inside the with-block). The
        previous capture of this recorder is released first, so that no two steps' operands are held.
        preconditioning: optional Preconditioning (ghost/preconditioning.py): the Gram rows of its samples
        hold D g_i instead of g_i; after gram(), its rank_one_errors() says what the ghost path fitted.
        averaged: optional slice of the last samples (e.g. validation samples) that the Gram holds as one
        row, their mean gradient: gram() is then [a + 1, a + 1] with a = averaged.start, which saves
        the products between them. An update may not weigh them (weighted_gradients).
        clock: optional, an object with .phase(name) (training/telemetry.py's PhaseClock) that times the
        capture's products and sums over ranks.
        target: optional {param: V} of stored vectors (param-shaped, this rank's shard; may be empty), with
        `averaged`: after gram(), target_alignment() holds each individual sample's <g_i, V> summed over
        the scored parameters (D g_i with a preconditioning, as in the Gram's rows), and
        averaged_gradients() the averaged samples' mean gradient per parameter (selection.target_ema)."""
        if self._last is not None:
            self._last.release()
        self._last = GhostCapture(self, preconditioning, averaged, clock, target)
        return self._last


class GhostCapture:
    """One step of a GhostRecorder: recorded inside its with-block, read until release().

        with rec.capture() as cap:        # the supported layers' operands; parameters frozen
            cap.begin_micro_batch(i, b)   # before each micro-batch's forward, where there are several
            cap.backward(losses)          # or backward_from(...) on a pipeline stage
        cap.gram()                        # formed once: the same tensor on every call
        cap.weighted_gradients(w)         # from what the Gram's reduction kept (keep_operands=True)
        cap.release()                     # reading the capture after it is an error
    """

    def __init__(self, recorder: GhostRecorder, preconditioning=None, averaged: Optional[slice] = None, clock=None,
                 target: Optional[dict] = None):
        self._recorder = rec = recorder
        # the same on every rank: the all-reduce needs it
        self._dtype = products.compute_dtype(rec._parameters[0].dtype)
        self._averaged = averaged if averaged is not None and averaged.stop > averaged.start else None
        if target is not None and self._averaged is None:
            raise ValueError("GhostCapture: a target needs averaged samples (e.g. the validation samples); allowed: "
                             "capture(averaged=slice(a, total), target=...)")
        self._store = CaptureStore(rec.modules, rec.captured, rec.batch_dim, self._on_complete)
        self._reduction = GramReduction(rec._order, rec.path, rec.chunk_elements, rec.tensor_group,
                                        rec.model_parallel_group, self._dtype, clock=clock,
                                        preconditioning=preconditioning, averaged=self._averaged, target=target)
        self._streaming, self._reduced, self._gram = True, set(), None
        self._recording = None  # the with-block's recording, once entered

    # ---- recording --------------------------------------------------------------------------------
    def __enter__(self) -> "GhostCapture":
        """Record supported layers' operands; parameters are frozen for the duration (see module doc)."""
        store = self._held("recording")
        if self._recording is not None:
            raise RuntimeError("GhostCapture: a capture records in one with-block; allowed: a new rec.capture() "
                               "for each step")
        self._recording = store.recording(self._recorder._parameters)
        self._recording.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._recording.__exit__(*exc)

    def begin_micro_batch(self, index: int, size: int) -> None:
        """Following layer calls belong to micro-batch `index` (samples index*size ... of the Gram)."""
        self._held("begin_micro_batch()").begin_micro_batch(index, size)
        self._streaming = False  # cross terms between micro-batches need every use: reduce in gram()

    def backward(self, losses: torch.Tensor) -> None:
        """Backward of losses.sum() w.r.t. the recorded activations; no parameter gradient is formed."""
        self.backward_from([losses.sum()], [None])

    def backward_from(self, tensors: list, grad_tensors: list, inputs: Sequence[torch.Tensor] = ()) -> list:
        """Backward of a pipeline stage: given output gradients, return d/d(inputs) (e.g. the stage input)."""
        return self._held("backward_from()").backward_from(tensors, grad_tensors, inputs)

    def _on_complete(self, params: set) -> None:
        """With one micro-batch nothing else can add to a parameter whose every use has its output
        gradient: reduce it now, and (without keep_operands) free its activations and output gradients
        during backward instead of holding them until gram()."""
        if not self._streaming:
            return
        rec, store, reduction = self._recorder, self._store, self._reduction
        for param in reduction.sorted(params):
            uses = store.uses_of(param)
            if param in rec._tied or not uses or any(u.grads is None for u in uses):
                continue
            if param in rec.scored:
                reduction.add_streamed(param, uses, store.reduction(param), self._keeps(param, uses))
                self._reduced.add(param)
            if not rec.keep_operands or reduction.keeps_blocks(param):
                store.free(param)

    def _keeps(self, param, uses: list) -> bool:
        """Whether the update keeps this scored parameter's per-sample gradients (not its operands)."""
        rec = self._recorder
        if not rec.keep_operands or rec.update_from == UpdateFrom.OPERANDS or param in rec._tied:
            return False  # a tied weight's Gram blocks hold other stages' uses too
        if rec.update_from == UpdateFrom.BLOCKS:
            return True
        total = self._store.num_samples  # aligned rows: the Gram forms no blocks, the update reads the operands
        return products.blocks_fit(uses, total, self._dtype) and not products.rows_aligned(uses, total)

    def _held(self, what: str) -> CaptureStore:
        """The capture's store; reading a released capture is an error."""
        if self._store is None:
            raise RuntimeError(f"GhostCapture: {what} after release(); allowed: reading a capture before its "
                               "release() or the recorder's next capture()")
        return self._store

    # ---- what is read from it -----------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return self._held("num_samples").num_samples

    def gram(self) -> torch.Tensor:
        """[B, B] over all micro-batches recorded, identical on every rank of the model-parallel group.
        Computed once per capture (after backward, inside or after the with-block); a second call
        returns the same tensor."""
        store = self._held("gram()")
        if self._gram is None:
            self._gram = self._reduce(store)
        return self._gram

    def _reduce(self, store: CaptureStore) -> torch.Tensor:
        rec, reduction = self._recorder, self._reduction
        device = next(rec.model.parameters()).device
        with reduction.phase(ALLREDUCE):
            total = self._agreed_total(device)
            # a copy: uses received from other stages count in the Gram, never in this stage's update
            uses_of = store.uses_by_parameter()
            elsewhere = gather_tied_uses(rec.tied, uses_of, device)
        averaged = self._averaged
        if averaged is not None and averaged.stop != total:
            raise ValueError(f"GhostCapture: averaged samples {averaged.start}..{averaged.stop - 1} of {total}; "
                             "allowed: the last samples of the capture")
        pending = {p: uses for p, uses in uses_of.items()
                   if p in rec.scored and p not in self._reduced and p not in elsewhere}
        for param, uses in pending.items():
            if any(u.grads is None for u in uses):
                raise RuntimeError(f"GhostCapture: no output gradient reached a layer using '{rec.names[param]}'; "
                                   "call cap.backward(losses) inside the capture")
        keep = {p for p, uses in pending.items() if self._keeps(p, uses)}
        reductions = {p: store.reduction(p) for p in pending}
        gram = reduction.finish(pending, reductions, total, device, keep)
        if not rec.keep_operands:
            store.forget_uses()
        for param in reduction.kept_parameters():
            store.free(param)
        return gram

    def _agreed_total(self, device) -> int:
        total = self.num_samples
        group = self._recorder.model_parallel_group
        if group is not None:
            # stages without recorded layers still need the size
            t = torch.tensor([total], dtype=torch.int64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            total = int(t)
        return total

    def target_alignment(self) -> torch.Tensor:
        """[a] (a = averaged.start): each individual sample's <g_i, V> over the scored parameters, with the
        capture's target V (D g_i where its Gram rows are preconditioned), summed over the model-parallel
        group like the Gram; formed with it."""
        self._needs_target("target_alignment()")
        self.gram()
        return self._reduction.target_alignment

    def averaged_gradients(self) -> dict:
        """{param: the averaged samples' mean gradient, param-shaped} for the scored parameters this rank
        counts in the Gram (its tensor-parallel shard; a parameter replicated over tensor-parallel ranks
        on tensor rank 0 only; a weight tied across pipeline stages on the stage that forms its Gram).
        Formed with the Gram; new tensors, which outlive release()."""
        self._needs_target("averaged_gradients()")
        self.gram()
        return {p: mean.view(p.shape) for p, mean in self._reduction.means.items()}

    def _needs_target(self, what: str) -> None:
        if self._held(what) is not None and self._reduction.target is None:
            raise RuntimeError(f"GhostCapture: {what} needs a capture with a target; allowed: "
                               "rec.capture(averaged=..., target={...})")

    def weighted_gradients(self, weights: torch.Tensor) -> dict:
        """{param: sum_i weights[i] * per-sample gradient_i} for every captured parameter
        (keep_operands=True), as this rank's shard of the parameter; per-sample vectors of sequence
        shards are summed over tensor-parallel ranks, so every rank holds the full gradient. Pipeline
        ties are left to the engine (each stage holds its own uses' part). The Gram's reduction decides
        what each parameter keeps (its per-sample gradients or its operands): it is formed first where
        gram() has not been called."""
        rec = self._recorder
        if not rec.keep_operands:
            raise RuntimeError("GhostCapture: weighted_gradients() needs GhostRecorder(..., keep_operands=True)")
        store = self._held("weighted_gradients()")
        self.gram()
        averaged, reduction = self._averaged, self._reduction
        if averaged is not None and bool(weights[averaged].ne(0).any()):
            raise ValueError(f"GhostCapture: weights on the averaged samples {averaged.start}..{averaged.stop - 1}; "
                             "allowed: zero there (the Gram holds only their mean)")
        grads = {}
        for param in reduction.sorted(set(store.used_parameters()) | set(reduction.kept_parameters())):
            if reduction.keeps_blocks(param):  # already summed over tensor-parallel ranks where that was needed
                grads[param] = reduction.weighted_blocks(param, weights)
                continue
            grad = products.weighted_gradient(store.uses_of(param), weights, param.shape, param.dtype)
            if store.reduction(param) == Reduction.SUM_VECTORS and rec.tensor_group is not None:
                dist.all_reduce(grad, group=rec.tensor_group)
            grads[param] = grad
        return grads

    def held_bytes(self) -> int:
        """Memory the capture still holds: the storages of its kept operands and per-sample blocks (the
        Gram aside); 0 once released. Streamed parameters free theirs during backward, unless an update
        needs them."""
        if self._store is None:
            return 0
        return self._store.held_bytes() + self._reduction.blocks_bytes()

    def update_sources(self) -> dict:
        """Parameter name -> what the capture keeps for weighted_gradients: "blocks" or "operands"."""
        if self._store is None:
            return {}
        names, reduction = self._recorder.names, self._reduction
        sources = {names[p]: UpdateFrom.OPERANDS.value for p in self._store.used_parameters()
                   if not reduction.keeps_blocks(p)}
        sources.update({names[p]: UpdateFrom.BLOCKS.value for p in reduction.kept_parameters()})
        return sources

    def release(self) -> None:
        """Drop what the capture holds (operands, kept blocks, Gram). Reading it afterwards is an error;
        releasing again does nothing."""
        if self._store is not None:
            self._store.close()
        self._store = self._reduction = self._gram = None
