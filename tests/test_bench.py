"""The benchmarks run and report numbers (targets are reported by the commands, not asserted here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, child_env, free_port, tiny_overrides


def test_ghost_benchmark_prints_ratios_over_rounds(tmp_path):
    """One run of 3 rounds (each method, then the pairs, in processes of their own): every column is there,
    and the rounds are combined as medians of the per-round values."""
    out = tmp_path / "ghost.json"
    proc = subprocess.run([sys.executable, "-m", "megatron_greats.bench", "ghost", "--points", "4,16,32",
                           "--repeats", "1", "--min-seconds", "0.2", "--rounds", "3", "--json", str(out)], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "func/ghost" in proc.stdout
    (row,) = json.loads(out.read_text())
    # a call takes milliseconds here: timing goes on past --repeats until 0.2 s are spent
    assert all(1 < row[m]["calls"] <= 200 for m in ("ghost", "torch.func", "floor", "ordinary"))
    assert row["traces_agree"]  # both sides computed the same Gram
    assert row["speedup"] > 0 and row["memory_ratio"] > 0
    assert row["ghost"]["seconds"] > 0 and row["torch.func"]["peak_bytes"] > 0
    assert row["floor"]["seconds"] > 0 and row["speedup_ceiling"] > 0 and row["memory_ratio_ceiling"] > 0
    assert "func/floor" in proc.stdout and "ghost/step" in proc.stdout
    assert row["ordinary"]["seconds"] > 0 and row["ordinary"]["peak_bytes"] > 0
    # the time ratio: per round the median of pairs called in turn in one process, then the median of rounds
    ratios = row["ghost_over_ordinary_time_per_round"]
    assert len(ratios) == 3 and row["rounds"] == 3 and "(3 rounds)" in proc.stdout
    assert row["ghost_over_ordinary_time"] == sorted(ratios)[1]
    assert row["ghost_over_ordinary_time_range"] == [min(ratios), max(ratios)]
    assert all(1 < pairs <= 200 for pairs in row["ghost_over_ordinary_pairs_per_round"])
    # the separate processes' ratio beside it, also a median of rounds
    separate = row["ghost_over_ordinary_time_separate_per_round"]
    assert len(separate) == 3 and row["ghost_over_ordinary_time_separate"] == sorted(separate)[1]
    for method in ("ghost", "ordinary"):  # memory: the median of the rounds' peaks, not one draw
        peaks = row[method]["peak_bytes_per_round"]
        assert len(peaks) == 3 and row[method]["peak_bytes"] == sorted(peaks)[1]
    assert row["ghost_over_ordinary_memory"] == row["ghost"]["peak_bytes"] / row["ordinary"]["peak_bytes"]
    # the kernels alone, timed in the pairs' process: the floor is what they add to the ordinary step
    floors = row["ghost_over_ordinary_kernel_floor_per_round"]
    assert row["ghost_over_ordinary_kernel_floor"] == sorted(floors)[1]
    for kernels, floor in zip(row["kernels_per_round"], floors):
        assert kernels["weight_gradient"] > 0 and kernels["per_sample"] > 0 and kernels["gram"] >= 0
        extra = kernels["per_sample"] + kernels["gram"] - kernels["weight_gradient"]
        assert floor == pytest.approx(1 + extra / kernels["ordinary_step"], rel=1e-12)
    assert "kernel floor" in proc.stdout


def test_ghost_benchmark_with_no_minimum_time_makes_exactly_the_repeats():
    proc = subprocess.run([sys.executable, "-m", "megatron_greats.bench", "ghost", "--one", "ghost", "4", "16", "32",
                           "--repeats", "2", "--min-seconds", "0"], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["calls"] == 2
    bad = subprocess.run([sys.executable, "-m", "megatron_greats.bench", "ghost", "--rounds", "0"], cwd=REPO,
                         env=child_env(), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "megatron_greats: error: --repeats 3 / --rounds 0; allowed: >= 1"]
    bad = subprocess.run([sys.executable, "-m", "megatron_greats.bench", "ghost", "--min-seconds", "-1"], cwd=REPO,
                         env=child_env(), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "megatron_greats: error: --min-seconds -1.0; allowed: >= 0"]
    for command in (["ghost", "--one", "ghost", "4", "16", "32"], ["step", "--config", "configs/tiny-cpu.yaml"]):
        bad = subprocess.run([sys.executable, "-m", "megatron_greats.bench", *command], cwd=REPO,
                             env=child_env(MEGATRON_GREATS_GRAM_FORM="fastest"), capture_output=True, text=True,
                             timeout=120)
        assert bad.returncode == 2 and [line for line in bad.stderr.splitlines() if "error" in line] == [
            "megatron_greats: error: MEGATRON_GREATS_GRAM_FORM='fastest'; allowed: timed, whole, split"], command


def test_floor_is_the_activation_backward_and_touches_no_parameter():
    """The floor pass returns d(sum of losses)/d(token embedding output), as an ordinary backward does."""
    import torch

    from megatron_greats.bench.ghost import BenchTransformer, activation_pass, losses_of

    torch.manual_seed(0)
    model = BenchTransformer(16, 8, vocab=64).double()
    tokens = torch.randint(0, 64, (3, 9))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    got = activation_pass(model, inputs, labels)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    kept = []
    handle = model.embed.register_forward_hook(lambda m, a, out: kept.append(out) or out.retain_grad())
    losses_of(model(inputs), labels).sum().backward()
    handle.remove()
    torch.testing.assert_close(got, kept[0].grad, rtol=1e-10, atol=1e-12)


def test_kernel_parts_sum_every_linear_weight(monkeypatch):
    """Each nn.Linear weight counts once per layer: shapes shared by several layers are timed once and
    multiplied (a fixed time per kernel makes the sums countable), and the Gram is with_gram - per_sample."""
    import torch

    from megatron_greats.bench import ghost as bench_ghost

    seconds = {"weight_gradient": 1.0, "per_sample": 2.0, "with_gram": 5.0}
    calls = []

    def fixed(fn, acc, on_cpu, *args):
        calls.append(fn.__name__)
        fn(*args)  # the real kernels run (tiny shapes), so a broken one still fails here
        return seconds[fn.__name__]

    monkeypatch.setattr(bench_ghost, "_timed_call", fixed)
    model = bench_ghost.BenchTransformer(16, 8, layers=3, vocab=64)
    parts = bench_ghost.kernel_parts(model, 2, 8, repeats=2, acc=None, on_cpu=True)
    weights = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert weights == 3 * 4 + 1  # qkv, proj, up, down per layer; the tied head
    assert parts == {"weight_gradient": weights * 1.0, "per_sample": weights * 2.0, "gram": weights * 3.0}
    shapes = len({tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)})
    assert len(calls) == shapes * 3 * 2  # each distinct shape: three kernels, `repeats` timed calls each


def test_bad_point_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "megatron_greats.bench", "ghost", "--points", "4,16"],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "point '4,16' is not B,T,d" in proc.stderr


def _check_step_report(out, rounds=1):
    report = json.loads((out / "bench_step.json").read_text())
    assert set(report["variants"]) == {"regular_k", "regular_N", "regular_Nm", "greats", "single"}
    for variant in report["variants"].values():
        assert variant["median_s"] > 0 and variant["peak_bytes"] > 0 and len(variant["seconds"]) == 2 * rounds
    for value in report["ratios"].values():
        assert 0 < value < float("inf")
    for name in ("greats", "single"):  # two_pass and single_pass
        phases = report["variants"][name]["phases_median_s"]
        assert phases["score_forward"] > 0 and phases["score_backward"] > 0 and phases["training"] > 0
        assert phases["ghost_products"] > 0
        # the phases account for the step (the rest: drawing candidates, reading samples)
        assert 0.5 < sum(phases.values()) / report["variants"][name]["median_s"] <= 1.05
    markdown = (out / "bench_step.md").read_text()
    assert "single_pass / Regular(N)" in markdown and "two_pass / Regular(N)" in markdown
    assert "ghost_products" in markdown
    return report


def test_step_benchmark_one_process(data_cache, tmp_path):
    """Two rounds: each ratio is the median of the ratios taken within each round, recomputed here from
    the rounds' own medians and peaks."""
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "megatron_greats.bench", "step", "--config",
                           str(REPO / "configs" / "tiny-cpu.yaml"), "--warmup", "1", "--repeats", "2", "--rounds", "2",
                           "--out", str(out), *tiny_overrides(data_cache, tmp_path / "run")],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "single_pass / Regular(N)" in proc.stdout and "2 rounds" in proc.stdout
    report = _check_step_report(out, rounds=2)
    assert report["layout"] == "dp=1 tp=1 pp=1" and report["N"] == 2 * report["k"]
    first, second = report["per_round"]
    within = [r["single"]["median_s"] / r["regular_N"]["median_s"] for r in (first, second)]
    assert report["ratios"]["single_over_regular_N_time"] == pytest.approx(sum(within) / 2, rel=1e-12)
    assert report["ratios_range"]["single_over_regular_N_time"] == pytest.approx(sorted(within), rel=1e-12)
    # memory: the first round's, in the listed order (resident memory carries over between variants)
    assert report["ratios"]["greats_over_regular_k_memory"] == pytest.approx(
        first["greats"]["peak_bytes"] / first["regular_k"]["peak_bytes"], rel=1e-12)
    assert report["variants"]["single"]["median_s"] == pytest.approx(
        (first["single"]["median_s"] + second["single"]["median_s"]) / 2, rel=1e-12)


