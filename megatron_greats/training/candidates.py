"""Which samples a replica looks at in a step: its candidates (or, for Regular, its k samples) and the
validation samples of the step. Pure functions of (seed, step, layout), no state to checkpoint."""

from __future__ import annotations

import numpy as np

from megatron_greats.parallel.state import Layout


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
        """m target-domain validation samples, rotating through the validation set."""
        return (step * self.val_batch + np.arange(self.val_batch)) % self.val_size
