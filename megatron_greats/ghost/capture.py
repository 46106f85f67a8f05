"""The capture store: per parameter, the operands (Use records) of every layer call during a capture.

The capture rules (layers.py) report each call's operands; the store keeps those of the captured
parameters, marks which samples (micro-batch) they belong to, and fills in each use's output gradient
when backward reaches it. on_complete(params) is called when the output gradient of a layer call has
arrived, with the parameters that call used. Its owner (the recorder's GhostCapture) reads and frees
the uses through its methods.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Callable, Sequence

import torch

from megatron_greats.ghost.layers import rule_for, samples_first
from megatron_greats.ghost.products import Use
from megatron_greats.ghost.reduction import Reduction, reduction_of


@contextlib.contextmanager
def frozen_parameters(parameters):
    """requires_grad=False on the trainable ones of `parameters` (e.g. model.parameters()) for the
    duration: the graph covers activations only."""
    frozen = [p for p in parameters if p.requires_grad]
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


class CaptureStore:
    def __init__(self, modules: list, captured: set, batch_dim: int, on_complete: Callable[[set], None]):
        self.modules, self.captured, self.batch_dim, self.on_complete = modules, captured, batch_dim, on_complete
        self.uses = defaultdict(list)       # param -> [Use]
        self.records = []                   # every Use of the capture, also those dropped from `uses`
        self.reductions = {}                # param -> Reduction
        self.roots = []                     # leaf outputs marked requires_grad (backward differentiates w.r.t. them)
        self.micro_batch = (0, None)        # (index, size) of the layer calls now being recorded
        self.sizes = {}                     # micro-batch index -> samples
        self.hooks = []                     # output-gradient hooks (they reference the uses: removed on close)

    @property
    def num_samples(self) -> int:
        return sum(self.sizes.values())

    def begin_micro_batch(self, index: int, size: int) -> None:
        """Following layer calls belong to micro-batch `index` (samples index*size ...)."""
        self.micro_batch = (index, size)

    def uses_of(self, param) -> list:
        """The parameter's uses still held ([] where none are, or they were freed)."""
        return self.uses.get(param, [])

    def used_parameters(self) -> list:
        """The parameters whose uses are still held, in the order of their first use."""
        return list(self.uses)

    def uses_by_parameter(self) -> dict:
        """param -> [Use], a copy: a caller may append uses to it (e.g. those of other pipeline stages)."""
        return {p: list(uses) for p, uses in self.uses.items()}

    def reduction(self, param) -> Reduction:
        """How the parameter's per-sample products sum over tensor-parallel ranks: as its layers reported,
        or, for a weight used only on other pipeline stages (tied), from megatron-core's mark."""
        return self.reductions[param] if param in self.reductions else reduction_of(param)

    def free(self, param) -> None:
        """Drop a parameter's operands from its Use records themselves: the output-gradient hooks of the
        capture reference the records until close(), so leaving the dict would not free them."""
        for use in self.uses.pop(param, []):
            use.inputs = use.grads = None

    def forget_uses(self) -> None:
        """Drop the per-parameter lists of uses; the records keep their tensors until close()."""
        self.uses.clear()

    @contextlib.contextmanager
    def recording(self, parameters: list):
        """Install the rules; `parameters` (the model's) are frozen for the duration."""
        handles = []
        try:
            with frozen_parameters(parameters):
                for module in self.modules:
                    handles += rule_for(module).install(module, self._report, self.batch_dim)
                yield
        finally:
            for h in handles:
                h.remove()

    def _report(self, operands: list, output: torch.Tensor, batch_dim: int):
        if not torch.is_grad_enabled() or _in_backward():
            return None
        operands = [op for op in operands if op.param in self.captured]
        if not operands:
            return None
        n = operands[0].inputs.shape[0]
        index, size = self.micro_batch
        size = n if size is None else size
        if size != n:
            raise ValueError(f"GhostRecorder: a layer saw {n} samples in micro-batch {index} of size {size}")
        if self.sizes.get(index, n) != n:  # e.g. a wrong batch_dim: samples and tokens swapped
            raise ValueError(f"GhostRecorder: a layer saw {n} samples, an earlier one {self.sizes[index]}; "
                             f"allowed: one sample count per micro-batch (check batch_dim={self.batch_dim})")
        self.sizes[index] = n
        samples = slice(index * n, (index + 1) * n)
        uses, unfinished = [], []
        for op in operands:
            use = Use(op.kind, op.rows, op.cols, samples, op.inputs)
            self.uses[op.param].append(use)
            self.records.append(use)
            self.reductions[op.param] = op.reduction
            uses.append(use)
            if op.finish is not None:
                unfinished.append((use, op.finish))
        if not output.requires_grad:
            output.requires_grad_(True)
            self.roots.append(output)
        params = {op.param for op in operands}

        def fill(grad):
            b = samples_first(grad.detach(), batch_dim)
            for use in uses:
                use.grads = b
            for use, finish in unfinished:
                if use.inputs is not None:  # None: already dropped (a capture closed early)
                    use.inputs = finish(use.inputs)
            unfinished.clear()  # once: a second gradient through the same output must not normalise again
            self.on_complete(params)
        self.hooks.append(output.register_hook(fill))
        return None

    def close(self) -> None:
        """Drop every operand now (the hooks on the recorded outputs would otherwise keep them alive)."""
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        self.roots.clear()
        for use in self.records:
            use.inputs = use.grads = None
        self.records.clear()
        self.uses.clear()

    def held_bytes(self) -> int:
        """Bytes of the distinct storages that the capture's Use records still reference."""
        storages = {}
        for use in self.records:
            for t in (use.inputs, use.grads):
                if t is not None:
                    storage = t.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    def backward_from(self, tensors: list, grad_tensors: list, inputs: Sequence[torch.Tensor] = ()) -> list:
        """Backward w.r.t. the recorded activations (and `inputs`), returning d/d(inputs)."""
        targets = list(inputs) + [r for r in self.roots if r.requires_grad]
        if not targets:
            return []
        grads = torch.autograd.grad(tensors, targets, grad_outputs=grad_tensors, allow_unused=True)
        return list(grads[:len(inputs)])
