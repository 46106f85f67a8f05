"""Shared by the workers: a tensor-parallel shard joined into the full tensor on every rank."""

import torch
import torch.distributed as dist


def gather(shard: torch.Tensor, dim: int, tp: int) -> torch.Tensor:
    """The full tensor of a parameter split over `tp` ranks along `dim` (a detached copy)."""
    if tp == 1:
        return shard.detach().clone()
    parts = [torch.empty_like(shard) for _ in range(tp)]
    dist.all_gather(parts, shard.detach().contiguous())
    return torch.cat(parts, dim=dim)
