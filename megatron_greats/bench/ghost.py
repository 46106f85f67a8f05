"""Benchmark: GhostRecorder against torch.func per-sample gradients (vmap of grad) followed by a Gram.

Both sides compute the same B x B matrix for the same model and batch: the recorder with a capture
(forward, backward w.r.t. activations, gram()), the reference with vmap(grad) over samples, flattening
and G G^T. Each measurement runs in a fresh process: peak memory is the rise of the process' peak RSS
(CPU) or of the accelerator's peak allocation above what the model and batch already hold.

A third measurement, the floor, is the forward and the backward w.r.t. activations alone (no weight
gradient, no product). Any exact method needs at least that much: every per-sample gradient is built
from the layer inputs of a forward and the output gradients of a backward. So torch.func / floor is
the largest speed-up (and memory ratio) any exact method can reach at that point.

A fourth, `ordinary`, is a plain training backward on the same batch: forward, backward of the mean
loss with weight gradients. Exact per-sample products cost about one weight-gradient pass, so the
recorder's time and peak memory are reported against it (ghost/step; targets <= 1.15 and <= 1.3).
Its time ratio is measured with the two called in turn in one process (measure_pairs): a call takes
tens of milliseconds at the smallest point, and on a shared machine the speed drifts between two
processes by as much as the ratio's margin.

The same process then times the kernels alone (kernel_parts): for every nn.Linear weight, the ordinary
step's weight-gradient GEMM against the recorder's own per-sample GEMMs and Gram of them, on operands
of the point's shapes, with none of the capture's bookkeeping. `kernel floor` = 1 + (per-sample +
Gram - weight gradient) / ordinary step: what ghost/step would be if the recorder's only cost were
those kernels in place of the weight gradients. ghost/step close to it leaves nothing but the
kernels' speed to gain.

The recorder is built once per measurement, before the timed calls, as the trainer builds one per run;
each call captures, forms the Gram and releases what the capture held, as a training step does.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from megatron_greats.bench import rotated, rss_bytes
from megatron_greats.ghost import GhostRecorder, products  # imported before any baseline is taken
from megatron_greats.ghost.capture import frozen_parameters
from megatron_greats.ghost.reduction import GramSum
from megatron_greats.parallel import cpu_runtime

DEFAULT_POINTS = ((8, 128, 128), (32, 256, 256), (16, 512, 256))


class BenchTransformer(nn.Module):
    """Pre-norm transformer of nn.Linear layers, tied embeddings, width d, sequence T."""

    def __init__(self, d: int, seq: int, layers: int = 2, vocab: int = 1024, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict({"norm1": nn.LayerNorm(d), "qkv": nn.Linear(d, 3 * d),
                                              "proj": nn.Linear(d, d), "norm2": nn.LayerNorm(d),
                                              "up": nn.Linear(d, 4 * d), "down": nn.Linear(4 * d, d)}))
        self.final = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):  # [B, T] -> logits [B, T, V]
        b, t = tokens.shape
        h = self.embed(tokens) + self.pos(torch.arange(t, device=tokens.device).expand(b, t))
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["norm1"](h)).chunk(3, dim=-1)
            q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
            h = h + blk["proj"](att)
            h = h + blk["down"](F.gelu(blk["up"](blk["norm2"](h))))
        return self.head(self.final(h))


def losses_of(logits, labels):
    return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(dim=1)


def ghost_gram(model, inputs, labels, recorder: GhostRecorder = None):
    """recorder: one built for this model beforehand (as the trainer builds one per run), else a new one."""
    rec = recorder if recorder is not None else GhostRecorder(model)
    with rec.capture() as cap:
        cap.backward(losses_of(model(inputs), labels))
    gram = cap.gram()
    cap.release()  # as the trainer does after each step
    return gram


def func_gram(model, inputs, labels):
    params = {n: p.detach() for n, p in model.named_parameters()}

    def one(p, x, y):
        return losses_of(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))[0]

    per_sample = vmap(grad(one), in_dims=(None, 0, 0))(params, inputs, labels)
    flat = torch.cat([g.reshape(inputs.shape[0], -1) for g in per_sample.values()], dim=1)
    return flat @ flat.T


def activation_pass(model, inputs, labels):
    """The floor: forward, then backward w.r.t. activations only (parameters frozen, nothing formed)."""
    roots = []

    def root(module, args, out):  # the token embedding's output: backward runs through every layer to it
        roots.append(out.detach().requires_grad_(True))
        return roots[-1]

    handle = model.embed.register_forward_hook(root)
    try:
        with frozen_parameters(model.parameters()):
            losses = losses_of(model(inputs), labels)
            (grad,) = torch.autograd.grad(losses.sum(), roots)
    finally:
        handle.remove()
    return grad


def ordinary_step(model, inputs, labels):
    """An ordinary training backward on the same batch: forward, backward of the mean loss with weight
    gradients (what the exact per-sample products should cost about as much as)."""
    model.zero_grad(set_to_none=True)
    loss = losses_of(model(inputs), labels).mean()
    loss.backward()
    return loss.detach()


METHODS = {"ghost": ghost_gram, "torch.func": func_gram, "floor": activation_pass, "ordinary": ordinary_step}
METHODS_ORDER = tuple(METHODS)


# A point that takes tens of milliseconds is timed over more calls than `repeats`, so that its median
# is not one scheduler hiccup away from another value: calls go on until min_seconds are spent.
DEFAULT_MIN_SECONDS = 1.0
MAX_CALLS = 200


def _point_setup(b: int, t: int, d: int) -> tuple:
    """(accelerator, device, model, inputs, labels) of one point, the same in every process."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    device = torch.device(acc.current_device_name())
    if device.type == "cpu":
        cpu_runtime.apply()  # as the step benchmark and training do (every method alike)
    torch.manual_seed(0)
    model = BenchTransformer(d, t).to(device)
    tokens = torch.randint(0, 1024, (b, t + 1), device=device)
    return acc, device, model, tokens[:, :-1], tokens[:, 1:]


