"""Selection methods and variants side by side: several seeds each, equal update steps, k and LR
schedule, one output folder.

    python -m megatron_greats.compare --out DIR [--quick] [--seeds S] [--methods m1,m2,...]
                                      [--arm "NAME: key=value key=value" ...] [--init-checkpoint STEP_DIR]
                                      [--reference-checkpoint STEP_DIR] [-- key=value ...]

An arm is a method (named by it) or a variant given with --arm, e.g.
    --arm "greats-adam: selection.preconditioner=adam selection.eta=auto"
Runs launch/pretrain.py once per (arm, seed), one after the other (so wall times compare), into
DIR/runs/<arm>/seed<S>; a finished run is not run again. --init-checkpoint starts every run from the
weights of a checkpoint (continued pretraining: fresh optimizer and schedule). Then writes
DIR/summary.md and DIR/summary.json, PNG plots in DIR/plots, and what is needed to redo or check them:
DIR/raw/<arm>/seed<S>/ (each run's resolved config.yaml, metrics.jsonl and selections, from which the
summary is computed) and DIR/provenance.json (command, commit, CPU, versions). The numbers that decide are on the
test split: final test loss, wins against Regular seed by seed, and the steps and wall time to reach
Regular's final test loss; the val split is beside them (choose variants on val, report on test).
TensorBoard: tensorboard --logdir DIR/runs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from megatron_greats.report import first_reach, read_jsonl, read_run, test_within
from megatron_greats.selection.catalog import CATALOG, methods_needing_a_reference, regular

REPO = Path(__file__).resolve().parent.parent
DEFAULT_METHODS = ("regular", "greats", "first_order", "gradnorm", "maxloss")
DEFAULT_CONFIG = "configs/tiny-cpu.yaml"
# Long enough that Regular's test curve has flattened on the embedded default (600 steps).
DEFAULT_TRAIN = ["train.steps=600", "train.warmup_steps=30", "train.eval_interval=50", "train.save_interval=600"]
QUICK_TRAIN = ["train.steps=4", "train.warmup_steps=0", "train.eval_interval=2", "train.save_interval=4",
               "train.eval_batches=1"]
PLOTS = ("test_loss_vs_step.png", "test_loss_vs_wall_time.png", "val_loss_vs_step.png",
         "selected_target_share_vs_step.png")
ARM_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def parse_arm(text: str) -> tuple:
    """'NAME: key=value key=value' -> (NAME, [key=value, ...])."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not ARM_NAME.match(name) or not rest.strip():
        raise ValueError(f"--arm {text!r}; allowed: 'NAME: key=value ...' with NAME of letters, digits, _ . -")
    return name, shlex.split(rest)


# ---- running ------------------------------------------------------------------------------------------
def run_dir_of(out: Path, method: str, seed: int) -> Path:
    return out / "runs" / method / f"seed{seed}"


def raw_dir_of(out: Path, method: str, seed: int) -> Path:
    """The results folder's own copy of what a run's numbers come from (committed with the summary)."""
    return out / "raw" / method / f"seed{seed}"


# A results folder keeps the whole selection.jsonl of every run (gzip) while they take less than this
# together; beyond it, a per-step digest (the selected ids and domains, what the summary reads).
RAW_SELECTION_LIMIT = 20 * 2 ** 20
DIGEST_KEYS = ("step", "replica", "method", "selected", "selected_domains", "score_window")


def _gzip(records_text: str) -> bytes:
    return gzip.compress(records_text.encode(), mtime=0)  # the same bytes for the same records


