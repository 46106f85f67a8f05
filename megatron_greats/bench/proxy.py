"""Does the selector fit its proxy? A post-hoc replay of a finished run's selections (issue #28).

The selector of a Gram method aligns its picks with m validation samples per step, drawn from its own
selection split (a few dozen target-domain documents). A selection that fits those m samples, or that
split, rather than the target domain would beat a random pick of the same candidates on them by far
more than on val. This tool measures that after the run, so that val is never shown to a training run
(it reads val, never test: choose on val, report on test).

Input: a run folder of launch/pretrain.py with checkpoints (train.save_interval=K: step_K, step_2K, ...)
and selection.jsonl. Checkpoint step_s holds the weights after s updates; the selection logged as step
s + 1 was made from exactly those weights (Trainer._loop: strategy.take(s) scores with the weights of s
updates, then the step counter becomes s + 1 and the choice is logged under it; the checkpoint written
at counter s is taken after update s). Per measured checkpoint s, with its weights (one process, plain
autograd, no dropout), the full-sequence mean-loss gradient (the mean over samples of each sample's
mean token loss) of

  P      the k selected samples of step s + 1          R      a random k of the same N candidates (seeded)
  C      all N candidates                              P_tgt  the selected samples of the target domain
  C_tgt  the candidates of the target domain           R_tgt  a random |P_tgt| of C_tgt (seeded)
  V_step the step's m validation samples (selection split)
  S      the selection split (its first --sel-samples)  V      the val split (its first --val-samples)

and per view (the parameters: all trainable ones, or those the run scored: selection.score_layers and
score_exclude; plain, or times Adam's D = 1 / (sqrt(v_hat) + eps) of the coming step, from the
checkpoint's optimizer state with the candidates' mean gradient C as the coming gradient, as
training/preconditioning.py forms it) the first-order gains <Y, X> and cosines for Y in P, R, C, P_tgt,
C_tgt and X in V_step, S, V; the ratios <P, X> / <R, X> and <P, X> / <C, X>; the lift cos(P, X) - cos(R, X),
which does not grow with the norm of X; and lift_tgt = cos(P_tgt, X) - cos(R_tgt, X): whether the
target-domain samples the selector takes are better for X than as many random ones of the target
domain among the same candidates (a mean of fewer samples has a lower cosine: R_tgt is of P_tgt's
size). One more view, "window", is what the selector itself saw: every sample cut to the logged
score_window, the scored parameters, and D where the run logged preconditioner adam. If P's lift on
V_step is far above its lift on S, the picks fit the step's m samples; above its lift on V, they fit
the selection split.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

SELECTIONS = ("P", "R", "C", "P_tgt", "R_tgt", "C_tgt")   # gradients that an update would follow
TARGETS = ("V_step", "S", "V")                   # gradients of the target domain it is judged on
GROUPS = SELECTIONS + TARGETS
RATIO_METRICS = ("ratio_P_R", "ratio_P_C", "lift", "lift_tgt")
VIEW_ORDER = ("all", "scored", "all+adam", "scored+adam", "window")
_RANDOM_STREAM = 0x9A0B  # the control's stream of --seed (one draw per step)
_TARGET_STREAM = 0x9A0C  # the target-domain control's stream


# ---- what to measure: read and checked before anything heavy is imported --------------------------
def _error(message: str):
    from megatron_greats.errors import ConfigError

    return ConfigError(message)


def checkpoint_steps(run: Path) -> list:
    folder = run / "checkpoints"
    if not folder.is_dir():
        return []
    steps = []
    for path in folder.iterdir():
        tail = path.name[len("step_"):]
        if path.name.startswith("step_") and tail.isdigit() and (path / "shape.json").is_file():
            steps.append(int(tail))
    return sorted(steps)


def read_selections(run: Path) -> dict:
    """{step: record} of replica 0 from selection.jsonl."""
    records = {}
    for number, line in enumerate((run / "selection.jsonl").read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise _error(f"'{run / 'selection.jsonl'}' line {number} is not JSON; allowed: the selection.jsonl "
                         "a run wrote") from None
        if record.get("replica", 0) == 0:
            records[int(record["step"])] = record
    return records


def plan(run_dir: str, steps_text, every) -> tuple:
    """(run folder, {step: selection record}, checkpoint steps to measure): refusals before heavy work."""
    run = Path(run_dir)
    allowed = ("allowed: the run_dir of a launch/pretrain.py run with a Gram selection method and "
               "train.save_interval=K")
    if not run.is_dir():
        raise _error(f"--run '{run_dir}' is not a folder; {allowed}")
    if not (run / "config.yaml").is_file():
        raise _error(f"--run '{run_dir}' has no config.yaml (the config the run wrote); {allowed}")
    if not (run / "selection.jsonl").is_file():
        raise _error(f"--run '{run_dir}' has no selection.jsonl (the logged candidates and picks); {allowed}")
    saved = checkpoint_steps(run)
    if not saved:
        raise _error(f"--run '{run_dir}' has no checkpoints (no checkpoints/step_N with shape.json); {allowed}")
    records = read_selections(run)
    if records and all(r.get("validation") is None for r in records.values()):
        raise _error(f"--run '{run_dir}' logged no validation samples (a method without a Gram, e.g. "
                     f"selection.method=regular): there is no proxy to compare with; {allowed}")
    usable = [s for s in saved if s + 1 in records and records[s + 1].get("validation") is not None]
    listed = ", ".join(str(s) for s in usable) or "none"
    if steps_text is not None:
        try:
            wanted = sorted({int(x) for x in str(steps_text).split(",") if x.strip()})
        except ValueError:
            raise _error(f"--steps '{steps_text}' is not a list of integers; allowed: e.g. --steps 25,50") from None
        for s in wanted:
            if s not in saved:
                raise _error(f"--steps {s}: '{run_dir}' has no checkpoint step_{s}; allowed: checkpoint steps "
                             f"with a logged selection after them: {listed}")
            if s not in usable:
                raise _error(f"--steps {s}: '{run_dir}' logged no selection at step {s + 1} (made from "
                             f"step_{s}'s weights); allowed: {listed}")
        chosen = wanted
    elif every is not None:
        if every < 1:
            raise _error(f"--every {every}; allowed: >= 1")
        chosen = [s for s in usable if s % every == 0]
    else:
        chosen = usable
    if not chosen:
        raise _error(f"--run '{run_dir}': no checkpoint to measure (checkpoint steps {saved}, each needs a "
                     f"selection logged at the step after it); allowed: checkpoint steps {listed}")
    return run, records, chosen


# ---- gradients and their products ----------------------------------------------------------------
def mean_gradient(model, params: list, tokens, batch: int) -> list:
    """The gradient of the mean over samples of each sample's mean token loss (tokens [n, seq + 1])."""
    import torch

    from megatron_greats.model.gpt import per_sample_losses

    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    n = tokens.shape[0]
    for chunk in tokens.split(batch):
        logits = model(chunk[:, :-1].contiguous())
        loss = per_sample_losses(logits, chunk[:, 1:].contiguous()).sum() / n
        for acc, g in zip(total, torch.autograd.grad(loss, params)):
            acc += g.double()
    return total


