"""The benchmarks run and report numbers (targets are reported by the commands, not asserted here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, child_env, free_port, read_selections, run_pretrain, tiny_overrides
from megatron_greats.phases import GHOST_PRODUCTS, SCORE_BACKWARD, SCORE_EXCHANGE, SCORE_FORWARD, TRAINING

# a cheap variant valid at the tiny settings (seq 32, 2 layers): a quarter of the sequence, the top layer
TINY_CHEAP = "w8top1:selection.score_window=8,selection.score_layers=1"


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


def _check_step_report(out, rounds=1, cheap=()):
    report = json.loads((out / "bench_step.json").read_text())
    assert list(report["variants"]) == ["regular_k", "regular_N", "regular_Nm", "greats", "single", *cheap]
    assert list(report["cheap"]) == list(cheap)
    for name in cheap:  # a cheap variant against every base, time and memory
        for base in ("regular_k", "regular_N", "regular_Nm", "greats"):
            for what in ("time", "memory"):
                assert report["ratios"][f"{name}_over_{base}_{what}"] == pytest.approx(
                    report["variants"][name]["median_s" if what == "time" else "peak_bytes"]
                    / report["variants"][base]["median_s" if what == "time" else "peak_bytes"], rel=1e-12) \
                    if rounds == 1 else report["ratios"][f"{name}_over_{base}_{what}"] > 0
    for variant in report["variants"].values():
        assert variant["median_s"] > 0 and variant["peak_bytes"] > 0 and len(variant["seconds"]) == 2 * rounds
    for value in report["ratios"].values():
        assert 0 < value < float("inf")
    for name in ("greats", "single", *cheap):  # two_pass, single_pass and the cheap variants
        phases = report["variants"][name]["phases_median_s"]
        assert phases[SCORE_FORWARD] > 0 and phases[SCORE_BACKWARD] > 0 and phases[TRAINING] > 0
        # top layers only: a pipeline stage below them (maybe the slowest rank) forms no product
        assert phases[GHOST_PRODUCTS] > 0 or name in cheap and report["layout"] != "dp=1 tp=1 pp=1"
        # the phases account for the step (the rest: drawing candidates, reading samples)
        assert 0.5 < sum(phases.values()) / report["variants"][name]["median_s"] <= 1.05
    markdown = (out / "bench_step.md").read_text()
    assert "single_pass / Regular(N)" in markdown and "two_pass / Regular(N)" in markdown
    assert GHOST_PRODUCTS in markdown
    for name in cheap:
        assert f"| {name} | " in markdown and f"| {name}: GREATS " in markdown
    return report


def test_step_benchmark_one_process(data_cache, tmp_path):
    """Two rounds: each ratio is the median of the ratios taken within each round, recomputed here from
    the rounds' own medians and peaks."""
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "megatron_greats.bench", "step", "--config",
                           str(REPO / "configs" / "tiny-cpu.yaml"), "--warmup", "1", "--repeats", "2", "--rounds", "2",
                           "--out", str(out), "--cheap", TINY_CHEAP, *tiny_overrides(data_cache, tmp_path / "run")],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "single_pass / Regular(N)" in proc.stdout and "2 rounds" in proc.stdout
    report = _check_step_report(out, rounds=2, cheap=["w8top1"])
    # a window and top layers: the single_pass config falls back to two_pass; every candidate scored
    assert report["cheap"]["w8top1"] == {"overrides": ["selection.score_window=8", "selection.score_layers=1"],
                                         "update": "two_pass", "scored": report["N"]}
    within = [r["w8top1"]["median_s"] / r["regular_k"]["median_s"] for r in report["per_round"]]
    assert report["ratios"]["w8top1_over_regular_k_time"] == pytest.approx(sum(within) / 2, rel=1e-12)
    assert [r for r in report["per_round"][1]] == list(report["variants"])  # rounds reported in one order
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
                           "--warmup", "1", "--repeats", "2", "--out", str(out), "--cheap", TINY_CHEAP,
                           *tiny_overrides(data_cache, tmp_path / "run", "parallel.pipeline=2")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    report = _check_step_report(out, cheap=["w8top1"])
    assert report["layout"] == "dp=1 tp=1 pp=2"
    assert report["variants"]["greats"]["phases_median_s"][SCORE_EXCHANGE] > 0


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


