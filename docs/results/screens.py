"""The screens on val, side by side: every arm of every screen folder, with the numbers the default is
chosen by (val only; test is never read here).

    python docs/results/screens.py docs/results/screen-cheap-clean docs/results/screen-cheap-clean-1240 ...

Per folder (one seed each) and arm, from raw/<arm>/seed<S>/metrics.jsonl: final val loss, val loss at
the same seed's Regular wall time (the arm's last evaluation within it), and the wall time to reach
Regular's final val loss over Regular's wall time ("never": it does not). Then, per arm, the mean over
the folders that ran it, the worst gap to Regular at equal steps, and in how many folders it ran.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def curves(raw: Path) -> dict:
    evals = [m for m in map(json.loads, (raw / "metrics.jsonl").read_text().splitlines()) if "val/loss" in m]
    return {"val": [m["val/loss"] for m in evals], "seconds": [m["train/elapsed_s"] for m in evals]}


def screen(folder: Path) -> dict:
    """arm -> (final val, val at Regular's wall time, reach ratio or None, gap to Regular at equal steps)."""
    (seed,) = json.loads((folder / "summary.json").read_text())["seeds"]
    runs = {arm.name: curves(arm / f"seed{seed}") for arm in sorted((folder / "raw").iterdir())
            if (arm / f"seed{seed}" / "metrics.jsonl").exists()}
    base = runs["regular"]
    wall, final = base["seconds"][-1], base["val"][-1]
    out = {}
    for arm, r in runs.items():
        within = [v for v, s in zip(r["val"], r["seconds"]) if s <= wall]
        reach = next((s for v, s in zip(r["val"], r["seconds"]) if v <= final), None)
        out[arm] = (r["val"][-1], within[-1] if within else None, None if reach is None else reach / wall,
                    r["val"][-1] - final)
    return out


def main(folders: list) -> int:
    screens = {Path(f).name: screen(Path(f)) for f in folders}
    arms = sorted({a for s in screens.values() for a in s}, key=lambda a: (a != "regular", a))
    print("| arm | " + " | ".join(screens) + " | mean final val | mean val at Regular's wall time | "
          "worst gap to Regular (equal steps) | screens |")
    print("|---" * (len(screens) + 5) + "|")
    for arm in arms:
        cells, finals, at_wall, gaps = [], [], [], []
        for s in screens.values():
            if arm not in s:
                cells.append("-")
                continue
            final, wall, reach, gap = s[arm]
            finals.append(final)
            gaps.append(gap)
            if wall is not None:
                at_wall.append(wall)
            reach_text = "never" if reach is None else f"{reach:.2f} x"
            cells.append(f"{final:.3f} / {'n/a' if wall is None else f'{wall:.3f}'} / {reach_text}")
        mean_wall = f"{statistics.fmean(at_wall):.3f}" if len(at_wall) == len(finals) else "n/a"
        print(f"| {arm} | " + " | ".join(cells) + f" | {statistics.fmean(finals):.3f} | {mean_wall} | "
              f"{max(gaps):+.3f} | {len(finals)} |")
    print("\nEach screen's cell: final val / val at Regular's wall time / wall time to reach Regular's final val "
          "(x Regular's).")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
