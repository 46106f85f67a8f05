"""What GREATS picked on seed 1238 that Regular did not, and the scores at the time.

    python docs/results/seed1238/analyze.py docs/results/seed1238 [ARM ...]

Reads the folder's raw/<arm>/seed<S>/ (config.yaml, metrics.jsonl, selection.jsonl.gz) and the embedded
data (built by the quickstart, data_cache/), and prints per block of steps: test loss, train loss on
the picks, the domain shares of the picks, the preconditioner, eta, the alignment and interaction
terms, and how concentrated the target-domain picks are on few documents.
"""

from __future__ import annotations

import gzip
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))


def read(folder: Path, arm: str, seed: int):
    raw = folder / "raw" / arm / f"seed{seed}"
    metrics = [json.loads(line) for line in (raw / "metrics.jsonl").read_text().splitlines()]
    selections = [json.loads(line) for line in gzip.open(raw / "selection.jsonl.gz", "rt")]
    return raw, metrics, selections


def blocks(last: int, edges=(1, 6, 11, 21, 31, 41, 51, 76, 101, 151, 201, 301)):
    return [(lo, hi - 1) for lo, hi in zip(edges, edges[1:]) if lo <= last]


def main(argv) -> int:
    folder = Path(argv[0])
    arms = argv[1:] or ["regular", "greats"]
    summary = json.loads((folder / "summary.json").read_text())
    (seed,) = summary["seeds"]
    from megatron_greats.config import load_config
    from megatron_greats.training.trainer import load_data

    runs = {arm: read(folder, arm, seed) for arm in arms}
    cfg = load_config(str(runs[arms[0]][0] / "config.yaml"), [f"data.cache_dir={REPO / 'data_cache'}"])
    data = load_data(cfg, show_progress=False)
    train = data.train
    docs = train.indexed
    target = cfg.data.target_domain

    def doc_of(ids):
        starts = train._starts[np.asarray(ids)]
        return np.searchsorted(docs.doc_start, starts, side="right") - 1

    print(f"seed {seed}, target {target}; evaluations (test loss):")
    evals = {arm: {m["step"]: m["test/loss"] for m in runs[arm][1] if "test/loss" in m} for arm in arms}
    steps = sorted(set.intersection(*(set(e) for e in evals.values())))
    for step in steps[:8] + steps[8::5]:
        print(f"  step {step:4d}: " + "  ".join(f"{arm} {evals[arm][step]:.3f}" for arm in arms))

    last = max(r["step"] for r in runs[arms[0]][2])
    print("\nper block of steps: train loss on the picks; target share of picks; documents behind the target picks")
    for lo, hi in blocks(last):
        print(f"  steps {lo}-{hi}:")
        for arm in arms:
            _, metrics, selections = runs[arm]
            rows = [r for r in selections if lo <= r["step"] <= hi]
            loss = np.mean([m["train/loss"] for m in metrics if lo <= m["step"] <= hi and "train/loss" in m])
            picks = [i for r in rows for i in r["selected"]]
            domains = [d for r in rows for d in r["selected_domains"]]
            share = Counter(domains)
            tpicks = [i for i, d in zip(picks, domains) if d == target]
            tdocs = Counter(doc_of(tpicks).tolist()) if tpicks else Counter()
            line = (f"    {arm:>8}: train loss {loss:.3f}; picks " +
                    ", ".join(f"{d} {share[d] / len(domains):.0%}" for d in sorted(share)) +
                    f"; {target}: {len(tpicks)} windows from {len(tdocs)} documents"
                    + (f" (most: {tdocs.most_common(1)[0][1]} windows)" if tdocs else ""))
            eta = [r["eta"] for r in rows if r.get("eta") is not None]
            if eta:
                align = np.array([a for r in rows for a in (r.get("alignment_terms") or [])])
                gains = np.array([g for r in rows for g in r["gains"]])
                pre = Counter(str(r["preconditioner"]).split(" (")[0] for r in rows)
                inter = (align.sum() - gains.sum()) / np.abs(align).sum() if align.size else float("nan")
                line += (f"\n              eta {np.mean(eta):.2e}; preconditioner {dict(pre)}; alignment term mean "
                         f"{align.mean():+.2e} ({(align < 0).mean():.0%} of picks negative); "
                         f"interaction / |alignment| {inter:+.2f}")
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
