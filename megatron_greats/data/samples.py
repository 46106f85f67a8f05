"""Training samples: fixed windows over each domain's token stream, and their global order.

A sample is seq_len+1 tokens (inputs and shifted labels); consecutive windows overlap by one
token, like Megatron's GPTDataset. Windows stay inside one domain so each has one domain label.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .indexed import IndexedDocuments, open_indexed


class SampleSet:
    """Samples 0..len-1 of one indexed prefix; ids depend only on the data and seq_len."""

    def __init__(self, prefix: str | Path, seq_len: int):
        if seq_len < 1:
            raise ConfigError(f"seq_len {seq_len} is not allowed; use seq_len >= 1")
        self.seq_len = seq_len
        self.indexed: IndexedDocuments = open_indexed(prefix)
        docs = self.indexed
        self.domain_names: list[str] = docs.domain_names
        starts, domains = [], []
        self._streams = []  # (first token, length) of each domain's stream
        for d in range(len(self.domain_names)):
            mine = np.flatnonzero(docs.doc_domain == d)
            first = int(docs.doc_start[mine[0]]) if len(mine) else 0
            length = int(docs.doc_length[mine].sum())
            self._streams.append((first, length))
            count = max(0, (length - 1) // seq_len)  # last window must end inside the stream
            starts.append(first + seq_len * np.arange(count, dtype=np.int64))
            domains.append(np.full(count, d, dtype=np.int64))
        self._starts = np.concatenate(starts)
        self._domains = np.concatenate(domains)
        if len(self._starts) == 0:
            longest = max((length for _, length in self._streams), default=1) - 1
            raise DataError(f"seq_len {seq_len} is too long for {docs.prefix}: its longest domain "
                            f"stream is {longest + 1} tokens; allowed: model.seq_len <= {longest}")
        self._tokens = np.memmap(docs.bin_path, dtype=docs.dtype, mode="r")

    def __len__(self) -> int:
        return len(self._starts)

    def _ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            bad = ids[(ids < 0) | (ids >= len(self))][0]
            raise DataError(f"sample id {bad} is out of range 0..{len(self) - 1} for "
                            f"{self.indexed.prefix}")
        return ids

    def domains(self, ids) -> np.ndarray:
        """Domain index (into `domain_names`) of each sample id."""
        return self._domains[self._ids(ids)]

    def get(self, ids) -> torch.Tensor:
        """Token windows as a LongTensor [len(ids), seq_len + 1]."""
        starts = self._starts[self._ids(ids)]
        window = starts[:, None] + np.arange(self.seq_len + 1, dtype=np.int64)
        return torch.from_numpy(self._tokens[window].astype(np.int64))

    def stats(self) -> dict[str, dict[str, int]]:
        """Documents, tokens and samples per domain."""
        docs = self.indexed
        return {name: {"documents": int(np.sum(docs.doc_domain == d)),
                       "tokens": self._streams[d][1],
                       "samples": int(np.sum(self._domains == d))}
                for d, name in enumerate(self.domain_names)}


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of sample ids used in `epoch`."""
    if num_samples < 1 or seed < 0 or epoch < 0:
        raise ConfigError(f"epoch_order needs num_samples >= 1, seed >= 0, epoch >= 0; got "
                          f"{num_samples}, {seed}, {epoch}")
    return _cached_order(num_samples, seed, epoch)


@lru_cache(maxsize=2)  # a step reads one epoch, or two at an epoch boundary
def _cached_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    order.flags.writeable = False  # shared through the cache
    return order


class GlobalBatchSampler:
    """Sample ids of each training step: consecutive slices of the concatenated epoch orders.

    A pure function of (seed, step): resuming at any step needs no state, and the order does not
    depend on how many data-parallel replicas later split each global batch.
    """

    def __init__(self, num_samples: int, global_batch: int, seed: int):
        if num_samples < 1 or global_batch < 1 or seed < 0:
            raise ConfigError(f"GlobalBatchSampler needs num_samples >= 1, global_batch >= 1, "
                              f"seed >= 0; got {num_samples}, {global_batch}, {seed}")
        self.num_samples, self.global_batch, self.seed = num_samples, global_batch, seed

    def batch_ids(self, step: int) -> np.ndarray:
        if step < 0:
            raise ConfigError(f"step {step} is negative; steps count from 0")
        first = step * self.global_batch
        last = first + self.global_batch  # exclusive
        n = self.num_samples
        parts = [epoch_order(n, self.seed, epoch)[max(first - epoch * n, 0):last - epoch * n]
                 for epoch in range(first // n, (last - 1) // n + 1)]
        return np.concatenate(parts)
