"""Benchmark: what a GREATS step costs against ordinary steps, in one run on one machine and layout.

Variants, each on a DeepSpeed engine of its own built from the same config (one after the other):
  regular_k   an ordinary step on k samples per replica (what GREATS trains on)
  regular_N   an ordinary step on N samples per replica (what GREATS chooses from)
  regular_Nm  an ordinary step on N + m samples per replica (what GREATS scores: its memory yardstick)
  greats      two_pass: N candidates + m validation samples scored, k selected, a step on the k
  single      single_pass: the same scoring and selection, the update formed from the scoring pass
  <cheap>     GREATS with cheap scoring (--cheap NAME:key=value,...: selection.score_window, score_layers,
              prefilter, ...), the config's update as it resolves (a window or top layers: two_pass)
Per variant: `warmup` steps dropped, then `repeats` steps timed (median, min, max of the slowest rank),
peak memory (accelerator: peak allocation; CPU: peak resident set, sampled), and for GREATS the split
of its step into phases (training/telemetry.py STEP_PHASES), timed with the accelerator synchronised
at every phase edge.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_greats.bench import (CHEAP_KEYS, EXACT_SCORING, ONE_METHOD, default_settings, high_water_bytes,
                                   parse_setting, phases_left_out, reset_high_water, rotated, rss_bytes)
from megatron_greats.training.telemetry import STEP_PHASES, PhaseClock

VARIANTS = ("regular_k", "regular_N", "regular_Nm", "greats", "single")
GREATS_VARIANTS = ("greats", "single")
# the cheap variants when --cheap is not given, sized to the config (bench.default_settings): for tiny-cpu
# (seq 128, N=32, k=16) window32+top1, window16+top1, prefilter24, window32
DEFAULT_CHEAP = ("window:4+top:1", "window:8+top:1", "prefilter", "window:4")
STEP_CHEAP_KEYS = CHEAP_KEYS + ("selection.update",)


class PeakMemory:
    """Peak memory of this process while inside the context: the accelerator's peak allocation, or on
    CPU the peak resident set size: Linux's high-water mark (VmHWM) reset on entry where the kernel
    allows it (/proc/self/clear_refs), and sampled every `interval` seconds besides (ru_maxrss never
    goes down). Sampling alone misses short peaks when the machine is busy."""

    def __init__(self, interval: float = 0.002):
        from deepspeed.accelerator import get_accelerator

        self.acc, self.interval, self.peak = get_accelerator(), interval, 0
        self.on_cpu = self.acc.device_name() == "cpu"

    def __enter__(self):
        if self.on_cpu:
            self._high_water = reset_high_water()
            self.peak, self._stop = rss_bytes(), threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            self.acc.synchronize()
            self.acc.reset_peak_memory_stats()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        if self.on_cpu:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes(), high_water_bytes() if self._high_water else 0)
        else:
            self.acc.synchronize()
            self.peak = self.acc.max_memory_allocated()
        return False


def variant_overrides(cfg, world_size: int, cheap: dict = None) -> dict:
    """{variant: its overrides on top of the config}; cheap: {name: [selection overrides]} of the cheap
    variants (GREATS with them, at the config's update). Every variant takes one method's steps
    (ONE_METHOD: no phase gating)."""
    dp = cfg.data_parallel_size(world_size)
    n = cfg.num_candidates(world_size)
    m = cfg.selection.val_batch
    variants = {
        "regular_k": ["selection.method=regular"],
        "regular_N": ["selection.method=regular", f"train.global_batch={n * dp}"],
        "regular_Nm": ["selection.method=regular", "selection.candidates=null", f"train.global_batch={(n + m) * dp}",
                       f"train.micro_batch={n + m}"],
        "greats": ["selection.method=greats", "selection.update=two_pass", *EXACT_SCORING],
        "single": ["selection.method=greats", "selection.update=single_pass", *EXACT_SCORING],
        **{name: ["selection.method=greats", *EXACT_SCORING, *extra] for name, extra in (cheap or {}).items()}}
    return {name: [*ONE_METHOD, *extra] for name, extra in variants.items()}


def cheap_variants(texts, cfg, world_size: int) -> tuple:
    """({name: [overrides]}, defaults?) from the --cheap options: None -> DEFAULT_CHEAP, ['none'] -> none."""
    from megatron_greats.errors import ConfigError

    if texts is None:
        return default_settings(cfg, world_size, DEFAULT_CHEAP), True
    if texts == ["none"]:
        return {}, False
    out = {}
    for text in texts:
        name, extra = parse_setting(text, STEP_CHEAP_KEYS, "--cheap")
        if name in out or name in VARIANTS or name == "none" or name.startswith("regular_"):
            raise ConfigError(f"--cheap '{text}': the name '{name}' is taken; allowed: a name other than "
                              f"{', '.join(VARIANTS)}, regular_*, none, and the other --cheap names")
        out[name] = extra
    return out, False


def release_cpu_memory() -> None:
    """Hand the heap's free pages back to the system (glibc), so that a variant's resident memory does not
    start at what the previous variant left allocated-but-free; a no-op where there is no glibc."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _measure(name: str, cfg, data, layout, run_dir: Path, warmup: int, repeats: int, show_progress: bool) -> dict:
    from deepspeed.accelerator import get_accelerator

    from megatron_greats.errors import TrainingError
    from megatron_greats.parallel.state import device
    from megatron_greats.training.trainer import Trainer, build_engine

    engine = build_engine(cfg, data.vocab_size, layout)
    trainer = Trainer(cfg, engine, data, layout, run_dir)
    trainer.strategy.use_clock(PhaseClock(sync=True))
    acc = get_accelerator()
    progress = None
    if show_progress:
        from tqdm import tqdm

        progress = tqdm(total=warmup + repeats, desc=f"bench {name}", unit="step", leave=False)

    def timed_step(step: int):
        acc.synchronize()
        start = time.perf_counter()
        choice = trainer.strategy.take(step, engine.get_lr()[0]).choice
        if choice.skipped:
            raise TrainingError(f"bench: step {step} of {name} had NaN/Inf scores; allowed: a config that trains "
                                "(lower train.lr)")
        acc.synchronize()
        if progress is not None:
            progress.update(1)
        return time.perf_counter() - start, choice.seconds

    for step in range(warmup):
        timed_step(step)
    with PeakMemory() as memory:
        seconds, phases = zip(*(timed_step(step) for step in range(warmup, warmup + repeats)))
    if progress is not None:
        progress.close()
    # the step is as slow as its slowest rank, memory as high as its highest; the phase split is
    # that of the slowest rank (per-phase maxima of different ranks would not add up to a step)
    per_rank = torch.tensor(seconds, dtype=torch.float64, device=device())
    split = torch.tensor([[p.get(name, 0.0) for name in STEP_PHASES] for p in phases], dtype=torch.float64,
                         device=device())
    peak = torch.tensor([float(memory.peak)], dtype=torch.float64, device=device())
    world = dist.get_world_size()
    all_steps = [torch.zeros_like(per_rank) for _ in range(world)]
    all_splits = [torch.zeros_like(split) for _ in range(world)]
    dist.all_gather(all_steps, per_rank)
    dist.all_gather(all_splits, split)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    slowest = int(torch.stack([rank_steps.sum() for rank_steps in all_steps]).argmax())
    per_step = torch.stack(all_steps).max(dim=0).values.cpu()
    split, peak = all_splits[slowest].cpu(), peak.cpu()
    return {"seconds": per_step.tolist(), "median_s": statistics.median(per_step.tolist()),
            "min_s": float(per_step.min()), "max_s": float(per_step.max()), "peak_bytes": int(peak[0]),
            "phases_median_s": {name: statistics.median(split[:, i].tolist()) for i, name in enumerate(STEP_PHASES)}}


RATIO_BASES = ("regular_k", "regular_N", "regular_Nm", "greats")


def _ratios(results: dict) -> dict:
    """{g}_over_{base}_{time|memory} for the GREATS variants and every cheap one (what is not a Regular)."""
    scored = [name for name in results if not name.startswith("regular_")]
    return {f"{g}_over_{base}_{what}": results[g][key] / results[base][key]
            for g in scored for base in RATIO_BASES
            if g != base for what, key in (("time", "median_s"), ("memory", "peak_bytes"))}


def _over_rounds(rounds: list) -> dict:
    """One result per variant from one or more rounds: the median of the rounds' medians and phases,
    the steps of every round, and the first round's peak memory (see run())."""
    merged = {}
    for name in rounds[0]:
        per_round = [r[name] for r in rounds]
        merged[name] = {
            "seconds": [s for r in per_round for s in r["seconds"]],
            "median_s": statistics.median(r["median_s"] for r in per_round),
            "min_s": min(r["min_s"] for r in per_round), "max_s": max(r["max_s"] for r in per_round),
            "peak_bytes": per_round[0]["peak_bytes"],
            "phases_median_s": {p: statistics.median(r["phases_median_s"][p] for r in per_round)
                                for p in STEP_PHASES}}
    return merged


def run(config_path: str, overrides: list, warmup: int, repeats: int, out_dir: str, rounds: int = 1,
        cheap: list = None) -> dict:
    """rounds > 1: every variant is measured once per round, in an order rotated by one each round, so
    that a drift of the machine's speed falls on every variant alike; each time ratio is then the median
    of the rounds' ratios (each taken within one round), with its range over the rounds. Memory comes
    from the first round, in the listed order: on CPU a process's resident memory carries over from one
    variant to the next, so a small variant measured after a large one would show the large one's."""
    from deepspeed.accelerator import get_accelerator

    from megatron_greats.config import load_config
    from megatron_greats.errors import ConfigError
    from megatron_greats.parallel.state import distributed_session, launcher_world_size
    from megatron_greats.training.trainer import start_up

    if warmup < 0 or repeats < 1 or rounds < 1:
        raise ConfigError(f"--warmup {warmup} / --repeats {repeats} / --rounds {rounds}; allowed: warmup >= 0, "
                          "repeats >= 1, rounds >= 1")
    world = launcher_world_size()
    base = load_config(config_path, overrides, world_size=world)
    cheap, defaults = cheap_variants(cheap, base, world)
    configs, notes = {}, phases_left_out(base, "bench step")
    for name, extra in variant_overrides(base, world, cheap).items():  # every variant checked before work
        try:
            configs[name] = load_config(config_path, [*overrides, *extra], world_size=world)
        except ConfigError as e:
            if name not in cheap:
                raise
            if not defaults:
                raise ConfigError(f"--cheap '{name}': {e}") from None
            notes.append(f"default cheap variant {name} left out: {e}")
            del cheap[name]
    names = VARIANTS + tuple(cheap)
    out = Path(out_dir)
    with distributed_session(base.parallel.distributed_timeout_minutes):  # ended before the report is made
        data, layout = start_up(base)
        rank0 = dist.get_rank() == 0
        if rank0:
            out.mkdir(parents=True, exist_ok=True)
            for note in notes:
                print(f"megatron_greats: note: {note}", file=sys.stderr, flush=True)
        per_round = []
        for round_index in range(rounds):
            results = {}
            for name in rotated(names, round_index):
                results[name] = _measure(name, configs[name], data, layout, out, warmup, repeats,
                                         show_progress=rank0 and base.train.progress)
                gc.collect()  # the variant's engine is gone with _measure's frame: free it before the next
                get_accelerator().empty_cache()
                release_cpu_memory()
            per_round.append({name: results[name] for name in names})
    results = _over_rounds(per_round)
    round_ratios = [_ratios(r) for r in per_round]
    report = {
        "config": config_path, "overrides": list(overrides), "device": get_accelerator().device_name(), "world_size": layout.world_size,
        "layout": f"dp={layout.data} tp={layout.tensor} pp={layout.pipeline}",
        "k": base.num_selected(world), "N": base.num_candidates(world), "m": base.selection.val_batch,
        "warmup": warmup, "repeats": repeats, "rounds": rounds, "variants": results,
        "cheap": {name: {"overrides": extra, "update": configs[name].update_mode(),
                         "scored": configs[name].num_scored(world)} for name, extra in cheap.items()},
        "notes": notes,
        "ratios": {key: statistics.median(r[key] for r in round_ratios) if key.endswith("_time")
                   else round_ratios[0][key] for key in round_ratios[0]},
        "ratios_range": {key: [min(r[key] for r in round_ratios), max(r[key] for r in round_ratios)]
                         for key in round_ratios[0] if key.endswith("_time")},
        "per_round": per_round if rounds > 1 else None,
    }
    report["phase_share"] = {g: {name: results[g]["phases_median_s"][name] / results[g]["median_s"]
                                 for name in STEP_PHASES} for g in (*GREATS_VARIANTS, *cheap)}
    if rank0:
        (out / "bench_step.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "bench_step.md").write_text(markdown(report))
    return report


def markdown(r: dict) -> str:
    from megatron_greats.selection.catalog import SINGLE_PASS, TWO_PASS

    v, cheap = r["variants"], r.get("cheap") or {}
    lines = [f"Step benchmark: `{r['config']}` {' '.join(r['overrides'])}".rstrip(),
             "",
             f"{r['device']}, world size {r['world_size']} ({r['layout']}); per replica k={r['k']}, N={r['N']}, "
             f"m={r['m']}; {r['warmup']} warm-up steps dropped, median of {r['repeats']} (min-max)"
             + (f"; {r['rounds']} rounds: times are medians of the rounds' medians, time ratios taken within "
                "each round (range over the rounds); memory from the first round." if r.get("rounds", 1) > 1 else "."),
             "",
             "| variant | step time (s) | min-max (s) | peak memory (MiB) |",
             "|---|---|---|---|"]
    labels = {"regular_k": f"Regular, k={r['k']}", "regular_N": f"Regular, N={r['N']}",
              "regular_Nm": f"Regular, N+m={r['N'] + r['m']}",
              "greats": f"GREATS {TWO_PASS}, N={r['N']} -> k={r['k']}, m={r['m']}",
              "single": f"GREATS {SINGLE_PASS}, N={r['N']} -> k={r['k']}, m={r['m']}"}
    for name, c in cheap.items():
        keys = ", ".join(o.replace("selection.", "") for o in c["overrides"])
        labels[name] = f"{name}: GREATS {c['update']}, {keys}"
    for name in v:
        x = v[name]
        lines.append(f"| {labels[name]} | {x['median_s']:.3f} | {x['min_s']:.3f}-{x['max_s']:.3f} | "
                     f"{x['peak_bytes'] / 2**20:.0f} |")
    q = r["ratios"]
    names = {"greats": TWO_PASS, "single": SINGLE_PASS, "regular_k": "Regular(k)", "regular_N": "Regular(N)",
             "regular_Nm": "Regular(N+m)", **{name: name for name in cheap}}
    spread = r.get("rounds", 1) > 1

    def cell(key):
        if not spread or key not in r["ratios_range"]:
            return f"{q[key]:.2f}"
        low, high = r["ratios_range"][key]
        return f"{q[key]:.2f} ({low:.2f}-{high:.2f})"
    lines += ["", "| ratio | time | peak memory |", "|---|---|---|"]
    for g, base in (("single", "regular_N"), ("single", "regular_k"), ("single", "greats"), ("single", "regular_Nm"),
                    ("greats", "regular_N"), ("greats", "regular_k")):
        lines.append(f"| {names[g]} / {names[base]} | {cell(f'{g}_over_{base}_time')} | "
                     f"{cell(f'{g}_over_{base}_memory')} |")
    if cheap:
        lines += ["", "| cheap variant | time / Regular(k) | time / Regular(N) | time / Regular(N+m) | time / two_pass "
                  "| memory / Regular(k) | memory / Regular(N) | memory / Regular(N+m) | memory / two_pass |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name in cheap:
            cells = [cell(f"{name}_over_{base}_{what}") for what in ("time", "memory") for base in RATIO_BASES]
            lines.append(f"| {name} | {' | '.join(cells)} |")
    shown = ("greats", "single", *cheap)
    lines += ["", "| phase | " + " | ".join(f"{names[g]} (s) | share" for g in shown) + " |",
              "|---|" + "---|---|" * len(shown)]
    for name in STEP_PHASES:
        lines.append(f"| {name} | " + " | ".join(f"{v[g]['phases_median_s'][name]:.4f} | "
                                                  f"{100 * r['phase_share'][g][name]:.1f}%" for g in shown) + " |")
    if r.get("notes"):
        lines += [""] + [f"note: {note}" for note in r["notes"]]
    return "\n".join(lines) + "\n"
