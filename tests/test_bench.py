"""The ghost benchmark runs and reports numbers (targets are reported by the command, not asserted here)."""

import json
import subprocess
import sys

from conftest import REPO, child_env


def test_ghost_benchmark_prints_ratios(tmp_path):
    out = tmp_path / "ghost.json"
    proc = subprocess.run([sys.executable, "-m", "megatron_greats.bench", "ghost", "--points", "4,16,32",
                           "--repeats", "1", "--json", str(out)], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "func/ghost" in proc.stdout
    (row,) = json.loads(out.read_text())
    assert row["traces_agree"]  # both sides computed the same Gram
    assert row["speedup"] > 0 and row["memory_ratio"] > 0
    assert row["ghost"]["seconds"] > 0 and row["torch.func"]["peak_bytes"] > 0


def test_bad_point_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "megatron_greats.bench", "ghost", "--points", "4,16"],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "point '4,16' is not B,T,d" in proc.stderr
