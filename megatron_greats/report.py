"""Side-by-side summary of finished runs (e.g. GREATS vs Regular) from their run_dir files.

    python -m megatron_greats.report RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml


def _jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def summarize(run_dir) -> dict:
    run_dir = Path(run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    metrics = _jsonl(run_dir / "metrics.jsonl")
    evals = {m["step"]: (m["val/loss"], m["test/loss"]) for m in metrics if "val/loss" in m}
    target = cfg["data"]["target_domain"]
    picked = [d for r in _jsonl(run_dir / "selection.jsonl") for d in r.get("selected_domains", [])]
    last_step = max(evals) if evals else None
    return {
        "run_dir": str(run_dir), "method": cfg["selection"]["method"], "target_domain": target,
        "steps": max((m["step"] for m in metrics), default=0), "evals": evals,
        "val_loss": evals[last_step][0] if evals else None, "test_loss": evals[last_step][1] if evals else None,
        "seconds": max((m.get("train/elapsed_s", 0.0) for m in metrics), default=0.0),
        "target_share": (sum(d == target for d in picked) / len(picked)) if picked else None,
    }


def side_by_side(run_dirs) -> str:
    runs = [summarize(d) for d in run_dirs]
    names = [r["method"] for r in runs]
    width = max(12, *(len(n) for n in names))
    target = runs[0]["target_domain"]

    def row(label, values):
        return f"{label:<34}" + "".join(f"{v:>{width + 2}}" for v in values)

    def fmt(x, spec):
        return "n/a" if x is None else format(x, spec)

    lines = [row("", names)]
    steps = sorted(set.intersection(*(set(r["evals"]) for r in runs)))
    for step in steps:
        lines.append(row(f"{target} val loss at step {step}", [fmt(r["evals"][step][0], ".4f") for r in runs]))
    lines.append(row(f"{target} test loss at step {steps[-1] if steps else '-'}",
                     [fmt(r["evals"][steps[-1]][1] if steps else None, ".4f") for r in runs]))
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
