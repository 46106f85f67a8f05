"""Fidelity of cheap scoring: how close its scores and picks come to exact scoring, on the same step.

One training run with exact scoring (the config's Gram method, with selection.score_window,
score_layers and prefilter unset), trained on the exact picks, so the weights follow the exact run.
At every measured step, before the exact step updates the weights, each cheap setting (a config that
differs from the exact one only in the scoring keys, bench.CHEAP_KEYS) scores the same candidates and
validation samples with the same weights through a step strategy of its own on the one engine: its own
scoring pass, Adam preconditioning and eta as a run with that setting would form them (the same
optimizer state and learning rate). Per setting and measured step:

  spearman  rank correlation of the first-order scores (val_alignment, <D g_i, g_val>), exact vs cheap;
            with a prefilter over the M candidates it kept (the others have no cheap score)
  jaccard   |A & B| / |A | B| of the k picks of the greedy fed the exact and the cheap inputs (each with
            its own inputs, eta and seed: the picks a run would take)
  gram_r    Pearson correlation of the Gram's off-diagonal entries (prefilter: the kept M x M block)

and the report gives the median over the measured steps (and data-parallel replicas) and the worst
one, with its step. Ties in a rank correlation get the mean of the ranks they span (as scipy's
spearmanr); a correlation of two constant vectors is 1 when they are equal and NaN otherwise.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np

from megatron_greats.bench import (CHEAP_KEYS, EXACT_SCORING, ONE_METHOD, default_settings, parse_setting,
                                   phases_left_out)

# The default settings, sized to the config (bench.default_settings): for tiny-cpu (seq 128, 4 layers,
# N=32, k=16) window64, window32, window16, window32random, top1, top2, prefilter24, window32+top1.
DEFAULT_KINDS = ("window:2", "window:4", "window:8", "random:4", "top:1", "top:2", "prefilter", "window:4+top:1")
METRICS = ("spearman", "jaccard", "gram_r")
DEFAULT_STEPS = 60  # --steps, at most train.steps


# ---- the metrics ------------------------------------------------------------------------------------
def average_ranks(x) -> np.ndarray:
    """Ranks 1..n of x; tied values share the mean of the ranks they span."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1, dtype=np.float64)
    values, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    for start, count in zip(first, counts):
        if count > 1:
            ranks[order[start:start + count]] = start + (count + 1) / 2.0
    return ranks


def pearson(a, b) -> float:
    """Pearson correlation; of two constant vectors: 1 if equal, else NaN (no spread to correlate)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"pearson: shapes {a.shape} and {b.shape}; allowed: equal, at least 2 values")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.nan
    da, db = a - a.mean(), b - b.mean()
    na, nb = math.sqrt(float(da @ da)), math.sqrt(float(db @ db))
    if na == 0.0 or nb == 0.0:
        return 1.0 if np.array_equal(a, b) else math.nan
    return max(-1.0, min(1.0, float(da @ db) / (na * nb)))


def spearman(a, b) -> float:
    """Spearman rank correlation: the Pearson correlation of the average ranks."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.nan
    return pearson(average_ranks(a), average_ranks(b))


def jaccard(a, b) -> float:
    a, b = set(np.asarray(a).tolist()), set(np.asarray(b).tolist())
    return 1.0 if not (a | b) else len(a & b) / len(a | b)


def off_diagonal(matrix) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    return m[~np.eye(m.shape[0], dtype=bool)]


def compare(exact: dict, cheap: dict) -> dict:
    """The metrics of one step: exact / cheap hold val_alignment, gram (over their scored candidates),
    picked (positions among the N candidates) and kept (the positions the cheap pass scored)."""
    kept = cheap["kept"]
    return {"spearman": spearman(exact["val_alignment"][kept], cheap["val_alignment"]),
            "jaccard": jaccard(exact["picked"], cheap["picked"]),
            "gram_r": pearson(off_diagonal(exact["gram"][np.ix_(kept, kept)]), off_diagonal(cheap["gram"])),
            # how many of the exact picks the cheap pass scored at all (k of k without a prefilter)
            "exact_picks_scored": int(np.isin(exact["picked"], kept).sum())}