def _timed_call(fn, acc, on_cpu: bool, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    if not on_cpu:
        acc.synchronize()
    return time.perf_counter() - start


def _prepared(method: str, model):
    # the recorder is built once, as the trainer builds one per run: its set-up is not a step's cost
    return functools.partial(ghost_gram, recorder=GhostRecorder(model)) if method == "ghost" else METHODS[method]


def measure(method: str, b: int, t: int, d: int, repeats: int, min_seconds: float = DEFAULT_MIN_SECONDS) -> dict:
    """In this process: peak memory of the first call, then the median time of at least `repeats`
    calls, and of as many more as fit in min_seconds (at most MAX_CALLS)."""
    acc, device, model, inputs, labels = _point_setup(b, t, d)
    fn = _prepared(method, model)
    on_cpu = device.type == "cpu"
    if on_cpu:
        before = rss_bytes()
    else:
        acc.synchronize()
        acc.reset_peak_memory_stats()
        before = acc.memory_allocated()
    result = fn(model, inputs, labels)
    if on_cpu:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    else:
        acc.synchronize()
        peak = acc.max_memory_allocated() - before
    times, spent = [], 0.0
    while len(times) < repeats or (spent < min_seconds and len(times) < MAX_CALLS):
        times.append(_timed_call(fn, acc, on_cpu, model, inputs, labels))
        spent += times[-1]
    return {"method": method, "B": b, "T": t, "d": d, "seconds": statistics.median(times),
            "seconds_spread": [min(times), max(times)], "calls": len(times), "peak_bytes": max(int(peak), 1),
            "gram_trace": float(torch.diagonal(result).sum()) if result.dim() == 2 else None, "device": str(device)}


def measure_pairs(b: int, t: int, d: int, repeats: int, min_seconds: float = DEFAULT_MIN_SECONDS) -> dict:
    """In this process: the recorder and the ordinary step called in turn on the same model and batch,
    at least `repeats` pairs and as many more as fit in min_seconds (at most MAX_CALLS); the median of
    the pairs' time ratios. A drift of the machine's speed (other tenants, clock, memory state) falls
    on both calls of a pair alike; between the separate processes of `measure` it does not."""
    acc, device, model, inputs, labels = _point_setup(b, t, d)
    ghost, on_cpu = _prepared("ghost", model), device.type == "cpu"
    ghost(model, inputs, labels)  # the first calls allocate what later calls reuse: not timed
    ordinary_step(model, inputs, labels)
    ratios, ordinary, spent = [], [], 0.0
    while len(ratios) < repeats or (spent < min_seconds and len(ratios) < MAX_CALLS):
        g = _timed_call(ghost, acc, on_cpu, model, inputs, labels)
        o = _timed_call(ordinary_step, acc, on_cpu, model, inputs, labels)
        ratios.append(g / o)
        ordinary.append(o)
        spent += g + o
    kernels = {**kernel_parts(model, b, t, repeats, acc, on_cpu), "ordinary_step": statistics.median(ordinary)}
    return {"B": b, "T": t, "d": d, "ratio": statistics.median(ratios), "ratio_spread": [min(ratios), max(ratios)],
            "pairs": len(ratios), "kernels": kernels, "kernel_floor": kernel_floor(kernels)}


def kernel_floor(kernels: dict) -> float:
    """ghost/step if the recorder cost the ordinary step with its weight-gradient GEMMs replaced by the
    per-sample GEMMs and their Gram (seconds from kernel_parts and the pairs' ordinary step)."""
    extra = kernels["per_sample"] + kernels["gram"] - kernels["weight_gradient"]
    return 1 + extra / kernels["ordinary_step"]


def kernel_parts(model, b: int, t: int, repeats: int, acc, on_cpu: bool) -> dict:
    """Seconds per call, summed over the model's nn.Linear weights (each shape timed once, median of
    `repeats` calls): the ordinary step's weight-gradient GEMMs (K = B T), the recorder's per-sample
    GEMMs (products.materialised_blocks, K = T) and their Gram (GramSum, as the recorder adds each tile)."""
    device, dtype = next(model.parameters()).device, torch.float32
    shapes = collections.Counter(tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear))
    parts = {"weight_gradient": 0.0, "per_sample": 0.0, "gram": 0.0}
    for (rows, cols), count in shapes.items():
        inputs = torch.randn(b, t, cols, device=device, dtype=dtype)
        grads = torch.randn(b, t, rows, device=device, dtype=dtype)
        uses = [products.Use(products.Kind.DENSE, rows, cols, slice(0, b), inputs, grads)]

        def weight_gradient():
            torch.mm(grads.reshape(-1, rows).T, inputs.reshape(-1, cols))

        def per_sample(gram=None):
            for tile in products.materialised_blocks(uses, b, dtype):
                if gram is not None:
                    gram.add_rows(tile.block.view(b, -1))

        def with_gram():
            per_sample(GramSum(b, False, dtype, device))

        seconds = {}
        for name, fn in (("weight_gradient", weight_gradient), ("per_sample", per_sample), ("with_gram", with_gram)):
            fn()  # the first call allocates
            seconds[name] = statistics.median(_timed_call(fn, acc, on_cpu) for _ in range(repeats))
        parts["weight_gradient"] += count * seconds["weight_gradient"]
        parts["per_sample"] += count * seconds["per_sample"]
        parts["gram"] += count * max(0.0, seconds["with_gram"] - seconds["per_sample"])
    return parts