def test_step_benchmark_under_the_deepspeed_launcher_with_pipeline(data_cache, tmp_path):
    out = tmp_path / "bench"
    env = child_env()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module",
                           "megatron_greats.bench", "step", "--config", str(REPO / "configs" / "tiny-cpu.yaml"),
                           "--warmup", "1", "--repeats", "2", "--out", str(out),
                           *tiny_overrides(data_cache, tmp_path / "run", "parallel.pipeline=2")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    report = _check_step_report(out)
    assert report["layout"] == "dp=1 tp=1 pp=2"
    assert report["variants"]["greats"]["phases_median_s"]["score_exchange"] > 0


def test_step_benchmark_bad_input_is_one_line(data_cache, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megatron_greats.bench", "step", "--config",
                           str(REPO / "configs" / "tiny-cpu.yaml"), "--out", str(tmp_path / "bench"),
                           *tiny_overrides(data_cache, tmp_path / "run", "selection.candidates=3")],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("megatron_greats: error:")]
    assert len(errors) == 1 and "selection.candidates=3" in errors[0]
    assert not (tmp_path / "bench").exists()
    proc = subprocess.run([sys.executable, "-m", "megatron_greats.bench", "step", "--config",
                           str(REPO / "configs" / "tiny-cpu.yaml"), "--out", str(tmp_path / "bench"), "--rounds", "0",
                           *tiny_overrides(data_cache, tmp_path / "run")],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("megatron_greats: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "--rounds 0" in errors[0] and "rounds >= 1" in errors[0]
    assert not (tmp_path / "bench").exists()
