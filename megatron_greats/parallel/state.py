"""Process start-up and the parallel layout: torch.distributed via DeepSpeed, then megatron-core's groups.

Ranks are laid out tensor-fastest, then data, then pipeline. That is both megatron-core's default order
("tp-cp-ep-dp-pp") and DeepSpeed's PipeModelDataParallelTopology(pipe, data, model), so the groups the
two libraries create for the same rank agree.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

_LAUNCHER_RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


@dataclass(frozen=True)
class Layout:
    """Where this process sits: global rank, and its coordinates along the three parallel axes."""

    rank: int
    world_size: int
    local_rank: int
    tensor: int
    pipeline: int
    data: int
    tensor_rank: int
    pipeline_rank: int
    data_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pipeline_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pipeline_rank == self.pipeline - 1

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_single_process_env() -> None:
    """A plain `python launch/pretrain.py` (no launcher, no MPI): become rank 0 of a world of 1."""
    if any(v in os.environ for v in _LAUNCHER_RANK_VARS):
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def launcher_world_size() -> int:
    """World size as the launcher announced it, read before any process group exists (for validation)."""
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def launcher_rank() -> int:
    """Global rank as the launcher announced it (torchrun/deepspeed or MPI), before any process group exists."""
    for var in _LAUNCHER_RANK_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def init_distributed(timeout_minutes: float = 30.0) -> None:
    """torch.distributed through DeepSpeed (env://, or MPI discovery through mpi4py under mpirun)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from megatron_greats.parallel import cpu_runtime, cpu_shims

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        cpu_shims.apply()
        cpu_runtime.apply()
    set_single_process_env()
    if not dist.is_initialized():
        # distributed_port: under mpirun DeepSpeed's MPI discovery would otherwise always take 29500
        deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(),
                                   auto_mpi_discovery=True, timeout=timedelta(minutes=timeout_minutes),
                                   distributed_port=int(os.environ.get("MASTER_PORT", "29500")))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)


def init_model_parallel(tensor: int, pipeline: int, timeout_minutes: float = 30.0) -> Layout:
    """Create megatron-core's process groups for the layout and return this rank's coordinates."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline,
                                 distributed_timeout_minutes=timeout_minutes)  # timedelta(minutes=): a float works
    world = dist.get_world_size()
    return Layout(
        rank=dist.get_rank(), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        tensor=tensor, pipeline=pipeline, data=world // (tensor * pipeline),
        tensor_rank=ps.get_tensor_model_parallel_rank(), pipeline_rank=ps.get_pipeline_model_parallel_rank(),
        data_rank=ps.get_data_parallel_rank(),
    )


class MegatronMpu:
    """The `mpu` object DeepSpeed expects (model-parallel = tensor x pipeline), over megatron-core's groups.

    Only the names listed are exposed: DeepSpeed probes optional ones (sequence parallel, ...) with
    hasattr, and must not find megatron-core functions of other meanings.
    """

    _DELEGATED = (
        "get_model_parallel_group", "get_data_parallel_group", "get_data_parallel_rank",
        "get_data_parallel_world_size", "get_tensor_model_parallel_group", "get_tensor_model_parallel_rank",
        "get_tensor_model_parallel_world_size", "get_tensor_model_parallel_src_rank",
        "get_pipeline_model_parallel_group", "get_pipeline_model_parallel_rank",
        "get_pipeline_model_parallel_world_size",
    )

    def __init__(self):
        from megatron.core import parallel_state as ps

        self._ps = ps

    def __getattr__(self, name):
        if name in MegatronMpu._DELEGATED:
            return getattr(self._ps, name)
        raise AttributeError(name)

    # megatron-core has no rank/size of the model-parallel group itself
    def get_model_parallel_rank(self):
        return dist.get_rank(group=self._ps.get_model_parallel_group())

    def get_model_parallel_world_size(self):
        return dist.get_world_size(group=self._ps.get_model_parallel_group())


def any_rank(flag: bool, device) -> bool:
    """True on every rank when it is True on any rank (one MAX all-reduce over the world)."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())
