"""Worker (one process per rank, started by the test with RANK/WORLD_SIZE/MASTER_*): how a
distributed_session ends.

    python session_ends.py MODE          MODE: ok | raise | exit

Every rank enters the session, builds megatron-core's groups (tensor-parallel = world size) and
all-reduces once. Then
  ok     every rank leaves the block normally;
  raise  rank 1 raises RuntimeError while rank 0 waits in a second all-reduce that rank 1 never joins;
  exit   the same with sys.exit(5) on rank 1.
After the block (also when it raised) every rank prints
"ENDED rank=R initialized=B model_parallel=B rank_env=B"; rank_env: RANK is still set (it should be
only where the launcher set it).
"""

import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_greats.parallel.state import distributed_session, init_model_parallel, launcher_rank  # noqa: E402


def main(mode: str) -> None:
    rank = dist.get_rank()
    init_model_parallel(dist.get_world_size(), 1)
    x = torch.ones(1)
    dist.all_reduce(x)
    print(f"INSIDE rank={rank} sum={x.item():.0f}", flush=True)
    if mode != "ok":
        if rank == 1:
            if mode == "exit":
                sys.exit(5)
            raise RuntimeError("rank 1 fails on purpose")
        dist.all_reduce(x)  # rank 1 never comes


def report() -> None:
    from megatron.core import parallel_state as ps

    print(f"ENDED rank={launcher_rank()} initialized={dist.is_initialized()} "
          f"model_parallel={ps.model_parallel_is_initialized()} rank_env={'RANK' in os.environ}", flush=True)


if __name__ == "__main__":
    try:
        with distributed_session(timeout_minutes=float(os.environ.get("SESSION_TIMEOUT_MINUTES", "5"))):
            main(sys.argv[1])
    finally:
        report()
