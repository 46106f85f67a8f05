"""launch/compare.sh --quick from the command line: every output exists and holds numbers."""

from __future__ import annotations

import gzip
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO, TINY_DATA, TINY_MODEL, child_env

# two methods and one arm keep the run short (every method trains in test_selection_training.py)
METHODS = ["regular", "greats"]
ARM = "greats-adam: selection.method=greats selection.preconditioner=adam selection.eta=auto"


def test_compare_quick_writes_summary_plots_and_tensorboard(data_cache, tmp_path):
    out = tmp_path / "compare"
    env = child_env(MEGATRON_GREATS_VENV=sys.prefix)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    command = ["bash", str(REPO / "launch" / "compare.sh"), "--quick", "--out", str(out),
               "--methods", ",".join(METHODS), "--arm", ARM,
               "--", f"data.cache_dir={data_cache}", *TINY_DATA, *TINY_MODEL]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    arms = METHODS + ["greats-adam"]
    assert list(summary["methods"]) == arms and summary["seeds"] == [1234, 1235]
    assert math.isfinite(summary["baseline_final_test"])
    for method, m in summary["methods"].items():
        assert m["steps"] == 4, method
        for key in ("final_val", "final_test", "wall_s", "target_share"):
            assert math.isfinite(m[key]) and m[key] >= 0, (method, key)
        assert len(m["per_seed_final_val"]) == 2 and len(m["test_gap_per_seed"]) == 2
    assert summary["methods"]["greats-adam"]["method"] == "greats"
    assert summary["methods"]["regular"]["test_gap_per_seed"] == [0.0, 0.0]
    # equal wall time, from the raw metrics: the last evaluation within regular's run on the same seed
    def evals(method, seed):
        lines = (out / "runs" / method / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()
        return [m for m in map(json.loads, lines) if "test/loss" in m]
    for method in arms:
        expected = []
        for seed in (1234, 1235):
            budget = evals("regular", seed)[-1]["train/elapsed_s"]
            within = [m["test/loss"] for m in evals(method, seed) if m["train/elapsed_s"] <= budget]
            expected.append(within[-1] if within else None)
        assert summary["methods"][method]["test_at_baseline_wall_per_seed"] == expected, method
    assert summary["methods"]["regular"]["test_at_baseline_wall_per_seed"] == \
        summary["methods"]["regular"]["per_seed_final_test"]
    # seed by seed: when each run first reaches the same seed's regular final test loss, over regular's time
    for method in arms:
        expected = []
        for seed in (1234, 1235):
            final, budget = evals("regular", seed)[-1]["test/loss"], evals("regular", seed)[-1]["train/elapsed_s"]
            hits = [m["train/elapsed_s"] for m in evals(method, seed) if m["test/loss"] <= final]
            expected.append(hits[0] / budget if hits else None)
        assert summary["methods"][method]["reach_ratio_per_seed"] == expected, method
    config = yaml.safe_load((out / "runs" / "greats-adam" / "seed1234" / "config.yaml").read_text())
    assert config["selection"]["preconditioner"] == "adam" and config["selection"]["eta"] == "auto"
    text = (out / "summary.md").read_text()
    assert all(f"| {method} |" in text for method in arms)
    for name in ("test_loss_vs_step.png", "test_loss_vs_wall_time.png", "val_loss_vs_step.png",
                 "selected_target_share_vs_step.png"):
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for method in arms:
        for seed in (1234, 1235):
            assert list((out / "runs" / method / f"seed{seed}" / "tensorboard").glob("events.out.tfevents.*"))
    # a second call reuses the finished runs and writes the same summary
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("finished before, kept") == 2 * len(arms)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert_results_folder_redoes_itself(out, summary, arms)


def assert_results_folder_redoes_itself(out, summary, arms):
    """The folder keeps each run's config, metrics and selections (raw/) and how it was made
    (provenance.json); the summary recomputed from raw/ alone, the run folders deleted, is the same, also
    from per-step digests of the selections (what a folder keeps when whole ones would be too large)."""
    from megatron_greats import compare

    provenance = json.loads((out / "provenance.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{40}", provenance["commit"]) and provenance["cpu"]
    assert provenance["command"].startswith("bash launch/compare.sh") and provenance["selection_kept"] == "whole"
    for arm in arms:
        for seed in summary["seeds"]:
            raw, run = out / "raw" / arm / f"seed{seed}", out / "runs" / arm / f"seed{seed}"
            assert (raw / "metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()
            assert yaml.safe_load((raw / "config.yaml").read_text())["seed"] == seed
            assert gzip.decompress((raw / "selection.jsonl.gz").read_bytes()).decode() == \
                (run / "selection.jsonl").read_text()
    limit = compare.RAW_SELECTION_LIMIT
    try:
        compare.RAW_SELECTION_LIMIT = 0
        assert compare.collect_raw(out, arms, summary["seeds"]) == "digest"
    finally:
        compare.RAW_SELECTION_LIMIT = limit
    assert not list((out / "raw").rglob("selection.jsonl.gz"))
    shutil.rmtree(out / "runs")
    assert json.loads(json.dumps(compare.resummarize(out))) == summary


def test_committed_results_folders_redo_their_summaries():
    """Every results folder under docs/results that keeps raw/ (those made since compare writes it):
    its summary.json recomputed from its raw files."""
    from megatron_greats import compare

    folders = [p.parent for p in (REPO / "docs" / "results").rglob("raw") if (p.parent / "summary.json").exists()]
    for folder in folders:
        committed = json.loads((folder / "summary.json").read_text())
        assert json.loads(json.dumps(compare.resummarize(folder))) == committed, folder


def test_every_relative_link_in_the_docs_resolves():
    """README.md and every markdown file under docs/: links and images to relative paths (anchors
    aside) point at files that exist."""
    link = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
    files = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    broken = []
    for path in files:
        for target in link.findall(path.read_text()):
            target = target.split("#", 1)[0]
            if not target or re.match(r"^[a-z]+:", target):
                continue  # an anchor in the same file, or a URL
            if not (path.parent / target).exists():
                broken.append(f"{path.relative_to(REPO)} -> {target}")
    assert not broken, broken


def test_compare_unknown_method_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megatron_greats.compare", "--methods", "regular,greedy",
                           "--out", str(tmp_path / "c")], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "unknown greedy" in proc.stderr and not (tmp_path / "c").exists()


def test_compare_bad_arm_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megatron_greats.compare", "--arm", "a/b: selection.eta=auto",
                           "--out", str(tmp_path / "c")], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "--arm 'a/b: selection.eta=auto'; allowed: 'NAME: key=value ...'" in proc.stderr
    assert not (tmp_path / "c").exists()


def _finished_run(run_dir: Path, method: str, final_val: float) -> None:
    """A finished run's files as the trainer writes them (config.yaml, metrics.jsonl, selection.jsonl):
    evaluations at steps 2 and 4, the last one `final_val` (NaN: the run diverged)."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"data": {"target_domain": "python_docs"},
                                                         "selection": {"method": method}}))
    evals = [{"step": 2, "val/loss": 6.0, "test/loss": 6.1, "train/elapsed_s": 2.0},
             {"step": 4, "val/loss": final_val, "test/loss": final_val + 0.1, "train/elapsed_s": 4.0}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in evals))
    picks = [{"step": s, "selected_domains": ["python_docs", "bible"]} for s in (1, 2, 3, 4)]
    (run_dir / "selection.jsonl").write_text("".join(json.dumps(r) + "\n" for r in picks))


def test_a_diverged_seed_is_not_left_out_of_the_mean(tmp_path):
    """One seed of greats ends with a NaN val loss: its mean ± std is NaN and the Markdown names the seed,
    instead of the mean of the seeds that did not diverge."""
    from megatron_greats.compare import collect_raw, markdown, run_dir_of, summarize

    finals = {("regular", 1234): 5.0, ("regular", 1235): 5.2, ("greats", 1234): 4.0, ("greats", 1235): math.nan}
    for (method, seed), final in finals.items():
        _finished_run(run_dir_of(tmp_path, method, seed), method, final)
    collect_raw(tmp_path, ["regular", "greats"], [1234, 1235])
    summary, _ = summarize(tmp_path, ["regular", "greats"], [1234, 1235])
    greats, regular = summary["methods"]["greats"], summary["methods"]["regular"]
    for key in ("final_val", "final_val_std", "final_test", "final_test_std"):
        assert math.isnan(greats[key]), (key, greats[key])
    assert greats["nan_seeds"]["final_val"] == [1235] and greats["nan_seeds"]["final_test"] == [1235]
    assert math.isclose(regular["final_val"], 5.1) and regular["nan_seeds"]["final_val"] == []
    row = next(line for line in markdown(summary, "cmd").splitlines() if line.startswith("| greats |"))
    assert row.count("nan (NaN in seed 1235)") == 2 and "4.0000" not in row and "4.1000" not in row, row


def test_side_by_side_puts_each_run_in_its_own_column(tmp_path):
    """The quickstart's table (report.side_by_side) on two runs that differ in every number: each column
    holds its own run's values, read here from that run's metrics.jsonl and selection.jsonl; only the
    evaluation steps both runs have are rows. (The same run twice could not show a column swapped or
    one run's values in both.)"""
    from megatron_greats.report import side_by_side

    runs = {"greats": ([2, 3, 4], [6.0, 5.5, 4.0], 4.0, ["python_docs"] * 3 + ["bible"]),
            "regular": ([2, 4], [6.2, 5.0], 3.25, ["python_docs", "bible", "bible", "shakespeare"])}
    for method, (steps, vals, seconds, domains) in runs.items():
        run_dir = tmp_path / method
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text(yaml.safe_dump({"data": {"target_domain": "python_docs"},
                                                             "selection": {"method": method}}))
        evals = [{"step": s, "val/loss": v, "test/loss": v + 0.25 + 0.01 * s,
                  "train/elapsed_s": seconds * s / steps[-1]} for s, v in zip(steps, vals)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in evals))
        picks = [{"step": s, "selected_domains": domains} for s in range(1, steps[-1] + 1)]
        (run_dir / "selection.jsonl").write_text("".join(json.dumps(r) + "\n" for r in picks))
    order = ["greats", "regular"]
    rows = side_by_side([tmp_path / m for m in order]).splitlines()
    assert rows[0].split() == order

    def cells(label):
        (row,) = [r for r in rows if r.startswith(label)]
        return row[len(label):].split()

    def metrics(method):
        return {m["step"]: m for m in map(json.loads, (tmp_path / method / "metrics.jsonl").read_text().splitlines())}

    for step in (2, 4):  # step 3: greats only
        assert cells(f"python_docs test loss at step {step}") == [f"{metrics(m)[step]['test/loss']:.4f}" for m in order]
    assert not [r for r in rows if "at step 3" in r]
    assert cells("python_docs val loss at step 4") == [f"{metrics(m)[4]['val/loss']:.4f}" for m in order]
    assert cells("wall time of training (s)") == [f"{max(x['train/elapsed_s'] for x in metrics(m).values()):.1f}"
                                                  for m in order]
    shares = [sum(d == "python_docs" for d in runs[m][3]) / len(runs[m][3]) for m in order]
    assert cells("python_docs share of trained samples") == [f"{s:.1%}" for s in shares]
    # By the clock: Regular's run ends at 3.25 s with test loss 5.29 (step 4). GREATS evaluates at 2, 3
    # and 4 s: its last evaluation within 3.25 s is step 3's, and it first reaches 5.29 at step 4 (4 s).
    regular_final = metrics("regular")[4]["test/loss"]
    assert cells("python_docs test loss at Regular's wall time") == [f"{metrics('greats')[3]['test/loss']:.4f}",
                                                                     f"{regular_final:.4f}"]
    assert metrics("greats")[3]["test/loss"] > regular_final >= metrics("greats")[4]["test/loss"]
    assert cells("wall time to reach Regular's final (s)") == ["4.0", "3.2"]  # 3.25 rounds to even



def test_the_recorded_command_reads_back_to_the_same_arguments():
    """provenance.json's command redoes the comparison: parsed again it gives the arguments it was recorded
    from, a non-default --config included (three crawl-like studies once recorded theirs without it)."""
    import shlex

    from megatron_greats.compare import argument_parser, recorded_command

    parser = argument_parser()
    for argv in ([], ["--config", "configs/tiny-cpu-crawl.yaml", "--out", "runs/x", "--seeds", "5", "--first-seed",
                      "1241", "--methods", "regular", "--arm", "w16: selection.method=greats selection.score_window=16",
                      "--arm", "e: selection.score_exclude=['*word*']", "--init-checkpoint", "runs/b/checkpoints/step_3",
                      "--reference-checkpoint", "runs/r/step_2", "--quick", "--", "train.steps=300"]):
        args = parser.parse_args(argv)
        command = shlex.split(recorded_command(args, parser))
        assert command[:2] == ["bash", "launch/compare.sh"]
        assert vars(parser.parse_args(command[2:])) == vars(args), command


def test_a_phased_run_is_named_by_both_its_methods(tmp_path):
    """report and compare name a run by its config.yaml: with phase gating 'maxloss:2+greats' (maxloss for
    the first 2 steps), so that it is not taken for a plain greats run; an early_method that takes no
    step, or a config written before phase gating, names selection.method alone."""
    from megatron_greats.report import read_run

    for name, selection, label in (
            ("phased", {"method": "greats", "early_method": "maxloss", "early_steps": 2}, "maxloss:2+greats"),
            ("unused", {"method": "greats", "early_method": "maxloss", "early_steps": 0}, "greats"),
            ("older", {"method": "greats"}, "greats")):
        _finished_run(tmp_path / name, "greats", 5.0)
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump({"data": {"target_domain": "python_docs"},
                                                                     "selection": selection}))
        assert read_run(tmp_path / name)["method"] == label, name