def _one(method: str, b: int, t: int, d: int, repeats: int, min_seconds: float) -> dict:
    """method: one of METHODS, or "pairs" (measure_pairs), in a fresh process."""
    cmd = [sys.executable, "-m", "megatron_greats.bench", "ghost", "--one", method, str(b), str(t), str(d),
           "--repeats", str(repeats), "--min-seconds", str(min_seconds)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"{method} at B={b} T={t} d={d} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _merged(runs: list) -> dict:
    """One method's measurements over rounds: median time, spread over every round, median peak memory.
    Every round's peak is a first call in a fresh process, yet it moves from process to process (by
    64 MiB of 500 at B=32, T=256, d=256, in one process of six): a median of rounds is not one draw."""
    merged = dict(runs[0])
    merged["seconds"] = statistics.median(r["seconds"] for r in runs)
    merged["seconds_spread"] = [min(r["seconds_spread"][0] for r in runs), max(r["seconds_spread"][1] for r in runs)]
    merged["peak_bytes_per_round"] = [r["peak_bytes"] for r in runs]
    merged["peak_bytes"] = int(statistics.median(merged["peak_bytes_per_round"]))
    return merged


def run(points=DEFAULT_POINTS, repeats: int = 3, json_path=None, rounds: int = 1,
        min_seconds: float = DEFAULT_MIN_SECONDS) -> list:
    """Each round measures every method in a process of its own (time and memory), in an order rotated
    by one each round, then the recorder and the ordinary step in turn in one process (measure_pairs).
    ghost/step time is the median over rounds of the pairs' median ratio, with its range; the ratio of
    the separate processes' medians is reported beside it. Memory: the median of the rounds' peaks."""
    rows = []
    for b, t, d in points:
        per_round, pairs = [], []
        for index in range(rounds):
            order = rotated(METHODS_ORDER, index)
            per_round.append({method: _one(method, b, t, d, repeats, min_seconds) for method in order})
            pairs.append(_one("pairs", b, t, d, repeats, min_seconds))
        pair = {method: _merged([r[method] for r in per_round]) for method in METHODS_ORDER}
        g, f, floor, plain = pair["ghost"], pair["torch.func"], pair["floor"], pair["ordinary"]
        agree = math.isclose(g["gram_trace"], f["gram_trace"], rel_tol=1e-3)
        step_ratios = [p["ratio"] for p in pairs]
        floors = [p["kernel_floor"] for p in pairs]
        separate = [r["ghost"]["seconds"] / r["ordinary"]["seconds"] for r in per_round]
        rows.append({"B": b, "T": t, "d": d, "ghost": g, "torch.func": f, "floor": floor, "ordinary": plain,
                     "traces_agree": agree, "rounds": rounds,
                     # the recorder against an ordinary training step (targets: <= 1.15 time, <= 1.3 memory)
                     "ghost_over_ordinary_time": statistics.median(step_ratios),
                     "ghost_over_ordinary_time_range": [min(step_ratios), max(step_ratios)],
                     "ghost_over_ordinary_time_per_round": step_ratios,
                     "ghost_over_ordinary_pairs_per_round": [p["pairs"] for p in pairs],
                     "ghost_over_ordinary_time_separate": statistics.median(separate),
                     "ghost_over_ordinary_time_separate_per_round": separate,
                     # ghost/step if the recorder cost only its kernels (kernel_parts, module doc)
                     "ghost_over_ordinary_kernel_floor": statistics.median(floors),
                     "ghost_over_ordinary_kernel_floor_per_round": floors,
                     "kernels_per_round": [p["kernels"] for p in pairs],
                     "ghost_over_ordinary_memory": g["peak_bytes"] / plain["peak_bytes"],
                     "speedup": f["seconds"] / g["seconds"], "memory_ratio": f["peak_bytes"] / g["peak_bytes"],
                     # the most any exact method could reach here (see the module doc)
                     "speedup_ceiling": f["seconds"] / floor["seconds"],
                     "memory_ratio_ceiling": f["peak_bytes"] / floor["peak_bytes"]})
        print(_row(rows[-1]), flush=True)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(rows, fh, indent=2)
    return rows


HEADER = (f"{'B':>4} {'T':>5} {'d':>5} | {'ghost s':>9} {'func s':>9} {'floor s':>9} {'step s':>9} {'func/ghost':>10} "
          f"{'func/floor':>10} {'ghost/step':>10} | {'ghost MiB':>9} {'func MiB':>9} {'floor MiB':>9} {'step MiB':>9} "
          f"{'func/ghost':>10} {'func/floor':>10} {'ghost/step':>10} | same Gram")


def _row(r: dict) -> str:
    g, f, fl, o = r["ghost"], r["torch.func"], r["floor"], r["ordinary"]
    mib = 2 ** 20
    low, high = r["ghost_over_ordinary_time_range"]
    return (f"{r['B']:>4} {r['T']:>5} {r['d']:>5} | {g['seconds']:>9.3f} {f['seconds']:>9.3f} {fl['seconds']:>9.3f} "
            f"{o['seconds']:>9.3f} {r['speedup']:>9.1f}x {r['speedup_ceiling']:>9.1f}x "
            f"{r['ghost_over_ordinary_time']:>9.2f}x | {g['peak_bytes'] / mib:>9.1f} {f['peak_bytes'] / mib:>9.1f} "
            f"{fl['peak_bytes'] / mib:>9.1f} {o['peak_bytes'] / mib:>9.1f} {r['memory_ratio']:>9.1f}x "
            f"{r['memory_ratio_ceiling']:>9.1f}x {r['ghost_over_ordinary_memory']:>9.2f}x | "
            f"{'yes' if r['traces_agree'] else 'NO':>9} | "
            + (f"{low:.2f}-{high:.2f} ({r['rounds']} rounds)" if r["rounds"] > 1 else "one round")
            + f"; separate processes {r['ghost_over_ordinary_time_separate']:.2f}"
            + f"; kernel floor {r['ghost_over_ordinary_kernel_floor']:.2f}")