def collect_raw(out: Path, arms: list, seeds: list) -> str:
    """Copy every run's config.yaml and metrics.jsonl into out/raw/<arm>/seed<S>/, with its
    selection.jsonl gzipped whole, or digested where the whole ones would pass RAW_SELECTION_LIMIT.
    Runs whose run folder is gone (a committed results folder) keep their raw copy. Returns what was kept:
    "whole" or "digest"."""
    present = [(a, s) for a in arms for s in seeds if (run_dir_of(out, a, s) / "metrics.jsonl").exists()]
    whole = {(a, s): _gzip((run_dir_of(out, a, s) / "selection.jsonl").read_text()) for a, s in present
             if (run_dir_of(out, a, s) / "selection.jsonl").exists()}
    kind = "whole" if sum(map(len, whole.values())) <= RAW_SELECTION_LIMIT else "digest"
    for arm, seed in present:
        run_dir, raw = run_dir_of(out, arm, seed), raw_dir_of(out, arm, seed)
        raw.mkdir(parents=True, exist_ok=True)
        for name in ("config.yaml", "metrics.jsonl"):
            shutil.copyfile(run_dir / name, raw / name)
        for stale in ("selection.jsonl.gz", "selection_digest.jsonl.gz"):
            (raw / stale).unlink(missing_ok=True)
        if (arm, seed) not in whole:
            continue
        if kind == "whole":
            (raw / "selection.jsonl.gz").write_bytes(whole[arm, seed])
        else:
            digest = [{k: r.get(k) for k in DIGEST_KEYS} for r in read_jsonl(run_dir / "selection.jsonl")]
            (raw / "selection_digest.jsonl.gz").write_bytes(_gzip("".join(json.dumps(r) + "\n" for r in digest)))
    return kind


def provenance(command: str) -> dict:
    """What a reader needs to redo a results folder: the command, the code's commit, the machine."""
    import platform

    def git(*args):
        proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else None

    cpu = platform.processor() or None
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for package in ("torch", "deepspeed", "megatron-core"):
        try:
            from importlib.metadata import version
            versions[package] = version(package)
        except Exception:  # not installed: left out
            pass
    return {"command": command, "commit": git("rev-parse", "HEAD"),
            "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no")),
            "cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "packages": versions,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def is_finished(run_dir: Path, steps: int) -> bool:
    return any(m.get("step") == steps and "val/loss" in m for m in read_jsonl(run_dir / "metrics.jsonl"))


def train_all(out: Path, config: str, arms: dict, seeds: list, overrides: list, steps: int) -> None:
    """arms: name -> its own overrides (after the common ones)."""
    jobs = [(a, s) for a in arms for s in seeds]
    started = time.time()
    for index, (method, seed) in enumerate(jobs, 1):
        run_dir = run_dir_of(out, method, seed)
        if is_finished(run_dir, steps):
            print(f"[compare] {index}/{len(jobs)} {method} seed {seed}: finished before, kept", flush=True)
            continue
        print(f"[compare] {index}/{len(jobs)} {method} seed {seed} -> {run_dir} "
              f"({time.time() - started:.0f} s so far)", flush=True)
        cmd = [sys.executable, str(REPO / "launch" / "pretrain.py"), "--config", config, *overrides, *arms[method],
               f"run_dir={run_dir}", f"seed={seed}", "train.resume=true", "train.progress=false"]
        proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            errors = [line for line in proc.stderr.splitlines() if line.startswith("megatron_greats: error:")]
            raise SystemExit(errors[0] if errors else f"megatron_greats: error: {method} seed {seed} failed:\n"
                             f"{proc.stderr[-3000:]}")


