"""The scoring pass's peak memory, estimated before the first step, against the memory there is.

A scoring pass holds the activations of all N + m scored samples at once (docs/performance.md,
Memory): selection.val_batch=5000 on the embedded default grew a process to 23 GB until the
kernel's OOM killer ended it, which can take other processes with it. So after the engine is built
(its weights are then resident, and no longer counted as available) and before the first step and
anything written, check_scoring_memory() estimates the pass's peak: a run that would not fit ends with
one line naming the estimate, the memory available and the keys that reduce it; otherwise rank 0
prints the estimate at start.

The estimate counts, per token of a scored sample, on this rank (its tensor-parallel shard and
pipeline stage), in the model's dtype:
  A  what autograd keeps for the backward w.r.t. activations (parameters are frozen, so no layer keeps
     its input for a weight gradient), per transformer layer: q, k, v, the attention output and the
     MLP's hidden activation, (4h + f) / tp (gpt2), or (6h + 3f) / tp (llama: RoPE's rotated q and k,
     SwiGLU's gate, its activation and the up projection);
  I  the layer inputs the GhostRecorder keeps for the captured parameters (from the recorded layers'
     weight shapes: h per norm, the input width per linear layer);
  G  the output gradients it keeps (the output width of each recorded layer that captures a parameter;
     the logits' gradient is the softmax's own storage, so it is not counted again);
  V  the softmax over the vocabulary / tp, in float32 (megatron-core forms it in place in the logits);
  Bw the backward of one layer: about its own A + G / L of gradients in flight (its inputs are the I
     already counted; with one scored layer, counting them again put the estimate 1.5 x over).
One micro-batch of all S = N + m samples: S T (L A + I + V + Bw) under two_pass (each parameter's
operands are reduced and freed as the backward reaches it), plus S T G under single_pass (the update
keeps them). Micro-batches of b samples: the recorder keeps I + G of every sample until the Gram, and
one micro-batch's activations come on top, S T (I + G) + b T (L A + V + Bw); under single_pass also the
per-sample gradient blocks it keeps where they take no more memory than the operands
(products.blocks_fit), which the Gram forms before it frees the operands. Then the Gram (S^2
floats), the ghost products' working tile (at most products.DEFAULT_CHUNK_ELEMENTS floats) and a fixed
FIRST_PASS_SCRATCH. The losses-only methods (maxloss, rholoss) run a forward without gradients:
S T (V + A). What the first optimizer step allocates comes on top where the engine has not allocated
it yet (ZeRO stage 0: the gradients and AdamW's two moments), and with selection.target_ema its
target: two copies of the scored parameters (G and a step's g_val).

Calibrated on CPU against the peak resident-memory increase of a process's first scoring pass
(Linux's high-water mark, reset before the pass): over 13 shapes (gpt2 and llama, both update modes,
with and without micro-batches, the embeddings left out of the score, one or two top layers over a
window, the prefilter; 53 to 212 MiB) the measured peak was 0.74-1.20 x the estimate.
tests/test_memory.py holds four of them to ESTIMATE_FACTOR. On an accelerator the same tensors are
counted in its memory (not measured there).
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass, replace
from typing import Optional

import torch

from megatron_greats.choices import ADAMW, BF16, LLAMA
from megatron_greats.errors import ConfigError
from megatron_greats.selection.catalog import SINGLE_PASS, TWO_PASS

# What a first pass allocates besides its tensors (allocator arenas, kernels' scratch), measured on CPU.
FIRST_PASS_SCRATCH = 16 << 20
# The factor the tests hold the estimate to: measured peak / estimate in [1 / 1.5, 1.5].
ESTIMATE_FACTOR = 1.5
FORWARD_ONLY = "forward"  # ScoringMemory.update of a losses-only pass (no backward, no update kept)


@dataclass(frozen=True)
class ScoringMemory:
    samples: int        # S: samples scored per step by this replica (N + m; N for losses-only methods)
    micro_batch: int    # samples per forward/backward of the pass
    tokens: int         # T
    update: str         # what the update keeps: SINGLE_PASS or TWO_PASS (or FORWARD_ONLY for losses only)
    scoring_pass: int   # bytes: the pass's peak over what is resident before it
    first_step: int     # bytes the first optimizer step allocates that the engine has not yet
    target: int = 0     # bytes of selection.target_ema's G and one step's g_val (training/target.py)
    method: str = ""    # phase gating: 'selection.early_method=X' or 'selection.method=Y', whose pass this is

    @property
    def total(self) -> int:
        return self.scoring_pass + self.first_step + self.target

    def describe(self) -> str:
        """e.g. '530 MiB per process: the scoring pass 520 MiB (N + m = 40 samples of 128 tokens at once,
        selection.update=single_pass), the first optimizer step 10 MiB'."""
        if self.update == FORWARD_ONLY:
            what = f"N = {self.samples} samples of {self.tokens} tokens, forward only"
        else:
            parts = f"in micro-batches of {self.micro_batch}" if self.micro_batch < self.samples else "at once"
            what = f"N + m = {self.samples} samples of {self.tokens} tokens {parts}, selection.update={self.update}"
        step = f", the first optimizer step {size(self.first_step)}" if self.first_step else ""
        if self.target:
            step += f", the target EMA {size(self.target)}"
        whose = f" of {self.method}" if self.method else ""
        return f"{size(self.total)} per process: the scoring pass{whose} {size(self.scoring_pass)} ({what}){step}"