def summary(records: list) -> dict:
    """Median and worst (lowest; NaN counts as worst) of each metric over the records, with the worst's step."""
    out = {}
    for metric in METRICS:
        values = [r[metric] for r in records]
        finite = [v for v in values if math.isfinite(v)]
        worst = min(records, key=lambda r: r[metric] if math.isfinite(r[metric]) else -math.inf)
        out[metric] = {"median": statistics.median(finite) if finite else math.nan,
                       "worst": worst[metric], "worst_step": worst["step"], "worst_replica": worst["replica"],
                       "non_finite": len(values) - len(finite)}
    seconds = [r["scoring_s"] for r in records]
    out["scoring_s_median"] = statistics.median(seconds)
    return out


# ---- the run ----------------------------------------------------------------------------------------
def observed(kind):
    """A step strategy class that also keeps the selector's inputs of its last scoring pass (as float64
    copies, so that releasing the pass does not touch them)."""

    class Observed(kind):
        def score(self, *args, **kwargs):
            inputs = super().score(*args, **kwargs)
            self.observed = {name: getattr(inputs, name).detach().double().cpu().numpy().copy()
                             for name in ("val_alignment", "gram", "losses")}
            return inputs

    Observed.__name__ = f"Observed{kind.__name__}"
    return Observed


def settings_of(config_path: str, overrides: list, texts: list, world: int) -> tuple:
    """(exact config, {name: (overrides, config)}, notes): every setting's config loaded (and so checked)
    before any heavy work. The defaults (no texts) that the config refuses are left out with a note."""
    from megatron_greats.config import load_config
    from megatron_greats.selection.catalog import CATALOG
    from megatron_greats.errors import ConfigError

    notes = phases_left_out(load_config(config_path, overrides, world_size=world), "bench fidelity")
    exact = load_config(config_path, [*overrides, *ONE_METHOD, *EXACT_SCORING], world_size=world)
    if not exact.method.needs_gram:
        gram_methods = [name for name, spec in CATALOG.items() if spec.needs_gram]
        raise ConfigError(f"bench fidelity: selection.method={exact.selection.method} forms no Gram or first-order "
                          f"score to compare; allowed: {', '.join(gram_methods)}")
    if texts:
        given = {}
        for text in texts:
            name, extra = parse_setting(text, CHEAP_KEYS, "--setting")
            if name in given:
                raise ConfigError(f"--setting '{text}': the name '{name}' is given twice; allowed: distinct names")
            given[name] = extra
    else:
        given = default_settings(exact, world, DEFAULT_KINDS)
    settings = {}
    for name, extra in given.items():
        try:
            settings[name] = (extra, load_config(config_path, [*overrides, *ONE_METHOD, *EXACT_SCORING, *extra],
                                                 world_size=world))
        except ConfigError as e:
            if texts:
                raise ConfigError(f"--setting '{name}': {e}") from None
            notes.append(f"default setting {name} left out: {e}")
    if not settings:
        raise ConfigError("bench fidelity: no setting to measure; allowed: --setting NAME:key=value[,key=value...]")
    return exact, settings, notes


def measured_steps(steps: int, every: int) -> list:
    """Every `every`-th step, ending each stride (step 0 has no Adam state yet: measured only with every=1)."""
    return [s for s in range(steps) if s % every == every - 1]