def test_step_benchmark_bad_cheap_variant_is_one_line(data_cache, tmp_path):
    """A --cheap variant is checked with the other variants' configs, before anything is built or written."""
    for cheap, expected in (("w:selection.score_window=99", "--cheap 'w': selection.score_window=99 is longer than "
                                                           "model.seq_len=32"),
                            ("w:train.lr=1", "--cheap 'w:train.lr=1' sets 'train.lr=1'; allowed keys:"),
                            ("greats:selection.score_window=8", "the name 'greats' is taken")):
        proc = subprocess.run([sys.executable, "-m", "megatron_greats.bench", "step", "--config",
                               str(REPO / "configs" / "tiny-cpu.yaml"), "--out", str(tmp_path / "bench"),
                               "--cheap", cheap, *tiny_overrides(data_cache, tmp_path / "run")],
                              cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("megatron_greats: error:")]
        assert proc.returncode == 2 and len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
        assert not (tmp_path / "bench").exists()


def test_cheap_settings_parse_and_default_to_the_config():
    from megatron_greats.bench import CHEAP_KEYS, default_settings, parse_setting
    from megatron_greats.bench.fidelity import DEFAULT_KINDS
    from megatron_greats.bench.step import DEFAULT_CHEAP
    from megatron_greats.config import load_config
    from megatron_greats.errors import ConfigError

    # a comma inside a YAML list stays in its value; only ",key=" starts the next override
    assert parse_setting("w+x:selection.score_window=32, selection.score_exclude=['*word*','*positions*']",
                         CHEAP_KEYS, "--setting") == (
        "w+x", ["selection.score_window=32", "selection.score_exclude=['*word*','*positions*']"])
    for bad in ("w", "w:", ":selection.score_window=3", "w:score_window=3", "w:selection.candidates=3",
                "w:selection.score_window"):
        with pytest.raises(ConfigError):
            parse_setting(bad, CHEAP_KEYS, "--setting")
    tiny = load_config(str(REPO / "configs" / "tiny-cpu.yaml"), ["selection.candidates=32"])  # seq 128, 4 layers, k=16
    assert default_settings(tiny, 1, DEFAULT_KINDS) == {
        "window64": ["selection.score_window=64"], "window32": ["selection.score_window=32"],
        "window16": ["selection.score_window=16"],
        "window32random": ["selection.score_window=32", "selection.score_window_at=random"],
        "top1": ["selection.score_layers=1"], "top2": ["selection.score_layers=2"],
        "prefilter24": ["selection.prefilter=24"],
        "window32+top1": ["selection.score_window=32", "selection.score_layers=1"]}
    assert list(default_settings(tiny, 1, DEFAULT_CHEAP)) == ["window32+top1", "window16+top1", "prefilter24",
                                                              "window32"]
    # nothing to filter when N = k, and no top-2 of a 2-layer model: left out
    small = load_config(str(REPO / "configs" / "tiny-cpu.yaml"), ["selection.candidates=16", "model.num_layers=2"])
    assert "prefilter24" not in default_settings(small, 1, DEFAULT_KINDS)
    assert "top2" not in default_settings(small, 1, DEFAULT_KINDS)


def test_benchmarks_measure_one_method_of_a_phased_config():
    """bench step and bench fidelity time or compare one method's step: given a phased config, every
    variant and setting runs without phase gating (regular_k would otherwise be refused: its
    early_method=regular would be the method itself), and the benchmark notes what it left out."""
    from megatron_greats.bench.fidelity import settings_of
    from megatron_greats.bench.step import variant_overrides
    from megatron_greats.config import load_config

    config = str(REPO / "configs" / "tiny-cpu.yaml")
    phased = ["selection.early_method=regular", "selection.early_steps=2"]
    base = load_config(config, phased, world_size=1)
    assert base.phased
    for name, extra in variant_overrides(base, 1, {"w32": ["selection.score_window=32"]}).items():
        variant = load_config(config, [*phased, *extra], world_size=1)
        assert not variant.phased and not any("early" in n for n in variant.unread_selection_keys()), name
    exact, settings, notes = settings_of(config, phased, ["w32:selection.score_window=32"], 1)
    assert not exact.phased and not settings["w32"][1].phased
    assert notes == ["bench fidelity measures one method's step: the config's selection.early_method=regular for "
                     "its first selection.early_steps=2 steps is left out"]
    assert settings_of(config, [], ["w32:selection.score_window=32"], 1)[2] == []


