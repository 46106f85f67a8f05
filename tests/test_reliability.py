"""Reliability under real signals on real multi-process runs: SIGKILL + relaunch resumes exactly,
SIGTERM stops cleanly with a checkpoint, a dead rank does not leave the others hanging."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import PRETRAIN, REPO, child_env, free_port, read_metrics, tiny_overrides

CONFIG = str(REPO / "configs" / "tiny-cpu.yaml")
# DP=2 with ZeRO-1 (optimizer shards per rank), GREATS selection, dropout on (the RNG state must resume;
# dropout needs the two-pass update)
STEPS = 24  # enough that the kill after step 5 lands mid-run even on a fast, idle machine
RUN = [f"train.steps={STEPS}", "train.save_interval=2", "train.lr=0.01", "train.warmup_steps=0", "zero.stage=1",
       "selection.method=greats", "selection.candidates=8", "selection.val_batch=3", "model.dropout=0.1",
       "selection.update=two_pass"]


def torchrun(overrides, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
            str(PRETRAIN), "--config", CONFIG, *overrides]


def start(cmd, log):
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def workers(proc) -> list:
    return [p for p in psutil.Process(proc.pid).children(recursive=True)
            if any("pretrain.py" in part for part in p.cmdline())]


def wait_for_step(run_dir, step, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(m["step"] >= step for m in read_metrics(run_dir)) if (run_dir / "metrics.jsonl").exists() else False:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before step {step}")
        time.sleep(0.2)
    pytest.fail(f"no step {step} within {timeout} s")


def per_step(run_dir) -> tuple:
    losses = {m["step"]: m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m}
    picks = {}
    for line in (run_dir / "selection.jsonl").read_text().splitlines():
        r = json.loads(line)
        picks.setdefault(r["step"], []).append(r["selected"])
    return losses, picks


def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_sigkill_then_relaunch_resumes_exactly(data_cache, tmp_path):
    reference_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    ref = subprocess.run(torchrun(tiny_overrides(data_cache, reference_dir, *RUN)), cwd=REPO, env=child_env(),
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]

    cmd = torchrun(tiny_overrides(data_cache, run_dir, *RUN))
    proc = start(cmd, tmp_path / "first.log")
    try:
        wait_for_step(run_dir, 5, proc)
        os.kill(workers(proc)[-1].pid, signal.SIGKILL)  # one rank, mid-training
        proc.wait(timeout=120)
    finally:
        stop(proc)
    assert proc.returncode != 0
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest.startswith("step_") and 4 <= int(latest.split("_")[1]) < STEPS, latest
    # a folder a save was writing when a kill landed: never loaded, since 'latest' does not name it
    half = run_dir / "checkpoints" / "step_98"
    half.mkdir()
    (half / "mp_rank_00_model_states.pt").write_bytes(b"cut short")

    again = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed_from = int(latest.split("_")[1])
    assert f"this run started at step {resumed_from}" in again.stdout
    ref_losses, ref_picks = per_step(reference_dir)
    losses, picks = per_step(run_dir)
    assert sorted(ref_losses) == list(range(1, STEPS + 1))
    # lines after the checkpoint replaced, none twice
    assert [m["step"] for m in read_metrics(run_dir) if "train/loss" in m] == list(range(1, STEPS + 1))
    assert [json.loads(line)["step"] for line in (run_dir / "selection.jsonl").read_text().splitlines()] == \
        [json.loads(line)["step"] for line in (reference_dir / "selection.jsonl").read_text().splitlines()]
    for step in range(resumed_from + 1, STEPS + 1):
        assert picks[step] == ref_picks[step], step
        assert losses[step] == pytest.approx(ref_losses[step], rel=1e-6), step


def test_sigterm_finishes_the_step_saves_and_exits_zero(data_cache, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(data_cache, run_dir, *RUN, "train.steps=200", "train.save_interval=0")
    proc = start(torchrun(overrides), tmp_path / "run.log")
    try:
        wait_for_step(run_dir, 3, proc)
        os.kill(workers(proc)[0].pid, signal.SIGTERM)  # one rank gets it; every rank stops after the same step
        proc.wait(timeout=120)
    finally:
        stop(proc)
    log = (tmp_path / "run.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert "preempted" in log
    last = max(m["step"] for m in read_metrics(run_dir))
    assert 3 <= last < 200
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{last}"
    resumed = subprocess.run(torchrun([*overrides, f"train.steps={last + 1}"]), cwd=REPO, env=child_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"this run started at step {last}" in resumed.stdout


def test_a_dead_rank_ends_the_others_in_bounded_time(data_cache, tmp_path):
    """No launcher watching: two plain processes; SIGKILL one, the other must exit non-zero by itself."""
    run_dir, port = tmp_path / "run", free_port()
    overrides = tiny_overrides(data_cache, run_dir, *RUN, "train.steps=500", "train.save_interval=0",
                               "parallel.distributed_timeout_minutes=0.5")
    procs = []
    for rank in (0, 1):
        env = child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        with open(tmp_path / f"rank{rank}.log", "w") as out:
            procs.append(subprocess.Popen([sys.executable, str(PRETRAIN), "--config", CONFIG, *overrides], cwd=REPO,
                                          env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        wait_for_step(run_dir, 2, procs[0])
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        try:
            procs[0].wait(timeout=90)  # the timeout is 30 s; gloo usually notices the closed socket at once
        except subprocess.TimeoutExpired:
            pytest.fail("the surviving rank still runs 90 s after its peer died")
        assert procs[0].returncode != 0
        print(f"survivor exited {time.time() - killed_at:.1f} s after the kill")
    finally:
        for proc in procs:
            stop(proc)


def _module_weights(step_dir):
    import torch

    state = torch.load(step_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return state["module"]


@pytest.mark.parametrize("nproc, extra", [
    (1, ["selection.method=regular"]),                     # plain fp32 optimizer: the project's guard
    (2, ["selection.method=regular", "zero.stage=1"]),     # ZeRO-1: DeepSpeed's overflow check
    (1, ["selection.method=greats"]),                      # the Gram goes non-finite first
], ids=["regular-zero0", "regular-dp2-zero1", "greats"])
def test_non_finite_steps_are_skipped_then_the_run_stops_with_a_checkpoint(data_cache, tmp_path, nproc, extra):
    """lr=1e30 blows the weights up in step 1; every later step is NaN: skipped (no update, no
    selection), counted, and after train.max_skipped_steps=3 in a row the run stops with one error line."""
    run = ["train.lr=1e30", "train.warmup_steps=0", "train.steps=20", "train.max_skipped_steps=3",
           "train.save_interval=1", "selection.candidates=16", *extra]
    run_dir = tmp_path / "run"
    cmd = torchrun(tiny_overrides(data_cache, run_dir, *run), nproc) if nproc > 1 else \
        [sys.executable, str(PRETRAIN), "--config", CONFIG, *tiny_overrides(data_cache, run_dir, *run)]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == (1 if nproc > 1 else 3), proc.stderr[-3000:]  # torchrun reports failure as 1
    errors = [line for line in proc.stderr.splitlines() if "megatron_greats: error:" in line]
    assert errors and all("3 steps in a row (up to step 4)" in e and "step_4" in e for e in errors)
    metrics = {m["step"]: m for m in read_metrics(run_dir)}
    assert "train/step_skipped" not in metrics[1] and metrics[3]["train/skipped_steps"] == 2
    # DeepSpeed does not advance the LR schedule on a skipped step: train/lr (and GREATS' eta, the same
    # value) must stay at the optimizer's rate instead of following the step count
    rates = [metrics[s]["train/lr"] for s in (1, 2, 3)]
    assert rates[0] > rates[1] == rates[2], rates
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_4"
    if "selection.method=greats" in extra:
        assert [json.loads(line)["step"] for line in (run_dir / "selection.jsonl").read_text().splitlines()] == [1]
    # no update after step 1: the saved last good state is step 1's
    after_one, after_four = (_module_weights(run_dir / "checkpoints" / f"step_{s}") for s in (1, 4))
    assert after_one.keys() == after_four.keys()
    import torch

    for name in after_one:
        a, b = after_one[name], after_four[name]
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b, name


def test_eta_after_a_skipped_step_follows_the_optimizer(data_cache, tmp_path):
    """DP=2 with ZeRO-0 (the project's own non-finite guard around torch's AdamW). Step 2's update is
    made non-finite on rank 1 only (tests/workers/pretrain_with_a_bad_step.py; the data-parallel
    reduction carries it to both replicas): the step must be skipped (no weight moves), the LR schedule
    must not advance, and on the next selected step GREATS' eta
    (preconditioner=adam, eta=auto: lr (1 - beta1) / ((1 - beta1^t) k)) must use the optimizer's LR and
    its own step count t, not the trainer's step count. (The two-pass update's skip: the non-finite
    tests above.)"""
    import torch
    import yaml

    from megatron_greats.training.schedule import lr_at

    run_dir = tmp_path / "run"
    overrides = tiny_overrides(data_cache, run_dir, "train.steps=4", "train.save_interval=1", "train.lr=0.01",
                               "train.warmup_steps=0", "zero.stage=0", "selection.method=greats",
                               "selection.candidates=16", "selection.preconditioner=adam", "selection.eta=auto",
                               "selection.update=single_pass")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "tests" / "workers" / "pretrain_with_a_bad_step.py"), "2", "1", "--config", CONFIG, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2 skipped: NaN/Inf in the training loss or gradients" in proc.stderr
    t = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]
    metrics = {m["step"]: m for m in read_metrics(run_dir)}
    assert [s for s in metrics if "train/step_skipped" in metrics[s]] == [2]

    def scheduled(updates_applied):
        return lr_at(updates_applied, t["lr"], t["min_lr"], t["warmup_steps"], t["steps"])

    # the optimizer's LR at steps 1..4: the schedule advances only on the applied updates (steps 1, 3)
    rates = [metrics[s]["train/lr"] for s in (1, 2, 3, 4)]
    assert rates == pytest.approx([scheduled(0), scheduled(1), scheduled(1), scheduled(2)], rel=1e-12)
    assert scheduled(1) != pytest.approx(scheduled(2), rel=1e-3)  # a schedule that ran ahead would show
    records = {}
    for line in (run_dir / "selection.jsonl").read_text().splitlines():
        r = json.loads(line)
        records.setdefault(r["step"], []).append(r)
    assert sorted(records) == [1, 3, 4]  # the skipped step logs no selection
    k, beta1 = 4, t["beta1"]  # 8 samples over 2 replicas
    for s, lr, adam_t in ((3, scheduled(1), 2), (4, scheduled(2), 3)):  # Adam's t: updates applied, plus 1
        for r in records[s]:
            assert r["preconditioner"] == "adam" and len(r["selected"]) == k
            assert r["eta"] == pytest.approx(lr * (1 - beta1) / ((1 - beta1 ** adam_t) * k), rel=1e-12), (s, r["eta"])
    # no weight moved in step 2 on either replica; step 3 trained
    weights = [_module_weights(run_dir / "checkpoints" / f"step_{s}") for s in (1, 2, 3)]
    tensors = [n for n in weights[0] if torch.is_tensor(weights[0][n])]
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in tensors)
    assert not all(torch.equal(weights[1][n], weights[2][n]) for n in tensors)