def run(config_path: str, overrides: list, texts: list, steps: int, every: int, out_dir: str,
        raw: bool = False) -> dict:
    import sys

    import torch.distributed as dist

    from megatron_greats.errors import ConfigError, TrainingError
    from megatron_greats.selection.catalog import SINGLE_PASS
    from megatron_greats.parallel.state import distributed_session, launcher_world_size
    from megatron_greats.training.executors import executor_for
    from megatron_greats.training.step import SinglePassStep, TwoPassStep
    from megatron_greats.training.trainer import build_engine, start_up

    world = launcher_world_size()
    exact_cfg, settings, notes = settings_of(config_path, overrides, texts, world)
    steps = min(DEFAULT_STEPS, exact_cfg.train.steps) if steps is None else steps
    if not 1 <= steps <= exact_cfg.train.steps or every < 1:
        raise ConfigError(f"--steps {steps} / --every {every}; allowed: 1 <= steps <= train.steps "
                          f"({exact_cfg.train.steps}: the run follows the config's schedule), every >= 1")
    at = measured_steps(steps, every)
    if not at:
        raise ConfigError(f"--steps {steps} / --every {every} measures no step; allowed: steps >= every")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out_dir}' is a file; allowed: a folder")
    with distributed_session(exact_cfg.parallel.distributed_timeout_minutes):
        data, layout = start_up(exact_cfg)
        rank0 = dist.get_rank() == 0
        for note in notes if rank0 else ():
            print(f"megatron_greats: note: {note}", file=sys.stderr, flush=True)
        engine = build_engine(exact_cfg, data.vocab_size, layout)
        executor = executor_for(engine, layout)
        kind = SinglePassStep if exact_cfg.update_mode() == SINGLE_PASS else TwoPassStep
        exact = observed(kind)(exact_cfg, data, layout, engine, executor)
        # the cheap ones only choose (their update is never taken): a two-pass strategy keeps no operands
        cheap = {}
        for name, (_, cfg) in settings.items():
            try:
                cheap[name] = observed(TwoPassStep)(cfg, data, layout, engine, executor)
            except ConfigError as e:  # what only the model can tell (a score_exclude pattern matching nothing)
                raise ConfigError(f"--setting '{name}': {e}") from None
        progress = None
        if rank0 and exact_cfg.train.progress:
            from tqdm import tqdm

            progress = tqdm(total=steps, desc="fidelity", unit="step", dynamic_ncols=True)
        records, raw_steps, exact_seconds, skipped = {name: [] for name in cheap}, [], [], 0
        for step in range(steps):
            lr = engine.get_lr()[0]
            chosen = {}
            if step in at:  # the cheap settings first: the exact step then updates the weights
                for name, strategy in cheap.items():
                    try:
                        choice = strategy.choose(step, lr)
                    finally:
                        strategy.scoring.release()
                    chosen[name] = (choice, strategy.observed if not choice.skipped else None)
            result = exact.take(step, lr)
            if result.choice.skipped:
                skipped += 1
                if skipped >= exact_cfg.train.max_skipped_steps:
                    raise TrainingError(f"bench fidelity: {skipped} exact steps had NaN/Inf scores; allowed: a "
                                        "config that trains (lower train.lr)")
            elif step in at:
                exact_seconds.append(result.choice.seconds.get("scoring", math.nan))
                reference = {**exact.observed, "picked": result.choice.picked}
                raw_step = {"exact": reference}
                for name, (choice, inputs) in chosen.items():
                    if choice.skipped:
                        metrics = {m: math.nan for m in METRICS}
                        metrics["exact_picks_scored"] = 0
                    else:
                        kept = np.arange(len(choice.candidates)) if choice.prefiltered is None else choice.prefiltered
                        mine = {**inputs, "picked": choice.picked, "kept": kept}
                        metrics = compare(reference, mine)
                        raw_step[name] = mine
                    records[name].append({"step": step, "replica": layout.data_rank, **metrics,
                                          "scoring_s": choice.seconds.get("scoring", math.nan)})
                raw_steps.append((step, raw_step))
            if progress is not None:
                progress.set_postfix(measured=len(next(iter(records.values()))), refresh=False)
                progress.update(1)
        if progress is not None:
            progress.close()
        # every replica measured its own candidates: rank 0 pools them (one copy per replica)
        gathered = [None] * dist.get_world_size()
        mine = (layout.tensor_rank == 0 and layout.pipeline_rank == 0, records, exact_seconds)
        dist.all_gather_object(gathered, mine)
    if not rank0:
        return {}
    pooled = {name: [r for first, recs, _ in gathered if first for r in recs[name]] for name in cheap}
    exact_pooled = [s for first, _, seconds in gathered if first for s in seconds]
    report = {
        "config": config_path, "overrides": list(overrides), "exact_overrides": list(EXACT_SCORING),
        "device": _device_name(), "world_size": layout.world_size,
        "layout": f"dp={layout.data} tp={layout.tensor} pp={layout.pipeline}",
        "method": exact_cfg.selection.method, "update": exact_cfg.update_mode(),
        "preconditioner": exact_cfg.selection.preconditioner, "eta": exact_cfg.selection.eta,
        "k": exact_cfg.num_selected(world), "N": exact_cfg.num_candidates(world), "m": exact_cfg.selection.val_batch,
        "seq_len": exact_cfg.model.seq_len, "num_layers": exact_cfg.model.num_layers,
        "steps": steps, "every": every, "measured_steps": at, "schedule_steps": exact_cfg.train.steps,
        "exact_skipped_steps": skipped, "notes": notes,
        "exact_scoring_s_median": statistics.median(exact_pooled) if exact_pooled else math.nan,
        "settings": {name: {"overrides": settings[name][0], "scored": settings[name][1].num_scored(world),
                            "summary": summary(pooled[name]) if pooled[name] else None, "steps": pooled[name]}
                     for name in cheap},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "fidelity.md").write_text(markdown(report))
    if raw:
        _write_raw(out / "fidelity_raw.npz", raw_steps)
    return report