def _naive_average_ranks(x):
    """Rank of each value by counting (1 + the values below it + half of its other ties): independent of sorting."""
    import numpy as np

    x = np.asarray(x, dtype=float)
    return np.array([1 + (x < v).sum() + ((x == v).sum() - 1) / 2 for v in x])


def test_fidelity_metrics_against_independent_values():
    """Spearman (ties: mean ranks) and Pearson against scipy where installed and against counting ranks and
    numpy's corrcoef; Jaccard and the off-diagonal by hand; the degenerate cases as documented."""
    import math

    import numpy as np

    from megatron_greats.bench.fidelity import average_ranks, jaccard, off_diagonal, pearson, spearman

    rng = np.random.default_rng(0)
    for trial in range(20):
        a = rng.normal(size=25)
        b = a + rng.normal(scale=0.2 + trial * 0.3, size=25)
        if trial % 2:  # ties on both sides
            a, b = np.round(a, 1), np.round(b, 0)
        np.testing.assert_allclose(average_ranks(a), _naive_average_ranks(a), rtol=0, atol=0)
        ra, rb = _naive_average_ranks(a), _naive_average_ranks(b)
        assert spearman(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1], abs=1e-12)
        assert pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)
        try:
            from scipy import stats
        except ImportError:
            continue
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
        assert pearson(a, b) == pytest.approx(stats.pearsonr(a, b).statistic, abs=1e-12)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1, abs=1e-15)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1, abs=1e-15)
    assert spearman([1, 2, 3], [1, 5, 2]) == pytest.approx(0.5)
    assert pearson([2, 2, 2], [2, 2, 2]) == 1.0 and math.isnan(pearson([2, 2, 2], [1, 2, 3]))
    assert math.isnan(spearman([1, float("nan"), 3], [1, 2, 3]))
    assert jaccard([3, 1, 2], [2, 3, 1]) == 1.0 and jaccard([0, 1, 2, 3], [2, 3, 4, 5]) == pytest.approx(2 / 6)
    assert jaccard([], []) == 1.0 and jaccard([1], [2]) == 0.0
    m = np.arange(16.0).reshape(4, 4)
    assert sorted(off_diagonal(m)) == sorted(m[i, j] for i in range(4) for j in range(4) if i != j)


def _fidelity(data_cache, tmp_path, *args, extra=()):
    overrides = tiny_overrides(data_cache, tmp_path / "run", "selection.method=greats", "selection.preconditioner=adam",
                               "selection.eta=auto", *extra)
    return subprocess.run([sys.executable, "-m", "megatron_greats.bench", "fidelity", "--config",
                           str(REPO / "configs" / "tiny-cpu.yaml"), *args, *overrides],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=400)


