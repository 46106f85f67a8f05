"""Which samples a replica looks at in a step: its candidates (or, for Regular, its k samples) and the
validation samples of the step, pure functions of (seed, step, layout), no state to checkpoint; and
how a replica's samples become micro-batches on the device."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_greats.parallel.state import Layout, device


class CandidateStream:
    def __init__(self, train_size: int, val_size: int, per_replica: int, val_batch: int, layout: Layout, seed: int):
        from megatron_greats.data import GlobalBatchSampler

        self.layout, self.per_replica, self.val_batch, self.val_size = layout, per_replica, val_batch, val_size
        # One global draw per step, sliced by replica: a run at data-parallel size 1 sees the same
        # samples whatever its tensor/pipeline layout.
        self.sampler = GlobalBatchSampler(train_size, per_replica * layout.data, seed)

    def candidates(self, step: int) -> np.ndarray:
        ids = self.sampler.batch_ids(step)
        start = self.layout.data_rank * self.per_replica
        return ids[start:start + self.per_replica]

    def validation(self, step: int) -> np.ndarray:
        """The step's m validation samples: ids in the selection split (target-domain documents held out
        of train, val and test), rotating through it."""
        return (step * self.val_batch + np.arange(self.val_batch)) % self.val_size


@dataclass
class ReplicaBatches:
    """Turns sample ids into this replica's micro-batches."""

    layout: Layout
    micro_batch: int

    def replica_ids(self, global_ids: np.ndarray) -> np.ndarray:
        """This replica's contiguous slice of a global batch."""
        per_replica = len(global_ids) // self.layout.data
        start = self.layout.data_rank * per_replica
        return global_ids[start:start + per_replica]

    def micro_batches(self, samples, ids: np.ndarray) -> list:
        """The samples `ids` as (inputs, labels) micro-batches on the device."""
        return micro_batches(samples.get(ids), self.micro_batch)


def micro_batches(tokens, size) -> list:
    """Token rows [n, seq + 1] as (inputs, labels) micro-batches of `size` rows (None: one) on the device."""
    tokens = tokens.to(device())
    return [(chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()) for chunk in tokens.split(size or len(tokens))]