def adam_diagonal(state: dict, order: list, params: list, candidates: list, beta2: float, eps: float) -> list:
    """Adam's D of the coming step per parameter: 1 / (sqrt(v_t / (1 - beta2^(t+1))) + eps) with
    v_t = beta2 v + (1 - beta2) C^2 (C: the candidates' mean gradient; training/preconditioning.py)."""
    import torch

    index = {id(p): i for i, p in enumerate(order)}
    t = max(int(s["step"]) for s in state.values())
    out = []
    for p, c in zip(params, candidates):
        v = state[index[id(p)]]["exp_avg_sq"].double()
        v_t = beta2 * v + (1.0 - beta2) * c.square()
        out.append(1.0 / ((v_t / (1.0 - beta2 ** (t + 1))).sqrt() + eps))
    return out


def products(grads: dict, members: list, diagonal=None) -> dict:
    """Norms, gains and cosines over the parameters `members` (indices); `diagonal`: D on the selections' side."""
    def dot(a, b):
        return float(sum(float((a[i] * b[i]).sum()) for i in members))

    def scaled(name):
        g = grads[name]
        return g if diagonal is None else [x * d for x, d in zip(g, diagonal)]

    present = [name for name in GROUPS if grads.get(name) is not None]
    vectors = {name: scaled(name) if name in SELECTIONS else grads[name] for name in present}
    norm = {name: math.sqrt(dot(v, v)) for name, v in vectors.items()}
    gain, cos = {}, {}
    for y in SELECTIONS:
        if y not in vectors:
            gain[y] = cos[y] = None
            continue
        gain[y] = {x: dot(vectors[y], vectors[x]) for x in TARGETS}
        cos[y] = {x: _ratio(gain[y][x], norm[y] * norm[x]) for x in TARGETS}
    between = {f"{a}~{b}": _ratio(dot(vectors[a], vectors[b]), norm[a] * norm[b])
               for a, b in (("V_step", "S"), ("V_step", "V"), ("S", "V"))}
    return {"norm": norm, "gain": gain, "cos": cos, "targets_cos": between,
            "ratio_P_R": {x: _ratio(gain["P"][x], gain["R"][x]) for x in TARGETS},
            "ratio_P_C": {x: _ratio(gain["P"][x], gain["C"][x]) for x in TARGETS},
            "lift": {x: cos["P"][x] - cos["R"][x] for x in TARGETS},
            "lift_tgt": {x: None if cos["P_tgt"] is None or cos["R_tgt"] is None
                         else cos["P_tgt"][x] - cos["R_tgt"][x] for x in TARGETS}}


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else math.nan