def size(count: int) -> str:
    """Bytes for people: '23 MiB', '1.25 GiB', '2.10 TiB'."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{max(1, round(count / (1 << 20)))} MiB"


def _transformer_layers(module: torch.nn.Module) -> int:
    from megatron_greats.model.gpt import TransformerLayer

    return sum(isinstance(m, TransformerLayer) for m in module.modules())


def recorder_widths(recorder, vocab_local: int) -> tuple:
    """Per token, the elements the recorder keeps for its captured parameters: (layer inputs, output
    gradients, whether a recorded layer computes the logits (an output width of vocab_local), whether
    the gradients counted include the logits')."""
    from megatron_greats.ghost.layers import rule_for

    captured = recorder.captured
    captured_shapes = {tuple(p.shape) for p in captured}
    inputs = grads = 0
    logits = logits_captured = False
    for module in recorder.modules:
        own = rule_for(module).covers(module)
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            if hasattr(module, "embedding_dim"):  # torch's and megatron-core's embeddings: ids in, [T, d] out
                width_in, width_out = 0, weight.shape[1]
            elif weight.dim() == 1:  # a norm: its input, its output's gradient
                width_in = width_out = weight.shape[0]
            else:
                width_in, width_out = weight.shape[1], weight.shape[0]
            uses_captured = weight in captured
        elif hasattr(module, "output_size_per_partition") and hasattr(module, "input_size"):
            # a linear layer without a weight of its own (a tied output layer): the weight comes at call time
            width_in, width_out = module.input_size, module.output_size_per_partition
            uses_captured = (width_out, width_in) in captured_shapes
        else:
            continue
        computes_logits = width_out == vocab_local
        logits = logits or computes_logits
        if uses_captured:
            inputs += width_in
        if uses_captured or any(p in captured for p in own):
            grads += width_out
            logits_captured = logits_captured or computes_logits
    return inputs, grads, logits, logits_captured


def _activation_width(cfg) -> int:
    """A above: per token and transformer layer, what autograd keeps that the recorder does not."""
    h, f, tp = cfg.model.hidden_size, cfg.ffn_hidden_size, cfg.parallel.tensor
    return (6 * h + 3 * f) // tp if cfg.model.arch == LLAMA else (4 * h + f) // tp


def estimate_scoring_memory(cfg, scoring, vocab_size: int, samples: int, gram: bool) -> ScoringMemory:
    """The peak of one scoring pass of `samples` samples through `scoring` (a ScoringPass), on this rank.
    vocab_size: the padded vocabulary (all tensor-parallel ranks together)."""
    from megatron_greats.ghost import products

    sel, T = cfg.selection, scoring_tokens(cfg)
    act = 2 if cfg.train.precision == BF16 else 4
    vocab_local = vocab_size // cfg.parallel.tensor
    layers = _transformer_layers(scoring.module)
    if gram and scoring.top_layers is not None:  # autograd keeps nothing below the scored layers
        layers = min(layers, scoring.top_layers)
    inputs, grads, logits, logits_captured = recorder_widths(scoring.recorder, vocab_local)
    # the float32 softmax, formed in place in the (float32 copy of the) logits
    vocab_bytes = vocab_local * (4 + (act if act != 4 else 0)) if logits else 0
    layer = _activation_width(cfg) * act
    if not gram:  # no backward: one layer's activations at a time
        return ScoringMemory(samples, samples, T, FORWARD_ONLY, samples * T * (vocab_bytes + layer) + FIRST_PASS_SCRATCH, 0)
    # the logits' gradient, if kept, is the softmax's storage
    logits_grads = vocab_local if logits_captured else 0
    # the backward of one layer: its activations' gradients and its output gradients, about its own size
    backward = layer + (grads - logits_grads) * act // max(layers, 1)
    micro = sel.score_micro_batch or samples
    keeps_all = scoring.recorder.keep_operands
    if micro >= samples:
        per_token = layers * layer + inputs * act + vocab_bytes + backward
        if keeps_all:  # every output gradient too
            per_token += (grads - logits_grads) * act
        peak = samples * T * per_token
    else:
        peak = samples * T * (inputs + grads) * act + micro * T * (layers * layer + vocab_bytes + backward)
        if keeps_all:  # the Gram forms the per-sample blocks the update keeps before it frees their operands
            peak += samples * sum(4 * p.numel() for p in scoring.recorder.captured
                                  if p.dim() == 2 and 4 * p.numel() <= T * sum(p.shape) * act)
    largest = max((p.numel() for p in scoring.recorder.captured), default=0)
    tiles = min(products.DEFAULT_CHUNK_ELEMENTS, samples * largest) * 4
    peak += samples * samples * 4 + tiles + FIRST_PASS_SCRATCH
    return ScoringMemory(samples, micro, T, SINGLE_PASS if keeps_all else TWO_PASS, peak, 0)


def scoring_tokens(cfg) -> int:
    """Tokens per sample in the scoring pass: selection.score_window, or the whole sequence."""
    window = cfg.selection.score_window
    return cfg.model.seq_len if window is None or not cfg.method.reads("score_window") else window


def first_step_bytes(cfg, module: torch.nn.Module) -> int:
    """What the first optimizer step allocates that the engine has not yet: under ZeRO stage 0 the
    gradients (4 bytes per parameter) and AdamW's two moments (8); ZeRO allocates its partitions when
    the engine is built."""
    if cfg.zero.stage != 0:
        return 0
    per_parameter = 4 + (8 if cfg.train.optimizer == ADAMW else 0)
    return per_parameter * sum(p.numel() for p in module.parameters() if p.requires_grad)


def estimate_for_step(strategy, vocab_size: int, world_size: int) -> Optional[ScoringMemory]:
    """The estimate for a step strategy (training/step.py), or None where it runs no scoring pass. A
    phased one (PhasedStep): the larger of its strategies' (one step's pass runs at a time; each
    frees what it holds at the end of its step)."""
    estimates = []
    phased = len(strategy.strategies()) > 1
    for part in strategy.strategies():
        cfg, scoring = part.cfg, part.scoring
        if scoring is None:
            continue
        gram = part.selector.needs_gram
        # the prefilter's forward over all N holds less than the M + m samples' pass with a backward
        samples = cfg.num_scored(world_size) + cfg.selection.val_batch if gram else cfg.num_candidates(world_size)
        estimates.append(replace(estimate_scoring_memory(cfg, scoring, vocab_size, samples, gram),
                                 first_step=first_step_bytes(cfg, scoring.module), target=target_bytes(part),
                                 method=f"{cfg.method_key}={cfg.selection.method}" if phased else ""))
    return max(estimates, key=lambda e: e.total, default=None)


def target_bytes(strategy) -> int:
    """selection.target_ema: G (kept from step to step) and the step's g_val (until the selection stands),
    each one copy of the scored parameters of this rank in the Gram's dtype. Counted for every scored
    parameter (tensor ranks other than 0 keep none of the replicated ones: an upper bound there)."""
    target = getattr(strategy, "target", None)
    if target is None:
        return 0
    scored = strategy.scoring.parameters()
    return sum(p.numel() * target.bytes_per_element(p.dtype) for p in scored)


# ---- the memory there is ------------------------------------------------------------------------------
def _cgroup_room() -> Optional[int]:
    """What this process's cgroup (v2, or v1) still allows, where it sets a limit."""
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit) as f:
                text = f.read().strip()
            with open(usage) as f:
                used = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if text.isdigit() and int(text) < 1 << 60:  # v1 writes a huge number for "no limit"
            return max(0, int(text) - used)
        return None
    return None


