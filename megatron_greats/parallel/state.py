"""Process start-up and the parallel layout: torch.distributed via DeepSpeed, then megatron-core's groups.

Ranks are laid out tensor-fastest, then data, then pipeline. That is both megatron-core's default order
("tp-cp-ep-dp-pp") and DeepSpeed's PipeModelDataParallelTopology(pipe, data, model), so the groups the
two libraries create for the same rank agree.
"""

from __future__ import annotations

import os
import random
import socket
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

_LAUNCHER_RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
# what set_single_process_env (or DeepSpeed's MPI discovery) may write: restored when a session ends
_SESSION_ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


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


def _ephemeral_ports() -> tuple:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A TCP port free now, for a rendezvous store bound a moment later. Drawn below the kernel's ephemeral
    range: a port from bind(0) is an ephemeral one, which the connections other processes open meanwhile
    (gloo opens many) can take before the store binds it (EADDRINUSE, seen on a loaded machine)."""
    low, _ = _ephemeral_ports()
    draw = random.Random(os.urandom(8))
    for _ in range(200):
        port = draw.randrange(10000, low) if low > 11000 else draw.randrange(1024, max(low, 1025))
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def set_single_process_env() -> None:
    """A plain `python launch/pretrain.py` (no launcher, no MPI): become rank 0 of a world of 1."""
    if any(v in os.environ for v in _LAUNCHER_RANK_VARS):
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


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
    """torch.distributed through DeepSpeed (env://, or MPI discovery through mpi4py under mpirun).
    Called by distributed_session only, which also ends the group: enter that instead."""
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


# The most a failing rank waits for its group to end. Ending it waits for this rank's pending
# collectives (gloo and NCCL alike); one that the other ranks never join would hold the failing rank
# until the group's timeout (30 minutes by default) instead of letting it exit.
FAILURE_TEARDOWN_SECONDS = 30.0


@contextmanager
def distributed_session(timeout_minutes: float = 30.0):
    """The one way a process starts and ends its process group:

        with distributed_session(timeout):
            ...  # init_model_parallel, collectives, training

    On entry: init_distributed. On exit the group is ended in this process, so that gloo's threads are
    not left to interpreter shutdown (which can abort: "terminate called without an active exception").
      normal end: a barrier (no rank tears down while another still talks to it), then the teardown;
      exception (SystemExit and KeyboardInterrupt too): no barrier (the other ranks may never get
          there); the teardown (NCCL: an abort), waited for at most FAILURE_TEARDOWN_SECONDS, and the
          exception goes on. A rank still waiting on this one then sees its connection closed and fails
          too, instead of waiting out the timeout.
    Teardown: the world group (every group created from it ends with it), then megatron-core's
    model-parallel state, then the launcher variables that set_single_process_env wrote are restored (a
    later session in the same process picks a fresh port). A group that existed before entry belongs to
    its creator: a nested session leaves it as it is.
    """
    if dist.is_initialized():
        yield
        return
    saved_env = {var: os.environ.get(var) for var in _SESSION_ENV_VARS}
    try:
        try:
            init_distributed(timeout_minutes)
            yield
        except BaseException:
            _end_after_failure()
            raise
        try:
            if dist.is_initialized():
                dist.barrier()
        finally:  # a failed barrier (a peer gone at the end) still ends the group, then raises
            _end_process_group(abort=False)
    finally:
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _end_process_group(abort: bool) -> None:
    try:
        if dist.is_initialized():
            # after a failure NCCL's communicators are aborted (destroying a failed one can hang);
            # torch documents abort for NCCL only: gloo's groups are destroyed
            nccl = abort and "nccl" in str(dist.get_backend()).lower()
            end = getattr(dist.distributed_c10d, "_abort_process_group", None) if nccl else None
            (end or dist.destroy_process_group)()
    finally:
        ps = sys.modules.get("megatron.core.parallel_state")  # not imported: nothing to reset
        if ps is not None:
            ps.destroy_model_parallel()  # its groups are gone with the world's: this resets its globals


def _end_after_failure() -> None:
    """The teardown after an exception, bounded in time; its own errors are dropped (the exception that
    ended the session is the one to report)."""
    ended = threading.Event()

    def end():
        try:
            _end_process_group(abort=True)
        except Exception:
            pass
        finally:
            ended.set()

    threading.Thread(target=end, name="end-process-group", daemon=True).start()
    if not ended.wait(FAILURE_TEARDOWN_SECONDS):
        print(f"megatron_greats: note: the process group did not end within {FAILURE_TEARDOWN_SECONDS:.0f} s "
              "(a collective still pending); exiting without ending it", file=sys.stderr, flush=True)


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