# ---- the run -------------------------------------------------------------------------------------
def random_control(candidates: np.ndarray, k: int, seed: int, step: int, stream: int = _RANDOM_STREAM) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([seed, step, stream]))
    return np.sort(rng.choice(candidates, size=k, replace=False))


def view_members(cfg, model, names: list, params: list) -> dict:
    """{view: parameter indices}: all trainable ones, and those the run's scoring covered (if fewer)."""
    from megatron_greats.ghost.recorder import matches
    from megatron_greats.model.gpt import parameters_below_top_layers

    sel = cfg.selection
    below = parameters_below_top_layers(model, sel.score_layers) if sel.score_layers is not None else set()
    scored = [i for i, (n, p) in enumerate(zip(names, params)) if p not in below and not matches(n, sel.score_exclude)]
    views = {"all": list(range(len(params)))}
    if scored and len(scored) < len(params):
        views["scored"] = scored
    return views


def optimizer_state(cfg, folder: Path, model, params: list) -> tuple:
    """(state, parameter order) of the checkpoint's AdamW, or (None, why not)."""
    import torch

    from megatron_greats.training.deepspeed_config import parameter_groups

    if cfg.train.optimizer != "adamw":
        return None, f"train.optimizer={cfg.train.optimizer}: no Adam preconditioner"
    if cfg.zero.stage != 0 or cfg.parallel.pipeline > 1 or cfg.train.precision != "fp32":
        return None, ("the Adam views read torch's AdamW state of a ZeRO-0, fp32, one-stage checkpoint "
                      "(mp_rank_00_model_states.pt); this run keeps it elsewhere: left out")
    saved = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    state = (saved.get("optimizer") or {}).get("state") or {}
    order = [p for group in parameter_groups(model, cfg.train.weight_decay) for p in group["params"]]
    if len(state) != len(order) or any(tuple(state[i]["exp_avg_sq"].shape) != tuple(p.shape)
                                       for i, p in enumerate(order)):
        return None, f"'{folder}' holds no AdamW state matching the model's parameters: Adam views left out"
    return state, order