def host_available() -> int:
    """Host RAM available to new allocations: MemAvailable (/proc/meminfo, else psutil), and at most
    what a cgroup memory limit leaves."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    room = _cgroup_room()
    return available if room is None else min(available, room)


def available_memory() -> tuple:
    """(bytes available, what it is): host RAM on CPU, else the free memory of this process's device."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return host_available(), "host RAM"
    return int(accelerator.available_memory(accelerator.current_device())), \
        f"free memory on {accelerator.current_device_name()}"


# ---- the check ------------------------------------------------------------------------------------------
REDUCING_KEYS = ("selection.score_micro_batch (score the N + m samples in parts)", "selection.val_batch",
                 "selection.candidates")


def memory_verdict(reports: list) -> Optional[str]:
    """reports: per rank (host, estimate bytes, available bytes, what memory, its estimate described).
    Processes on one host share its RAM; each process has a device of its own. The error text where
    some memory would be exceeded (the most exceeded), else None: the same text on every rank."""
    groups = {}  # one memory -> the (estimate, available, what, description) of each process using it
    for rank, (host, estimate, available, what, described) in enumerate(reports):
        key = (host, what) if what == "host RAM" else (host, what, rank)
        groups.setdefault(key, []).append((estimate, available, what, described))

    def excess(group: list) -> int:
        return sum(g[0] for g in group) - min(g[1] for g in group)
    group = max(groups.values(), key=excess)
    if excess(group) <= 0:
        return None
    count, total, room = len(group), sum(g[0] for g in group), min(g[1] for g in group)
    _, _, what, described = max(group)  # the process with the largest estimate
    need = f"estimated {described}" if count == 1 else \
        f"the {count} processes on one machine need an estimated {size(total)} together (largest: {described})"
    return (f"the scoring pass would not fit in memory: {need}; {size(room)} of {what} is available; allowed: "
            f"settings whose estimate fits, e.g. a smaller {', '.join(REDUCING_KEYS[:-1])} or {REDUCING_KEYS[-1]}")


def check_scoring_memory(strategy, vocab_size: int, layout, available=None) -> Optional[ScoringMemory]:
    """Estimate the scoring pass of a step strategy (of a phased one, the larger pass); raise ConfigError
    (the same line on every rank) where it exceeds the memory available, else print the estimate on
    rank 0. available: (bytes, what) to use instead of what this machine reports (tests)."""
    import torch.distributed as dist

    estimate = estimate_for_step(strategy, vocab_size, layout.world_size)
    if estimate is None:
        return None
    room, what = available if available is not None else available_memory()
    report = (socket.gethostname(), estimate.total, room, what, estimate.describe())
    reports = [report]
    if dist.is_initialized() and dist.get_world_size() > 1:
        reports = [None] * dist.get_world_size()
        dist.all_gather_object(reports, report)
    problem = memory_verdict(reports)
    if problem:
        raise ConfigError(problem)
    if layout.is_logging_rank:
        print(f"megatron_greats: memory: estimated peak {estimate.describe()}; {size(room)} of {what} is "
              "available", file=sys.stderr, flush=True)
    return estimate