def test_fidelity_identical_setting_agrees_perfectly_and_a_cheap_one_does_not(data_cache, tmp_path):
    """Three steps, each measured (steps 1, 2 with Adam's preconditioning). A window of the whole sequence is
    exact scoring by another path: Spearman, Jaccard and Gram r are 1 at every step. A quarter window on the
    top layer is not. The reported numbers are recomputed from the raw scores with numpy/scipy, and the exact
    run's picks are those of launch/pretrain.py with the same config: the measurement does not disturb the
    trajectory it measures on."""
    import numpy as np

    out = tmp_path / "fidelity"
    proc = _fidelity(data_cache, tmp_path, "--steps", "3", "--every", "1", "--out", str(out), "--raw",
                     "--setting", "same:selection.score_window=32", "--setting", TINY_CHEAP,
                     "--setting", "pre12:selection.prefilter=12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "fidelity.json").read_text())
    assert report["measured_steps"] == [0, 1, 2] and report["update"] == "single_pass"
    assert report["N"] == 16 and report["k"] == 8
    settings = report["settings"]
    for record in settings["same"]["steps"]:
        assert record["spearman"] == pytest.approx(1, abs=1e-9) and record["jaccard"] == 1.0
        assert record["gram_r"] == pytest.approx(1, abs=1e-9)
    for record in settings["w8top1"]["steps"]:
        assert all(np.isfinite(record[m]) for m in ("spearman", "jaccard", "gram_r"))
        assert -1 <= record["spearman"] < 0.99 and -1 <= record["gram_r"] < 0.99 and 0 <= record["jaccard"] <= 1
    assert min(r["jaccard"] for r in settings["w8top1"]["steps"]) < 1
    assert settings["pre12"]["scored"] == 12 and settings["w8top1"]["scored"] == 16
    summary = settings["w8top1"]["summary"]["spearman"]
    values = [r["spearman"] for r in settings["w8top1"]["steps"]]
    assert summary["median"] == sorted(values)[1] and summary["worst"] == min(values)
    assert summary["worst_step"] == values.index(min(values))
    markdown = (out / "fidelity.md").read_text()
    assert "| same | score_window=32 | N=16 | 1.000 | 1.000 (0) | 1.000 | 1.000 (0) | 1.000 | 1.000 (0) |" in markdown
    assert "| pre12 | prefilter=12 | M=12 of N=16 |" in markdown and "over the M kept candidates" in markdown
    assert markdown in proc.stdout
    # the metrics again, from the raw scores
    try:
        from scipy.stats import spearmanr
    except ImportError:
        spearmanr = None
    raw = np.load(out / "fidelity_raw.npz")
    for name in ("same", "w8top1", "pre12"):
        for record in settings[name]["steps"]:
            step = record["step"]
            exact = {key: raw[f"step{step}/exact/{key}"] for key in ("val_alignment", "gram", "picked")}
            mine = {key: raw[f"step{step}/{name}/{key}"] for key in ("val_alignment", "gram", "picked", "kept")}
            kept = mine["kept"]
            assert len(kept) == settings[name]["scored"] and len(mine["picked"]) == 8
            assert set(mine["picked"]) <= set(kept)
            ranks = (_naive_average_ranks(exact["val_alignment"][kept]), _naive_average_ranks(mine["val_alignment"]))
            assert record["spearman"] == pytest.approx(np.corrcoef(*ranks)[0, 1], abs=1e-9)
            if spearmanr is not None:
                assert record["spearman"] == pytest.approx(
                    spearmanr(exact["val_alignment"][kept], mine["val_alignment"]).statistic, abs=1e-9)
            off = ~np.eye(len(kept), dtype=bool)
            assert record["gram_r"] == pytest.approx(np.corrcoef(exact["gram"][np.ix_(kept, kept)][off],
                                                                 mine["gram"][off])[0, 1], abs=1e-9)
            assert record["jaccard"] == len(set(exact["picked"]) & set(mine["picked"])) / len(
                set(exact["picked"]) | set(mine["picked"]))
    # the exact run's picks, step by step, are those of an ordinary run of the config
    run = tmp_path / "pretrain"
    proc = run_pretrain(tiny_overrides(data_cache, run, "selection.method=greats", "selection.preconditioner=adam",
                                       "selection.eta=auto"), launcher="python")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for record in read_selections(run)[:3]:
        positions = [record["candidates"].index(i) for i in record["selected"]]
        assert positions == raw[f"step{record['step'] - 1}/exact/picked"].tolist(), record["step"]


def test_fidelity_bad_input_is_one_line_and_writes_nothing(data_cache, tmp_path):
    out = tmp_path / "fidelity"
    for args, expected in (
            (["--setting", "w:selection.score_window=33"], "--setting 'w': selection.score_window=33 is longer"),
            (["--setting", "w:selection.val_batch=2"], "sets 'selection.val_batch=2'; allowed keys:"),
            (["--setting", "w:selection.score_window=8", "--setting", "w:selection.score_layers=1"],
             "the name 'w' is given twice"),
            (["--setting", "p:selection.prefilter=16"], "allowed: 8..15 (k <= M < N)"),
            (["--steps", "6"], "--steps 6 / --every 2; allowed: 1 <= steps <= train.steps (5"),
            (["--steps", "1", "--every", "2"], "measures no step"),
            (["--setting", "x:selection.score_exclude=['*wrod*']"], "--setting 'x': selection.score_exclude pattern "
                                                                     "'*wrod*' matches no parameter")):
        proc = _fidelity(data_cache, tmp_path, "--out", str(out), *args)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("megatron_greats: error:")]
        assert proc.returncode == 2 and len(errors) == 1 and expected in errors[0], (args, proc.stderr[-2000:])
        assert not out.exists()
    proc = _fidelity(data_cache, tmp_path, "--out", str(out), extra=["selection.method=maxloss"])
    assert proc.returncode == 2 and "selection.method=maxloss forms no Gram" in proc.stderr
