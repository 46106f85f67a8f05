"""Side-by-side summary of finished runs (e.g. GREATS vs Regular) from their run_dir files.

    python -m megatron_greats.report RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import gzip
import json
import math
import sys
from pathlib import Path

import yaml


def read_jsonl(path: Path) -> list:
    """One JSON object per line; a path ending in .gz is read through gzip."""
    if not path.exists():
        return []
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def selection_file(run_dir: Path) -> Path:
    """A run folder's selection records: selection.jsonl, or in a results folder's raw copy
    selection.jsonl.gz (whole) or selection_digest.jsonl.gz (per step: the selected ids and domains)."""
    for name in ("selection.jsonl", "selection.jsonl.gz", "selection_digest.jsonl.gz"):
        if (run_dir / name).exists():
            return run_dir / name
    return run_dir / "selection.jsonl"


def method_label(selection: dict) -> str:
    """A run's method as config.yaml's selection section gives it: 'greats', or with phase gating
    'maxloss:2+greats' (maxloss took the first 2 steps, greats the rest). Runs written before phase
    gating have no early_method."""
    early, steps = selection.get("early_method"), selection.get("early_steps", 0)
    return f"{early}:{steps}+{selection['method']}" if early is not None and steps > 0 else selection["method"]


def read_run(run_dir) -> dict:
    """A finished run's curves from its run_dir files: evaluations, wall time, target-domain share of
    the trained samples per step and overall."""
    run_dir = Path(run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    evals = [m for m in metrics if "val/loss" in m]
    target = cfg["data"]["target_domain"]
    share = {}  # step -> [target samples, samples]
    for record in read_jsonl(selection_file(run_dir)):
        picked = record.get("selected_domains", [])
        counts = share.setdefault(record["step"], [0, 0])
        counts[0] += sum(d == target for d in picked)
        counts[1] += len(picked)
    picked_total = sum(c[1] for c in share.values())
    return {
        "method": method_label(cfg["selection"]), "target": target,
        "steps": max((m["step"] for m in metrics), default=0),
        "seconds": max((m.get("train/elapsed_s", 0.0) for m in metrics), default=0.0),
        "eval_steps": [m["step"] for m in evals], "val": [m["val/loss"] for m in evals],
        "test": [m["test/loss"] for m in evals], "eval_seconds": [m.get("train/elapsed_s", math.nan) for m in evals],
        "share_steps": sorted(share), "share": [share[s][0] / max(share[s][1], 1) for s in sorted(share)],
        "target_share": sum(c[0] for c in share.values()) / picked_total if picked_total else None,
    }


def test_within(run: dict, seconds: float):
    """Test loss at the run's last evaluation done within `seconds` of training wall time (None: none was)."""
    done = [t for t, at in zip(run["test"], run["eval_seconds"]) if at <= seconds]
    return done[-1] if done else None


def first_reach(run: dict, loss: float):
    """(step, wall seconds) of the run's first evaluation with test loss at or below `loss` (None: never)."""
    hit = next((i for i, v in enumerate(run["test"]) if v <= loss), None)
    return None if hit is None else (run["eval_steps"][hit], run["eval_seconds"][hit])


def summarize(run_dir, r: dict = None) -> dict:
    """r: the run's curves, where already read (read_run)."""
    r = read_run(run_dir) if r is None else r
    return {
        "run_dir": str(run_dir), "method": r["method"], "target_domain": r["target"], "steps": r["steps"],
        "evals": dict(zip(r["eval_steps"], zip(r["val"], r["test"]))),
        "val_loss": r["val"][-1] if r["val"] else None, "test_loss": r["test"][-1] if r["test"] else None,
        "seconds": r["seconds"], "target_share": r["target_share"],
    }


def side_by_side(run_dirs) -> str:
    """The quickstart's table: test loss at every evaluation both runs have, then (with a Regular run
    among them) each run's test loss at Regular's wall time and when it reaches Regular's final test
    loss, then val loss, wall time and the target-domain share."""
    from megatron_greats.selection.catalog import regular

    curves = [read_run(d) for d in run_dirs]
    runs = [summarize(d, c) for d, c in zip(run_dirs, curves)]  # each run's files read once
    names = [r["method"] for r in runs]
    width = max(12, *(len(n) for n in names))
    target = runs[0]["target_domain"]

    def row(label, values):
        return f"{label:<34}" + "".join(f"{v:>{width + 2}}" for v in values)

    def fmt(x, spec):
        return "n/a" if x is None else format(x, spec)

    # Test first: the selector never sees it. Val (chosen settings are judged on it) comes after.
    lines = [row("", names)]
    steps = sorted(set.intersection(*(set(r["evals"]) for r in runs)))
    for step in steps:
        lines.append(row(f"{target} test loss at step {step}", [fmt(r["evals"][step][1], ".4f") for r in runs]))
    base = next((c for c in curves if c["method"] == regular() and c["test"]), None)
    if base is not None:  # by the clock: what each run had reached when Regular's run ended
        wall, final = base["eval_seconds"][-1], base["test"][-1]
        lines.append(row(f"{target} test loss at Regular's wall time",
                         [fmt(test_within(c, wall), ".4f") for c in curves]))
        reached = [first_reach(c, final) for c in curves]
        lines.append(row("wall time to reach Regular's final (s)",
                         ["never" if r is None else f"{r[1]:.1f}" for r in reached]))
    lines.append(row(f"{target} val loss at step {steps[-1] if steps else '-'}",
                     [fmt(r["evals"][steps[-1]][0] if steps else None, ".4f") for r in runs]))
    lines.append(row("wall time of training (s)", [fmt(r["seconds"], ".1f") for r in runs]))
    lines.append(row(f"{target} share of trained samples", [fmt(r["target_share"], ".1%") for r in runs]))
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    missing = [d for d in argv if not (Path(d) / "config.yaml").exists()]
    if not argv or missing:
        print(f"megatron_greats: error: not a finished run folder: {', '.join(missing) or '(none given)'}; "
              "allowed: run_dir folders holding config.yaml and metrics.jsonl", file=sys.stderr)
        return 2
    print(side_by_side(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
