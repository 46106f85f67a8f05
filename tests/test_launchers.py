"""The multi-node launchers, run for real on one CPU machine (gloo, loopback).

Each launch trains the tiny model for 2 steps at data-parallel size 2 and must reproduce the losses of
one plain `python launch/pretrain.py` process (the global batch is fixed, so DP=2 is the same
computation split in two). The world size is checked too: two launchers that each trained alone
would also reproduce the losses.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, child_env, free_port, run_pretrain, tiny_overrides, train_losses

MULTINODE = REPO / "launch" / "multinode.sh"
MPIRUN = REPO / "launch" / "mpirun.sh"
SBATCH = REPO / "launch" / "slurm.sbatch"
CONFIG = str(REPO / "configs" / "tiny-cpu.yaml")
# A step-2 loss visibly different from step 1, so a wrong update shows.
TWO_STEPS = ["train.steps=2", "train.lr=0.01", "train.warmup_steps=0"]
TIMEOUT = 240


def launcher_env(**extra) -> dict:
    """child_env plus this interpreter's bin/ first on PATH (deepspeed, mpirun) and its venv for the scripts."""
    env = child_env(MEGATRON_GREATS_VENV=sys.prefix, **extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def start(cmd: list, log: Path, env: dict) -> subprocess.Popen:
    """A launcher in its own process group (so a timeout can end all its children), output to a file."""
    with open(log, "w") as out:
        return subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def finish(procs: list, logs: list) -> list:
    """Wait for all launchers; on timeout end their process groups. Returns the logs' text."""
    try:
        for proc in procs:
            proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
        pytest.fail("launch timed out:\n" + "\n".join(Path(log).read_text()[-3000:] for log in logs))
    texts = [Path(log).read_text() for log in logs]
    for proc, text in zip(procs, texts):
        assert proc.returncode == 0, f"exit status {proc.returncode}:\n{text[-4000:]}"
    return texts


def assert_same_training(run_dir: Path, reference: list, logs: list) -> None:
    assert any("dp=2 tp=1 pp=1 (world size 2)" in text for text in logs), "\n".join(t[-3000:] for t in logs)
    losses = train_losses(run_dir)
    assert len(losses) == 2, losses  # one logging rank wrote them
    np.testing.assert_allclose(losses, reference, rtol=1e-4)


@pytest.fixture(scope="module")
def reference(data_cache, tmp_path_factory) -> list:
    """Losses of one plain python process (DP=1) on the same config and global batch."""
    run_dir = tmp_path_factory.mktemp("reference")
    proc = run_pretrain(tiny_overrides(data_cache, run_dir, *TWO_STEPS), launcher="python")
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = train_losses(run_dir)
    assert len(losses) == 2 and abs(losses[0] - losses[1]) > 1e-3, losses
    return losses


# ---- argument handling: no training ---------------------------------------------------------------
@pytest.mark.parametrize("script, args, needle", [
    (MULTINODE, ["--bogus", "1", "--", "--config", CONFIG], "unknown option '--bogus'"),
    (MULTINODE, ["--nnodes", "two", "--", "--config", CONFIG], "--nnodes must be a non-negative integer"),
    (MULTINODE, ["--launcher", "ssh", "--", "--config", CONFIG], "--launcher must be pdsh or openmpi"),
    (MULTINODE, ["--node-rank", "0", "--nnodes", "2", "--", "--config", CONFIG], "needs --master-addr"),
    (MULTINODE, ["--hostfile", "/no/such/hosts", "--", "--config", CONFIG], "does not exist"),
    (MULTINODE, ["--nnodes", "2"], "no training arguments"),
    (MPIRUN, ["-n", "0", "--", "--config", CONFIG], "-n must be a positive integer"),
    (MPIRUN, ["-n", "2", "--np2", "--", "--config", CONFIG], "unknown option '--np2'"),
])
def test_bad_option_is_one_line(script, args, needle):
    proc = subprocess.run([str(script), *args], cwd=REPO, env=launcher_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_dry_run_prints_the_deepspeed_command(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("a slots=8\nb slots=8\n")
    train = ["--", "--config", CONFIG, "train.steps=3"]
    per_node = subprocess.run([str(MULTINODE), "--nnodes=2", "--node_rank", "1", "--gpus-per-node", "8",
                               "--master-addr", "10.0.0.1", "--dry-run", *train],
                              cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=60)
    assert per_node.returncode == 0, per_node.stderr
    for part in ["deepspeed --hostfile", "--no_ssh --node_rank 1 --master_addr 10.0.0.1 --num_nodes 2 --num_gpus 8",
                 "--master_port 29500", "launch/pretrain.py --config", "train.steps=3"]:
        assert part in per_node.stdout, per_node.stdout
    openmpi = subprocess.run([str(MULTINODE), "--hostfile", str(hosts), "--launcher", "openmpi", "--local-test",
                              "--dry-run", *train], cwd=REPO, env=launcher_env(), capture_output=True, text=True,
                             timeout=60)
    assert openmpi.returncode == 0, openmpi.stderr
    assert "--launcher openmpi --master_addr 127.0.0.1 --force_multi --no_ssh_check" in openmpi.stdout
    assert "--allow-run-as-root" in openmpi.stdout and "OMP_NUM_THREADS=1" in openmpi.stdout
    mpirun = subprocess.run([str(MPIRUN), "-n", "16", "--hostfile", str(hosts), "--dry-run", *train],
                            cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=60)
    assert mpirun.returncode == 0, mpirun.stderr
    assert "mpirun -n 16 --hostfile" in mpirun.stdout and "-x OMP_NUM_THREADS" in mpirun.stdout
    assert "--allow-run-as-root" not in mpirun.stdout  # only with --local-test


# ---- real launches -------------------------------------------------------------------------------
def test_two_nodes_without_ssh_on_loopback(reference, data_cache, tmp_path):
    """Two launchers on one machine act as two nodes: --no_ssh, node rank 0 and 1, one process each."""
    run_dir, port = tmp_path / "run", free_port()
    procs, logs = [], []
    for node_rank in (0, 1):
        log = tmp_path / f"node{node_rank}.log"
        cmd = [MULTINODE, "--nnodes", "2", "--node-rank", node_rank, "--gpus-per-node", "1",
               "--master-addr", "127.0.0.1", "--master-port", port,
               "--", "--config", CONFIG, *tiny_overrides(data_cache, run_dir, *TWO_STEPS)]
        procs.append(start(cmd, log, launcher_env()))
        logs.append(log)
    texts = finish(procs, logs)
    assert "--no_ssh --node_rank 1" in texts[1]  # the command it ran is printed
    assert_same_training(run_dir, reference, texts)


def test_mpirun_two_ranks(reference, data_cache, tmp_path):
    """Plain mpirun -n 2: no RANK/MASTER_* variables; DeepSpeed discovers ranks through mpi4py."""
    run_dir, log = tmp_path / "run", tmp_path / "mpirun.log"
    cmd = [MPIRUN, "-n", "2", "--local-test", "--", "--config", CONFIG,
           *tiny_overrides(data_cache, run_dir, *TWO_STEPS)]
    texts = finish([start(cmd, log, launcher_env(MASTER_PORT=str(free_port())))], [log])
    assert " -n 2 " in texts[0].splitlines()[0]
    assert_same_training(run_dir, reference, texts)


def test_deepspeed_openmpi_launcher_on_one_host(reference, data_cache, tmp_path):
    """deepspeed --launcher openmpi (through multinode.sh --local-test) with a one-host, two-slot hostfile."""
    hosts, run_dir, log = tmp_path / "hosts", tmp_path / "run", tmp_path / "openmpi.log"
    hosts.write_text("localhost slots=2\n")
    cmd = [MULTINODE, "--hostfile", hosts, "--launcher", "openmpi", "--local-test", "--master-port", str(free_port()),
           "--", "--config", CONFIG, *tiny_overrides(data_cache, run_dir, *TWO_STEPS)]
    texts = finish([start(cmd, log, launcher_env())], [log])
    assert "cmd = mpirun -n 2" in texts[0] and "-x OMP_NUM_THREADS=1" in texts[0]  # env reached the ranks
    assert_same_training(run_dir, reference, texts)


def _fake(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_slurm_sbatch_two_nodes(reference, data_cache, tmp_path):
    """launch/slurm.sbatch run by bash as Slurm would on 2 nodes: fake srun starts its task once per
    "node" (SLURM_NODEID 0 and 1, concurrently); fake scontrol names the nodes 127.0.0.1."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir / "scontrol", '#!/usr/bin/env bash\n[ "$1 $2" = "show hostnames" ] || exit 1\n'
                                'echo 127.0.0.1; echo 127.0.0.1\n')
    _fake(bin_dir / "srun", '#!/usr/bin/env bash\n'
                            'while [[ "$1" == --* ]]; do shift; done\n'  # srun's own options
                            'pids=()\n'
                            'for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do SLURM_NODEID=$i "$@" & pids+=($!); done\n'
                            'rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc\n')
    run_dir, log = tmp_path / "run", tmp_path / "slurm.log"
    env = launcher_env(SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="node[0-1]",
                       SLURM_JOB_ID="4242", GPUS_PER_NODE="1", MASTER_PORT=str(free_port()))
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    cmd = ["bash", SBATCH, CONFIG, *tiny_overrides(data_cache, run_dir, *TWO_STEPS)]
    texts = finish([start(cmd, log, env)], [log])
    assert "[slurm] 2 nodes x 1 GPUs, master 127.0.0.1" in texts[0]
    assert "--node_rank 0" in texts[0] and "--node_rank 1" in texts[0]
    assert_same_training(run_dir, reference, texts)