def run(run_dir: str, steps_text=None, every=None, out_file=None, overrides=(), sel_samples=None,
        val_samples=None, seed: int = 0, batch: int = 16, adam: bool = True) -> dict:
    from megatron_greats.config import load_config
    from megatron_greats.parallel.state import distributed_session
    from megatron_greats.training.checkpoint import model_from_checkpoint
    from megatron_greats.training.trainer import start_up

    run, records, chosen = plan(run_dir, steps_text, every)
    for name, value in (("--sel-samples", sel_samples), ("--val-samples", val_samples), ("--batch", batch)):
        if value is not None and value < 1:
            raise _error(f"{name} {value}; allowed: >= 1")
    out = Path(out_file) if out_file is not None else run / "proxy_probe.json"
    if out.is_dir():
        raise _error(f"--out '{out}' is a folder; allowed: a file name (the JSON report)")
    saved = load_config(str(run / "config.yaml"), list(overrides), world_size=cfg_world(run))
    cfg = load_config(str(run / "config.yaml"), [*overrides, "parallel.pipeline=1"], world_size=cfg_world(run))
    if cfg.parallel.tensor != 1:
        raise _error(f"--run '{run_dir}' was trained at parallel.tensor={cfg.parallel.tensor}; allowed: runs at "
                     "tensor size 1 (the probe runs the model in one process)")
    if not cfg.method.needs_gram:
        raise _error(f"--run '{run_dir}' ran selection.method={cfg.selection.method}, which scores against no "
                     "validation samples; allowed: a Gram method (e.g. greats)")
    notes, report_steps = [], []
    started = time.time()
    with distributed_session(cfg.parallel.distributed_timeout_minutes):
        data, layout = start_up(cfg)
        target = data.train.domain_names.index(data.target_domain) \
            if data.target_domain in data.train.domain_names else None
        sel_ids = np.arange(len(data.selection) if sel_samples is None else min(sel_samples, len(data.selection)))
        val_ids = np.arange(len(data.val) if val_samples is None else min(val_samples, len(data.val)))
        for position, s in enumerate(chosen, start=1):
            t0 = time.time()
            folder = run / "checkpoints" / f"step_{s}"
            model = model_from_checkpoint(cfg, data.vocab_size, layout, folder, "--run").eval()
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            names, params = [n for n, _ in named], [p for _, p in named]
            record = records[s + 1]
            candidates, selected = np.asarray(record["candidates"]), np.asarray(record["selected"])
            k = len(selected)
            control = random_control(candidates, k, seed, s + 1)
            ids = {"P": (data.train, selected), "R": (data.train, control), "C": (data.train, candidates),
                   "V_step": (data.selection, np.asarray(record["validation"])),
                   "S": (data.selection, sel_ids), "V": (data.val, val_ids)}
            target_control = None
            if target is not None:
                ids["P_tgt"] = (data.train, selected[data.train.domains(selected) == target])
                ids["C_tgt"] = (data.train, candidates[data.train.domains(candidates) == target])
                target_control = random_control(ids["C_tgt"][1], len(ids["P_tgt"][1]), seed, s + 1,
                                                stream=_TARGET_STREAM)
                ids["R_tgt"] = (data.train, target_control)
            grads = {name: mean_gradient(model, params, split.get(i), batch) if len(i) else None
                     for name, (split, i) in ids.items()}
            views = view_members(cfg, model, names, params)
            measured = {view: products(grads, members) for view, members in views.items()}
            state, order = optimizer_state(saved, folder, model, params) if adam else (None, None)
            if state is None and order is not None and order not in notes:
                notes.append(order)
            if state is not None:
                d = adam_diagonal(state, order, params, grads["C"], cfg.train.beta2, cfg.train.adam_eps)
                for view, members in views.items():
                    measured[f"{view}+adam"] = products(grads, members, diagonal=d)
            window = record.get("score_window")
            if window is not None:  # what the selector saw: its window of every sample, its parameters, its D
                offset, length = window
                cut = {name: mean_gradient(model, params, split.get(i)[:, offset:offset + length + 1], batch)
                       if len(i) else None for name, (split, i) in ids.items()}
                d = None
                if state is not None and record.get("preconditioner") == "adam":
                    d = adam_diagonal(state, order, params, cut["C"], cfg.train.beta2, cfg.train.adam_eps)
                measured["window"] = products(cut, views.get("scored", views["all"]), diagonal=d)
            report_steps.append({
                "step": s, "selection_step": s + 1, "k": k, "N": len(candidates), "m": len(record["validation"]),
                "eta": record.get("eta"), "score_window": record.get("score_window"),
                "preconditioner": record.get("preconditioner"),
                "shares": {"selected": shares(data.train, selected), "candidates": shares(data.train, candidates)},
                "target_selected": None if target is None else int(len(ids["P_tgt"][1])),
                "target_candidates": None if target is None else int(len(ids["C_tgt"][1])),
                "random_control": control.tolist(),
                "random_target_control": None if target_control is None else target_control.tolist(),
                "views": measured, "seconds": time.time() - t0})
            del model, grads
            print(f"megatron_greats: proxy: step_{s} ({position} of {len(chosen)}) measured in "
                  f"{time.time() - t0:.1f} s", file=sys.stderr, flush=True)
    view_names = sorted({v for r in report_steps for v in r["views"]}, key=VIEW_ORDER.index)
    report = {
        "run": str(run), "method": cfg.selection.method, "seed": cfg.seed, "probe_seed": seed,
        "target_domain": data.target_domain, "domains": list(data.train.domain_names),
        "selection": {key: getattr(cfg.selection, key) for key in
                      ("candidates", "val_batch", "score_window", "score_layers", "score_exclude", "preconditioner",
                       "eta", "update")},
        "splits": {"train": len(data.train), "selection": len(data.selection), "val": len(data.val)},
        "S_samples": int(len(sel_ids)), "V_samples": int(len(val_ids)), "batch": batch,
        "measured_steps": chosen, "views": view_names, "notes": notes, "seconds": time.time() - started,
        "summary": {view: summary(report_steps, view) for view in view_names}, "steps": report_steps,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    report["written"] = [str(out), str(out.with_suffix(".md"))]
    return report


def cfg_world(run: Path) -> int:
    """The run's world size (selection keys resolve per replica: k and N of replica 0 as logged)."""
    saved = checkpoint_steps(run)
    shape = json.loads((run / "checkpoints" / f"step_{saved[-1]}" / "shape.json").read_text())
    return int(shape.get("world_size", 1))


def shares(split, ids: np.ndarray) -> dict:
    counts = np.bincount(split.domains(ids), minlength=len(split.domain_names))
    return {name: float(c) / len(ids) for name, c in zip(split.domain_names, counts)}


def _median(values) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def summary(steps: list, view: str) -> dict:
    """Medians over all measured steps, the first half and the second half (the middle one in both halves
    when their count is odd)."""
    half = (len(steps) + 1) // 2
    parts = {"all": steps, "early": steps[:half], "late": steps[len(steps) - half:]}
    out = {}
    for part, chosen in parts.items():
        rows = [r["views"][view] for r in chosen if view in r["views"]]
        if not rows:
            out[part] = None
            continue
        entry = {metric: {x: _median(r[metric][x] for r in rows) for x in TARGETS} for metric in RATIO_METRICS}
        entry["cos"] = {y: {x: _median(r["cos"][y][x] if r["cos"][y] else None for r in rows) for x in TARGETS}
                        for y in SELECTIONS}
        entry["targets_cos"] = {pair: _median(r["targets_cos"][pair] for r in rows) for pair in rows[0]["targets_cos"]}
        entry["steps"] = [r["step"] for r in chosen]
        out[part] = entry
    return out


def _f(x, digits=3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def markdown(r: dict) -> str:
    primary = "all+adam" if "all+adam" in r["views"] else "all"
    tgt = r["target_domain"]
    lines = [f"Proxy probe: `{r['run']}` ({r['method']}, seed {r['seed']}; target {tgt})", "",
             f"Per checkpoint step s, the selection logged at s + 1 replayed with step_s's weights; full-sequence "
             f"mean-loss gradients. P: the k picks; R: a random k of the same N candidates (probe seed "
             f"{r['probe_seed']}); C: all N; V_step: the step's m validation samples; S: {r['S_samples']} of the "
             f"selection split's {r['splits']['selection']} samples; V: {r['V_samples']} of val's "
             f"{r['splits']['val']} (test is never read). lift = cos(P, X) - cos(R, X); lift_tgt = cos(P_tgt, X) - "
             "cos(R_tgt, X): the picks of the target domain against as many random target-domain candidates.", "",
             f"Per step, view {primary}:", "",
             f"| step | {tgt} share picks / cand. | P/R V_step | P/R S | P/R V | lift V_step | lift S | lift V | "
             "cos P,V | cos R,V | cos C,V | cos S,V |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in r["steps"]:
        v = s["views"][primary]
        share = " / ".join(f"{s['shares'][who].get(tgt, math.nan):.2f}" for who in ("selected", "candidates"))
        lines.append(f"| {s['step']} | {share} | " + " | ".join(_f(v["ratio_P_R"][x], 2) for x in TARGETS) + " | "
                     + " | ".join(_f(v["lift"][x]) for x in TARGETS) + " | "
                     + " | ".join(_f(v["cos"][y]["V"]) for y in ("P", "R", "C"))
                     + f" | {_f(v['targets_cos']['S~V'])} |")
    lines += ["", "Medians over steps (all / early half / late half):", "",
              "| view | part | P/R V_step | P/R S | P/R V | P/C V_step | P/C S | P/C V | lift V_step | lift S | "
              "lift V | lift_tgt V_step | lift_tgt S | lift_tgt V | cos V_step,V | cos S,V |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for view in r["views"]:
        for part in ("all", "early", "late"):
            e = r["summary"][view][part]
            if e is None:
                continue
            lines.append(f"| {view} | {part} ({len(e['steps'])}) | "
                         + " | ".join(_f(e[m][x], 2 if m.startswith("ratio") else 3) for m in RATIO_METRICS
                                      for x in TARGETS)
                         + f" | {_f(e['targets_cos']['V_step~V'])} | {_f(e['targets_cos']['S~V'])} |")
    lines += ["", "Views: all: every trainable parameter; scored: those the run scored (selection.score_layers, "
                  "score_exclude); +adam: the selections' side times Adam's D of the coming step from the "
                  "checkpoint's optimizer state; window: what the selector saw, every sample cut to the logged "
                  "score_window, the scored parameters, D (if any) from the window's candidate mean."]
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"