# ---- summary -------------------------------------------------------------------------------------------
def _mean_std(values: list) -> tuple:
    """Mean and standard deviation over seeds. None (a run that never reaches the target) is left out
    (those are counted apart); a NaN (a seed that diverged) makes both NaN, so it is never hidden."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    if any(math.isnan(v) for v in values):
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _nan_seeds(per_seed: dict, value) -> list:
    """The seeds whose value(run) is NaN."""
    return [seed for seed, r in per_seed.items() if value(r) is not None and math.isnan(value(r))]


def summarize(out: Path, methods: list, seeds: list) -> tuple:
    """(summary, per-arm per-seed curves) from the results folder's raw copies (collect_raw); methods:
    the arm names."""
    runs = {m: {s: read_run(raw_dir_of(out, m, s)) for s in seeds} for m in methods}
    baseline = regular() if regular() in runs else methods[0]
    target_test, _ = _mean_std([r["test"][-1] for r in runs[baseline].values()])
    summary = {"target_domain": next(iter(runs[baseline].values()))["target"], "seeds": seeds,
               "baseline": baseline, "baseline_final_test": target_test, "methods": {}}
    for method, per_seed in runs.items():
        reach_steps, reach_seconds, reach_ratios = [], [], []
        for seed, r in per_seed.items():
            hit = first_reach(r, target_test)
            reach_steps.append(None if hit is None else hit[0])
            reach_seconds.append(None if hit is None else hit[1])
            # seed by seed: the wall time to reach the same seed's baseline final, over its run time
            own = first_reach(r, runs[baseline][seed]["test"][-1])
            reach_ratios.append(None if own is None else own[1] / runs[baseline][seed]["eval_seconds"][-1])
        # seed by seed against the baseline at the same step (same seed: same data stream and init)
        gaps = [r["test"][-1] - runs[baseline][seed]["test"][-1] for seed, r in per_seed.items()]
        # and at equal wall time: the last evaluation within the baseline's whole run, same seed
        at_wall = [test_within(r, runs[baseline][seed]["eval_seconds"][-1]) for seed, r in per_seed.items()]
        wall_gaps = [None if v is None else v - runs[baseline][seed]["test"][-1]
                     for v, seed in zip(at_wall, per_seed)]
        at_wall_mean, at_wall_std = _mean_std(at_wall)
        final_val, final_val_std = _mean_std([r["val"][-1] for r in per_seed.values()])
        final_test, final_test_std = _mean_std([r["test"][-1] for r in per_seed.values()])
        wall, wall_std = _mean_std([r["eval_seconds"][-1] for r in per_seed.values()])
        share, share_std = _mean_std([r["target_share"] for r in per_seed.values()])
        steps_mean, steps_std = _mean_std(reach_steps)
        seconds_mean, seconds_std = _mean_std(reach_seconds)
        ratio_mean, ratio_std = _mean_std(reach_ratios)
        summary["methods"][method] = {
            "method": next(iter(per_seed.values()))["method"],
            "final_val": final_val, "final_val_std": final_val_std, "final_test": final_test,
            "final_test_std": final_test_std, "steps": next(iter(per_seed.values()))["eval_steps"][-1],
            "wall_s": wall, "wall_s_std": wall_std, "target_share": share, "target_share_std": share_std,
            "reached": sum(s is not None for s in reach_steps), "reach_steps": reach_steps,
            "reach_steps_mean": steps_mean, "reach_steps_std": steps_std,
            "reach_seconds_mean": seconds_mean, "reach_seconds_std": seconds_std,
            "reach_ratio_per_seed": reach_ratios, "reach_ratio_mean": ratio_mean, "reach_ratio_std": ratio_std,
            "per_seed_final_test": [r["test"][-1] for r in per_seed.values()],
            "per_seed_final_val": [r["val"][-1] for r in per_seed.values()],
            "test_gap_per_seed": gaps, "wins": sum(g < 0 for g in gaps),
            "test_at_baseline_wall_per_seed": at_wall, "test_at_baseline_wall": at_wall_mean,
            "test_at_baseline_wall_std": at_wall_std,
            "wins_at_baseline_wall": sum(g is not None and g < 0 for g in wall_gaps),
            "worst_gap": max(gaps) if gaps else None,
            "nan_seeds": {"final_val": _nan_seeds(per_seed, lambda r: r["val"][-1]),
                          "final_test": _nan_seeds(per_seed, lambda r: r["test"][-1]),
                          "wall_s": _nan_seeds(per_seed, lambda r: r["eval_seconds"][-1]),
                          "target_share": _nan_seeds(per_seed, lambda r: r["target_share"]),
                          "reach_seconds": [s for s, v in zip(per_seed, reach_seconds)
                                            if v is not None and math.isnan(v)]},
        }
    return summary, runs


def resummarize(folder: Path) -> dict:
    """The summary recomputed from a results folder's raw copies alone (its arms and seeds from its own
    summary.json): a committed folder can be checked without its run folders."""
    committed = json.loads((Path(folder) / "summary.json").read_text())
    summary, _ = summarize(Path(folder), list(committed["methods"]), committed["seeds"])
    return summary


def _reach_ratio(m: dict, seeds: list) -> str:
    """'0.79 ± 0.10, worst 1.03' (or 'worst never (seed S)'): the seed-by-seed reach ratios of one arm."""
    ratios = m.get("reach_ratio_per_seed")
    if not ratios:
        return "n/a"
    never = [seed for seed, r in zip(seeds, ratios) if r is None]
    if never:
        worst = f"never (seed{'s' if len(never) > 1 else ''} {', '.join(map(str, never))})"
    else:
        worst = f"{max(ratios):.2f}"
    mean = "n/a" if m["reach_ratio_mean"] is None else f"{m['reach_ratio_mean']:.2f} ± {m['reach_ratio_std']:.2f}"
    return f"{mean}, worst {worst}"


def markdown(summary: dict, command: str) -> str:
    target, base = summary["target_domain"], summary["baseline"]
    n = len(summary["seeds"])

    def pm(mean, std, spec, nan_seeds=()):
        if mean is not None and math.isnan(mean):  # which seeds are NaN, not a mean of the others
            seeds = f" (NaN in seed{'s' if len(nan_seeds) > 1 else ''} {', '.join(map(str, nan_seeds))})"
            return "nan" + (seeds if nan_seeds else "")
        return "n/a" if mean is None else f"{mean:{spec}} ± {std:{spec}}"

    lines = [f"# Selection methods compared ({n} seeds: {', '.join(map(str, summary['seeds']))})", "",
             f"Command: `{command}`", "",
             f"Target domain: `{target}`. Mean ± standard deviation over seeds; the test split decides, val is "
             f"beside it. \"Wins\": seeds whose final test loss is below {base}'s with the same seed (same data "
             f"stream and initial weights); \"worst\": the largest final test gap against {base}, seed by seed "
             f"(positive: worse). \"Reach\": the first evaluation at which a run's test loss is at or below "
             f"{base}'s final test loss ({summary['baseline_final_test']:.4f}, mean over seeds); runs that never "
             "reach it are left out of the mean and counted. \"Seed by seed\": the wall time at which a run first "
             f"reaches the same seed's {base} final test loss, over that {base} run's wall time (mean ± std "
             "over the seeds that reach it, and the worst seed; never: a seed that does not). \"At equal wall time\": the test loss of each run's "
             f"last evaluation within {base}'s whole run time with the same seed, and the seeds on which it is "
             f"below {base}'s final test loss. A seed whose value is NaN (a diverged run) makes its "
             "cell nan, naming the seed, instead of being left out of the mean.", "",
             f"| arm | final {target} test loss | final {target} val loss | wins vs {base} (test) | worst vs {base} | "
             f"steps | steps to reach {base}'s final test | wall time to reach (s) | runs that reach | "
             f"time to reach {base}'s final, seed by seed (x its wall time) | "
             f"wall time (s) | test loss at equal wall time | wins at equal wall time | "
             f"{target} share of trained samples |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, m in summary["methods"].items():
        nan = m["nan_seeds"]
        if m["target_share"] is None or math.isnan(m["target_share"]):
            share = pm(m["target_share"], m["target_share_std"], ".1f", nan["target_share"])
        else:
            share = f"{100 * m['target_share']:.1f}% ± {100 * m['target_share_std']:.1f}%"
        worst = "n/a" if m["worst_gap"] is None else f"{m['worst_gap']:+.4f}"
        lines.append(f"| {method} | {pm(m['final_test'], m['final_test_std'], '.4f', nan['final_test'])} | "
                     f"{pm(m['final_val'], m['final_val_std'], '.4f', nan['final_val'])} | "
                     f"{m['wins']}/{n} | {worst} | {m['steps']} | "
                     f"{pm(m['reach_steps_mean'], m['reach_steps_std'], '.0f')} | "
                     f"{pm(m['reach_seconds_mean'], m['reach_seconds_std'], '.0f', nan['reach_seconds'])} | "
                     f"{m['reached']}/{n} | {_reach_ratio(m, list(summary['seeds']))} | "
                     f"{pm(m['wall_s'], m['wall_s_std'], '.0f', nan['wall_s'])} | "
                     f"{pm(m['test_at_baseline_wall'], m['test_at_baseline_wall_std'], '.4f')} | "
                     f"{m['wins_at_baseline_wall']}/{n} | {share} |")
    lines += ["", "Plots: " + ", ".join(f"[{p[:-4].replace('_', ' ')}](plots/{p})" for p in PLOTS), "",
              f"![test loss vs wall time](plots/{PLOTS[1]})", "",
              "Raw per-run files (config, metrics, selections): `raw/`; command, commit and machine: "
              "`provenance.json`.", ""]
    return "\n".join(lines)


# ---- plots ----------------------------------------------------------------------------------------------
def _rolling(values: list, window: int) -> list:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(out: Path, runs: dict, summary: dict) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = out / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    target = summary["target_domain"]
    written = []

    def band(ax, xs_per_seed, ys_per_seed, label):
        length = min(len(y) for y in ys_per_seed)
        xs = [statistics.fmean(x[i] for x in xs_per_seed) for i in range(length)]
        ys = [[y[i] for y in ys_per_seed] for i in range(length)]
        (line,) = ax.plot(xs, [statistics.fmean(y) for y in ys], label=label)
        ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], alpha=0.2, color=line.get_color())

    figures = [
        (PLOTS[0], "update step", f"{target} test loss", lambda r: (r["eval_steps"], r["test"])),
        (PLOTS[1], "wall time (s)", f"{target} test loss", lambda r: (r["eval_seconds"], r["test"])),
        (PLOTS[2], "update step", f"{target} val loss", lambda r: (r["eval_steps"], r["val"])),
        (PLOTS[3], "update step", f"{target} share of trained samples\n(rolling mean over 10 steps)",
         lambda r: (r["share_steps"], _rolling(r["share"], 10))),
    ]
    for name, xlabel, ylabel, series in figures:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method, per_seed in runs.items():
            pairs = [series(r) for r in per_seed.values()]
            if all(len(x) for x, _ in pairs):
                band(ax, [x for x, _ in pairs], [y for _, y in pairs], method)
        if name in PLOTS[:2]:
            ax.axhline(summary["baseline_final_test"], color="gray", linestyle=":", linewidth=1,
                       label=f"{summary['baseline']} final test")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"mean over {len(summary['seeds'])} seeds (band: min-max)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        written.append(folder / name)
    return written


# ---- command line ---------------------------------------------------------------------------------------
def recorded_command(args, parser) -> str:
    """The command line that redoes a comparison (provenance.json, summary.md): every option that differs
    from its default, in a form the parser reads back to the same arguments."""
    default = parser.get_default
    return ("bash launch/compare.sh " + " ".join(
        ([f"--config {args.config}"] if args.config != default("config") else [])
        + ([f"--out {args.out}"] if args.out else []) + (["--quick"] if args.quick else [])
        + ([f"--seeds {args.seeds}"] if args.seeds is not None else [])
        + ([f"--first-seed {args.first_seed}"] if args.first_seed != default("first_seed") else [])
        + ([f"--methods {args.methods}"] if args.methods != default("methods") else [])
        + [f"--arm {shlex.quote(a)}" for a in args.arm]
        + ([f"--init-checkpoint {args.init_checkpoint}"] if args.init_checkpoint else [])
        + ([f"--reference-checkpoint {args.reference_checkpoint}"] if args.reference_checkpoint else [])
        + (["--", *args.overrides] if args.overrides else []))).strip()


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_greats.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="output folder (default runs/compare-<time>)")
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--quick", action="store_true", help="a smoke version: 4 steps, 2 seeds")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (default 3; --quick: 2)")
    parser.add_argument("--first-seed", type=int, default=1234)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--arm", action="append", default=[], metavar='"NAME: key=value ..."',
                        help="a variant with its own overrides (repeatable), e.g. "
                             "\"greats-adam: selection.preconditioner=adam selection.eta=auto\"")
    parser.add_argument("--init-checkpoint", default=None,
                        help="a step_N checkpoint folder: every run starts from its weights (continued pretraining)")
    parser.add_argument("--reference-checkpoint", default=None,
                        help="a step_N checkpoint folder of the same model: adds rholoss")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides for every run (after --)")
    return parser


def main(argv=None) -> int:
    parser = argument_parser()
    args = parser.parse_args(argv)

    from megatron_greats.config import load_config
    from megatron_greats.errors import GreatsError

    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in CATALOG]
    if bad or not (methods or args.arm):
        print(f"megatron_greats: error: --methods {args.methods!r}: unknown {', '.join(bad) or '(none given)'}; "
              f"allowed: a comma-separated list of {', '.join(CATALOG)}", file=sys.stderr)
        return 2
    seeds_count = args.seeds if args.seeds is not None else (2 if args.quick else 3)
    if seeds_count < 1:
        print(f"megatron_greats: error: --seeds {seeds_count}; allowed: >= 1", file=sys.stderr)
        return 2
    overrides = [*(QUICK_TRAIN if args.quick else DEFAULT_TRAIN), *args.overrides]
    needing = methods_needing_a_reference()
    if args.reference_checkpoint:
        methods += [m for m in needing if m not in methods]
        overrides.append(f"selection.reference_checkpoint={args.reference_checkpoint}")
    elif set(needing) & set(methods):
        print(f"megatron_greats: error: --methods includes {', '.join(m for m in methods if m in needing)} but no "
              "--reference-checkpoint is given; "
              "allowed: --reference-checkpoint STEP_DIR", file=sys.stderr)
        return 2
    if args.init_checkpoint:
        overrides.append(f"train.init_checkpoint={args.init_checkpoint}")
    arms = {m: [f"selection.method={m}"] for m in methods}
    for text in args.arm:
        try:
            name, extra = parse_arm(text)
        except ValueError as e:
            print(f"megatron_greats: error: {e}", file=sys.stderr)
            return 2
        if name in arms:
            print(f"megatron_greats: error: --arm {name!r} is named twice; allowed: one name per arm", file=sys.stderr)
            return 2
        arms[name] = extra
    config = str(REPO / args.config)  # (an absolute args.config stays itself)
    try:  # every run's config is checked before the first one trains
        cfgs = [load_config(config, [*overrides, *extra]) for extra in arms.values()]
    except GreatsError as e:
        print(f"megatron_greats: error: {e}", file=sys.stderr)
        return e.exit_code
    steps = cfgs[0].train.steps
    out = Path(args.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    seeds = list(range(args.first_seed, args.first_seed + seeds_count))
    print(f"[compare] {len(arms)} arms x {len(seeds)} seeds, {steps} steps each, into {out}", flush=True)
    train_all(out, config, arms, seeds, overrides, steps)
    kept = collect_raw(out, list(arms), seeds)
    summary, runs = summarize(out, list(arms), seeds)
    command = recorded_command(args, parser)
    text = markdown(summary, command)
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "provenance.json").write_text(json.dumps({**provenance(command), "selection_kept": kept},
                                                    indent=2) + "\n")
    plot(out, runs, summary)
    print(text)
    print(f"[compare] written: {out}/summary.md, summary.json, provenance.json, plots/, raw/ (each run's config, "
          f"metrics and selections: the summary's sources); curves: tensorboard --logdir {out}/runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
