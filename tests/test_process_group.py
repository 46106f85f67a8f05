"""Every process ends its process group through one helper, distributed_session: on every rank when the
block ends normally, and on a failing rank at once (no barrier), so that no process leaves gloo's threads
to interpreter shutdown (which can abort at exit) and no rank waits for one that has failed."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, child_env, free_port

WORKER = REPO / "tests" / "workers" / "session_ends.py"


def two_ranks(mode: str, tmp_path: Path) -> list:
    """Two plain processes (no launcher that would end the survivor for us): [(status, output, end time)]."""
    port, procs, logs = free_port(), [], []
    for rank in (0, 1):
        env = child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), SESSION_TIMEOUT_MINUTES="5")
        logs.append(tmp_path / f"{mode}{rank}.log")
        with open(logs[-1], "w") as out:
            procs.append(subprocess.Popen([sys.executable, str(WORKER), mode], cwd=REPO, env=env, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    ended = [None, None]
    deadline = time.time() + 240  # start-up on a loaded 2-core machine; the group's timeout is 5 minutes
    try:
        while None in ended and time.time() < deadline:
            for i, proc in enumerate(procs):
                if ended[i] is None and proc.poll() is not None:
                    ended[i] = time.time()
            time.sleep(0.1)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [(proc.returncode, log.read_text(), end) for proc, log, end in zip(procs, logs, ended)]


def ended_cleanly(output: str, rank: int) -> None:
    assert f"ENDED rank={rank} initialized=False model_parallel=False rank_env=True" in output, output[-3000:]
    assert "terminate called" not in output, output[-3000:]


def test_a_normal_end_ends_the_group_on_every_rank(tmp_path):
    ranks = two_ranks("ok", tmp_path)
    for rank, (status, output, _) in enumerate(ranks):
        assert status == 0, output[-3000:]
        assert f"INSIDE rank={rank} sum=2" in output
        ended_cleanly(output, rank)


@pytest.mark.parametrize("mode, status", [("raise", 1), ("exit", 5)])
def test_a_failing_rank_ends_its_group_and_the_other_fails_fast(tmp_path, mode, status):
    """Rank 1 fails inside the session while rank 0 waits for it in an all-reduce: rank 1 ends its group
    at once (no barrier: rank 0 will never get there) with its own exit status; rank 0 sees the closed
    connection and fails too, long before the group's 5-minute timeout."""
    (status0, output0, end0), (status1, output1, end1) = two_ranks(mode, tmp_path)
    assert end1 is not None and status1 == status, output1[-3000:]
    if mode == "raise":
        assert "rank 1 fails on purpose" in output1
    ended_cleanly(output1, 1)
    assert end0 is not None, "rank 0 still runs 4 minutes after the start: it waits for the failed rank"
    assert end0 - end1 < 60, f"rank 0 ended {end0 - end1:.0f} s after rank 1 failed"
    assert status0 == 1, output0[-3000:]
    ended_cleanly(output0, 0)


def test_in_one_process_the_session_ends_restores_the_environment_and_starts_again():
    """Single process (as the in-process test fixtures use it): the group and megatron-core's state end
    with the block, also when it raises, and the launcher variables it wrote are gone, so the next
    session picks a fresh port."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_greats.parallel.state import distributed_session, init_model_parallel

    if dist.is_initialized():
        pytest.skip("another test left a process group initialized")
    before = {var: os.environ.get(var) for var in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    with distributed_session():
        assert dist.is_initialized() and init_model_parallel(1, 1).world_size == 1
    assert not dist.is_initialized() and not ps.model_parallel_is_initialized()
    assert {var: os.environ.get(var) for var in before} == before
    with pytest.raises(SystemExit):
        with distributed_session():
            init_model_parallel(1, 1)
            raise SystemExit(3)
    assert not dist.is_initialized() and not ps.model_parallel_is_initialized()
    with distributed_session():  # a nested session leaves the outer one's group alone
        with distributed_session():
            pass
        assert dist.is_initialized()
    assert not dist.is_initialized()


# --------------------------------------------------------------- one way to start and end a group
STARTS_OR_ENDS = re.compile(r"(?<!def )\b(init_distributed|init_process_group|destroy_process_group|"
                            r"_abort_process_group|destroy_model_parallel)\s*\(")
ALLOWED = {
    "megatron_greats/parallel/state.py": "the helper itself",
    "tests/test_process_group.py": "this test",
    # a portless single-rank file:// group for _build_once_per_node, in the test process, with try/finally
    "tests/test_data.py": "its own single-rank group",
}


def python_files():
    for folder in ("megatron_greats", "launch", "tests"):
        yield from sorted((REPO / folder).rglob("*.py"))


def test_no_file_starts_or_ends_a_process_group_but_the_helper():
    found = [f"{path.relative_to(REPO)}:{i}: {line.strip()}"
             for path in python_files() if str(path.relative_to(REPO)) not in ALLOWED
             for i, line in enumerate(path.read_text().splitlines(), 1)
             if STARTS_OR_ENDS.search(line.split("#")[0])]
    assert not found, "start and end process groups with `with distributed_session():` only:\n" + "\n".join(found)
    state = (REPO / "megatron_greats" / "parallel" / "state.py").read_text()
    assert len(re.findall(r"(?<!def )(?<![\w.])init_distributed\(", state)) == 1  # in distributed_session only


def sessions_in(tree) -> int:
    """How many `with distributed_session(...)` statements a syntax tree holds."""
    return sum(isinstance(node, ast.With) and any(isinstance(item.context_expr, ast.Call) and
                                                  getattr(item.context_expr.func, "id", None) == "distributed_session"
                                                  for item in node.items)
               for node in ast.walk(tree))


def test_every_worker_and_entry_point_runs_in_a_session():
    """Every worker's __main__ block, and the package functions the entry points call (launch/pretrain.py:
    trainer.pretrain; `python -m megatron_greats.bench step` and `fidelity`: bench.step.run, bench.fidelity.run),
    hold the group in a session."""
    workers = [p for p in (REPO / "tests" / "workers").glob("*.py") if "__main__" in p.read_text()]
    assert len(workers) >= 7
    for path in workers:
        main_block = [node for node in ast.parse(path.read_text()).body
                      if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
        # launch/pretrain.py's main (trainer.pretrain, checked below) holds the session of the workers that
        # run the real command with a fault or a user's layer injected
        runs_the_command = main_block and "pretrain.main(" in ast.unparse(main_block[0])
        assert main_block and (sessions_in(main_block[0]) == 1 or runs_the_command), \
            f"{path.name}: main not run in distributed_session"
    for path, name in [("megatron_greats/training/trainer.py", "pretrain"), ("megatron_greats/bench/step.py", "run"),
                       ("megatron_greats/bench/fidelity.py", "run")]:
        function = next(node for node in ast.parse((REPO / path).read_text()).body
                        if isinstance(node, ast.FunctionDef) and node.name == name)
        assert sessions_in(function) == 1, f"{path}: {name}() does not enter distributed_session"


def test_a_drawn_port_is_free_and_below_the_ephemeral_range():
    """free_port() (every launcher in the suite, and a plain 1-process run's MASTER_PORT): a port that
    other processes' outgoing connections cannot take before the launcher binds it."""
    import socket

    from megatron_greats.parallel.state import _ephemeral_ports, free_port

    low, _ = _ephemeral_ports()
    ports = [free_port() for _ in range(20)]
    assert all(1024 <= p < low for p in ports) and len(set(ports)) > 1, ports
    for port in ports:
        with socket.socket() as s:
            s.bind(("", port))