def _every(every: int) -> str:
    if every == 1:
        return "every step"
    suffix = "th" if 10 <= every % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(every % 10, "th")
    return f"every {every}{suffix} step"


def _device_name() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def _write_raw(path: Path, raw_steps: list) -> None:
    """Rank 0's (replica 0's) inputs per measured step: step{S}/{setting}/{val_alignment,gram,picked,kept,losses}."""
    arrays = {}
    for step, per_setting in raw_steps:
        for name, values in per_setting.items():
            for key, value in values.items():
                arrays[f"step{step}/{name}/{key}"] = np.asarray(value)
    np.savez(path, **arrays)


def markdown(r: dict) -> str:
    measured = r["measured_steps"]
    lines = [f"Scoring fidelity: `{r['config']}` {' '.join(r['overrides'])}".rstrip(), "",
             f"{r['device']}, world size {r['world_size']} ({r['layout']}); {r['method']} "
             f"(preconditioner {r['preconditioner']}, eta {r['eta']}), per replica k={r['k']}, N={r['N']}, "
             f"m={r['m']}, seq_len {r['seq_len']}, {r['num_layers']} layers.",
             f"One run of {r['steps']} steps with exact scoring ({r['update']}, trained on the exact picks; the "
             f"config's schedule of {r['schedule_steps']} steps); at {len(measured)} steps "
             f"({_every(r['every'])}, {measured[0]}..{measured[-1]}) each setting scored the same candidates and "
             "validation samples with the same weights. Median over the measured steps, and the worst (lowest) "
             "with its step.",
             "Spearman: of the first-order scores (val_alignment); Jaccard: of the k picks; Gram r: Pearson of "
             "the Gram's off-diagonal entries. With a prefilter (scored M < N) Spearman and Gram r are over the "
             "M kept candidates; 'exact picks scored' counts the exact picks among them (median, of k).",
             "", "| setting | overrides | scored | Spearman | worst (step) | Jaccard | worst (step) | Gram r | "
             "worst (step) | exact picks scored | scoring s / exact |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in r["settings"].items():
        summ = s["summary"]
        if summ is None:
            lines.append(f"| {name} | {', '.join(s['overrides'])} | | no measured step | | | | | | | |")
            continue
        scored = f"M={s['scored']} of N={r['N']}" if s["scored"] < r["N"] else f"N={r['N']}"
        cells = []
        for metric in METRICS:
            m = summ[metric]
            bad = f", {m['non_finite']} NaN" if m["non_finite"] else ""
            cells += [f"{m['median']:.3f}", f"{m['worst']:.3f} ({m['worst_step']}{bad})"]
        picks = statistics.median(x["exact_picks_scored"] for x in s["steps"])
        ratio = summ["scoring_s_median"] / r["exact_scoring_s_median"]
        lines.append(f"| {name} | {', '.join(o.replace('selection.', '') for o in s['overrides'])} | {scored} | "
                     f"{' | '.join(cells)} | {picks:g} of {r['k']} | {ratio:.2f} |")
    lines += ["", f"scoring s / exact: the median seconds of the setting's scoring pass (forward, backward, Gram; "
                  f"a prefilter's forward over all N included) over the exact one's "
                  f"({r['exact_scoring_s_median']:.3f} s), measured in the same run, unsynchronised: an indication, "
                  "not a benchmark (bench step measures the whole step)."]
    if r["notes"]:
        lines += [""] + [f"note: {note}" for note in r["notes"]]
    return "\n".join(lines) + "\n"
