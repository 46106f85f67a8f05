"""results.json and summary.md of a launch/gpu_check.sh folder, from what its steps left there.

    python launch/gpu_check_summary.py OUT_DIR

gpu_check.sh calls it after every step, so a check cut short still has its table. Each step's
numbers come from that step's own outputs (pytest's junit.xml, bench_step.json, bench_ghost.json,
the runs' metrics.jsonl read by megatron_greats.report); a step whose outputs are missing or
unreadable gets "see logs/<step>.log" instead of numbers, never an exception.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path


def read_steps(out: Path) -> list:
    with open(out / "steps.tsv", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def machine(out: Path) -> dict:
    info = {}
    smi = out / "nvidia-smi.csv"
    if smi.exists():
        rows = [r for r in csv.reader(smi.read_text().splitlines()) if r]
        info["gpus"] = [", ".join(c.strip() for c in r) for r in rows[1:]]  # rows[0]: the header
    text = out / "machine.txt"
    if text.exists():
        for line in text.read_text().splitlines():
            key, _, value = line.partition("=")
            info[key] = value
    if (out / "torch.json").exists():
        info["torch"] = json.loads((out / "torch.json").read_text())
    return info


# ---- one function per step kind: (short text for the table, numbers for results.json) ---------------

def tests_result(out: Path):
    suite = ElementTree.parse(out / "tests" / "junit.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total = int(suite.get("tests", 0))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    failing = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
               if case.find("failure") is not None or case.find("error") is not None]
    text = f"{total - failed - skipped} passed, {failed} failed, {skipped} skipped"
    if failing:
        text += " (failed: " + ", ".join(name.rsplit(".", 1)[-1] for name in failing) + ")"
    return text, {"tests": total, "failed": failed, "skipped": skipped, "failing": failing}


def trained_tokens_per_second(run_dir: Path):
    """Median of the run's logged train/tokens_per_sec (tokens of the samples trained on)."""
    values = [json.loads(line).get("train/tokens_per_sec") for line in
              (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def pair_result(folder: Path):
    """GREATS vs Regular: test loss at the last step both evaluated, at Regular's wall time, the time to
    reach Regular's final test loss (megatron_greats.report's reading), trained tokens/s, wall time."""
    from megatron_greats.report import first_reach, read_run, test_within

    greats, regular = read_run(folder / "greats"), read_run(folder / "regular")
    step = max(set(greats["eval_steps"]) & set(regular["eval_steps"]))
    at_step = {name: r["test"][r["eval_steps"].index(step)] for name, r in (("greats", greats), ("regular", regular))}
    wall, final = regular["eval_seconds"][-1], regular["test"][-1]
    at_wall = test_within(greats, wall)
    reach = first_reach(greats, final)
    tps = {name: trained_tokens_per_second(folder / name) for name in ("greats", "regular")}
    data = {"step": step, "test_loss_at_step": at_step, "regular_wall_s": wall,
            "greats_test_loss_at_regular_wall_time": at_wall,
            "greats_reaches_regular_final_s": None if reach is None else reach[1],
            "trained_tokens_per_s": tps, "wall_s": {"greats": greats["seconds"], "regular": regular["seconds"]}}
    fmt = (lambda x, spec: "n/a" if x is None else format(x, spec))
    text = (f"test loss at step {step}: GREATS {at_step['greats']:.3f}, Regular {at_step['regular']:.3f}; "
            f"at Regular's wall time ({wall:.0f} s): GREATS {fmt(at_wall, '.3f')}; GREATS reaches Regular's "
            f"final at {'never' if reach is None else format(reach[1], '.0f') + ' s'}; trained tokens/s: "
            f"GREATS {fmt(tps['greats'], '.0f')}, Regular {fmt(tps['regular'], '.0f')}; wall: "
            f"GREATS {greats['seconds']:.0f} s, Regular {regular['seconds']:.0f} s")
    return text, data


def bench_step_result(folder: Path):
    report = json.loads((folder / "bench_step.json").read_text())
    ratios, variants = report["ratios"], report["variants"]
    keys = [f"{v}_over_regular_{base}_{what}" for what in ("time", "memory")
            for v in ("single", "greats") for base in ("k", "N")]
    data = {"ratios": {k: ratios.get(k) for k in keys},
            "median_s": {v: variants[v]["median_s"] for v in variants},
            "peak_MiB": {v: variants[v]["peak_bytes"] / 2**20 for v in variants},
            "device": report.get("device"), "layout": report.get("layout"),
            "k": report.get("k"), "N": report.get("N"), "m": report.get("m")}
    r = data["ratios"]
    cheap = [(v, ratios.get(f"{v}_over_regular_k_time")) for v in (report.get("cheap") or [])]

    def two(x):
        return "n/a" if x is None else f"{x:.2f}"

    peaks = ", ".join(f"{name} {data['peak_MiB'][v]:.0f}" for name, v in
                      (("Regular(k)", "regular_k"), ("Regular(N)", "regular_N"), ("two_pass", "greats"),
                       ("single_pass", "single")) if v in variants)
    text = (f"time / Regular(k): single_pass {two(r['single_over_regular_k_time'])}, two_pass "
            f"{two(r['greats_over_regular_k_time'])}; / Regular(N): single_pass {two(r['single_over_regular_N_time'])}, "
            f"two_pass {two(r['greats_over_regular_N_time'])}; peak memory / Regular(N): single_pass "
            f"{two(r['single_over_regular_N_memory'])}, two_pass {two(r['greats_over_regular_N_memory'])}; "
            f"peak MiB: {peaks}; Regular(k) step {variants['regular_k']['median_s'] * 1e3:.1f} ms")
    if cheap:
        text += "; " + ", ".join(f"{name} / Regular(k) {two(x)}" for name, x in cheap)
    return text, data


def bench_ghost_result(folder: Path):
    rows = json.loads((folder / "bench_ghost.json").read_text())
    data = [{"B": r["B"], "T": r["T"], "d": r["d"], "ghost_over_ordinary_time": r["ghost_over_ordinary_time"],
             "ghost_over_ordinary_memory": r["ghost_over_ordinary_memory"], "func_over_ghost_time": r["speedup"],
             "traces_agree": r["traces_agree"]} for r in rows]
    text = "ghost/ordinary time, memory at B,T,d: " + "; ".join(
        f"{r['B']},{r['T']},{r['d']}: {r['ghost_over_ordinary_time']:.2f}, {r['ghost_over_ordinary_memory']:.2f}"
        + ("" if r["traces_agree"] else " (Gram traces disagree)") for r in data)
    return text, data


def env_result(out: Path):
    info = json.loads((out / "torch.json").read_text())
    devices = info.get("devices") or []
    text = (f"torch {info['torch']}, CUDA {info['cuda']}, NCCL {info.get('nccl')}, {len(devices)} x "
            f"{devices[0] if devices else 'no device'}; deepspeed {info['deepspeed']}, "
            f"megatron-core {info['megatron_core']}")
    return text, info


RESULTS = {
    "env": env_result,
    "tests": tests_result,
    "quickstart-bf16": lambda out: pair_result(out / "quickstart-bf16"),
    "dp2-bf16": lambda out: pair_result(out / "dp2-bf16"),
    "tp2-bf16": lambda out: pair_result(out / "tp2-bf16"),
    "bench-step-bf16": lambda out: bench_step_result(out / "bench-step-bf16"),
    "bench-step-fp32": lambda out: bench_step_result(out / "bench-step-fp32"),
    "bench-ghost": lambda out: bench_ghost_result(out / "bench-ghost"),
}

WHAT = {
    "env": "CUDA torch wheel + requirements.txt",
    "data": "embedded corpus, tokenizer, indexed data",
    "tests": "ghost Gram vs torch.func (fp64/fp32/bf16), selections vs reference, single_pass == two_pass",
    "quickstart-bf16": "GREATS vs Regular, 300 steps, bf16, 1 GPU",
    "bench-step-bf16": "bench step, 12 x 768, seq 128, bf16",
    "bench-step-fp32": "bench step, configs/tiny-cpu.yaml (fp32)",
    "bench-ghost": "bench ghost at the CPU table's points",
    "dp2-bf16": "GREATS vs Regular, DP=2, deepspeed launcher, NCCL",
    "tp2-bf16": "GREATS vs Regular, TP=2, deepspeed launcher, NCCL",
}


def summarise(out: Path) -> dict:
    steps = []
    for row in read_steps(out):
        name, text, data = row["step"], row.get("note") or "", None
        if name in RESULTS and row["status"] in ("ok", "failed", "timeout"):
            try:
                text, data = RESULTS[name](out)
            except Exception as e:  # a step that left no readable outputs: its log says why
                text = f"see logs/{name}.log (no readable results: {type(e).__name__})"
        elif row["status"] in ("failed", "timeout"):
            text = f"see logs/{name}.log"
        steps.append({"step": name, "what": WHAT.get(name, ""), "status": row["status"],
                      "exit": int(row["exit"]) if row["exit"] not in ("", None) else None,
                      "seconds": float(row["seconds"] or 0), "result": text, "data": data})
    failed = any(s["status"] in ("failed", "timeout", "skipped") for s in steps)
    return {"machine": machine(out), "steps": steps, "passed": not failed}


def markdown(results: dict) -> str:
    m = results["machine"]
    t = m.get("torch") or {}
    lines = [f"# GPU check, {m.get('started', '?')}", "",
             f"GPU: {'; '.join(m.get('gpus') or ['?'])} (driver {m.get('driver', '?')}); "
             f"torch {t.get('torch', '?')}, CUDA {t.get('cuda', '?')}, NCCL {t.get('nccl', '?')}; "
             f"commit {m.get('commit', '?')}; budget {m.get('minutes', '?')} min", "",
             "| step | what | status | exit | seconds | result |", "|---|---|---|---|---|---|"]
    for s in results["steps"]:
        exit_status = "" if s["exit"] is None else str(s["exit"])
        lines.append(f"| {s['step']} | {s['what']} | {s['status']} | {exit_status} | {s['seconds']:.0f} | "
                     f"{s['result'].replace('|', '/')} |")
    lines += ["", "all steps passed" if results["passed"] else "NOT all steps passed (see logs/)"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not (Path(argv[0]) / "steps.tsv").exists():
        print("usage: python launch/gpu_check_summary.py OUT_DIR (a launch/gpu_check.sh folder with steps.tsv)",
              file=sys.stderr)
        return 2
    out = Path(argv[0])
    results = summarise(out)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(results))
    print(markdown(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
