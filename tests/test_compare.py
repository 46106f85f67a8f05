"""launch/compare.sh --quick from the command line: every output exists and holds numbers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from conftest import REPO, TINY_DATA, TINY_MODEL, child_env

METHODS = ["regular", "greats", "first_order", "gradnorm", "maxloss"]


def test_compare_quick_writes_summary_plots_and_tensorboard(data_cache, tmp_path):
    out = tmp_path / "compare"
    env = child_env(MEGATRON_GREATS_VENV=sys.prefix)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    proc = subprocess.run(["bash", str(REPO / "launch" / "compare.sh"), "--quick", "--out", str(out), "--",
                           f"data.cache_dir={data_cache}", *TINY_DATA, *TINY_MODEL],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == METHODS and summary["seeds"] == [1234, 1235]
    assert math.isfinite(summary["baseline_final_val"])
    for method, m in summary["methods"].items():
        assert m["steps"] == 4, method
        for key in ("final_val", "final_test", "wall_s", "target_share"):
            assert math.isfinite(m[key]) and m[key] >= 0, (method, key)
        assert len(m["per_seed_final_val"]) == 2
    text = (out / "summary.md").read_text()
    assert all(f"| {method} |" in text for method in METHODS)
    for name in ("val_loss_vs_step.png", "val_loss_vs_wall_time.png", "selected_target_share_vs_step.png"):
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for method in METHODS:
        for seed in (1234, 1235):
            assert list((out / "runs" / method / f"seed{seed}" / "tensorboard").glob("events.out.tfevents.*"))
    # a second call reuses the finished runs and writes the same summary
    again = subprocess.run(["bash", str(REPO / "launch" / "compare.sh"), "--quick", "--out", str(out), "--",
                            f"data.cache_dir={data_cache}", *TINY_DATA, *TINY_MODEL],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("finished before, kept") == 10
    assert json.loads((out / "summary.json").read_text()) == summary


def test_compare_unknown_method_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megatron_greats.compare", "--methods", "regular,greedy",
                           "--out", str(tmp_path / "c")], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "unknown greedy" in proc.stderr and not (tmp_path / "c").exists()
