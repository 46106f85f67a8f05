"""Run outputs on the logging rank: TensorBoard scalars and metrics.jsonl (one JSON object per logged step)."""

from __future__ import annotations

import contextlib
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch.distributed as dist

from megatron_greats.data.cache import atomic_path
from megatron_greats.phases import SCORING_PHASES, STEP_PHASES  # noqa: F401 (the phases' names, re-exported)


def _truncate_jsonl(path: Path, resume_step: int) -> None:
    """Drop lines a killed run wrote after the checkpoint it resumes from."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= resume_step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))




class PhaseClock:
    """Seconds per named phase of a step. Phases nest exclusively: time inside an inner phase (ghost
    products computed in backward hooks) is not also counted in the outer one (score_backward).
    sync=True synchronises the accelerator at every phase edge so device time lands in the phase that
    queued it (benchmarks; it costs overlap, so training runs leave it off)."""

    def __init__(self, sync: bool = False):
        self.sync = sync
        self.seconds = defaultdict(float)
        self._stack = []  # [name, start of its current stretch]

    def _now(self) -> float:
        if self.sync:
            from deepspeed.accelerator import get_accelerator

            get_accelerator().synchronize()
        return time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str):
        now = self._now()
        if self._stack:
            outer = self._stack[-1]
            self.seconds[outer[0]] += now - outer[1]
        self._stack.append([name, now])
        try:
            yield
        finally:
            now = self._now()
            self.seconds[name] += now - self._stack.pop()[1]
            if self._stack:
                self._stack[-1][1] = now

    def take(self) -> dict:
        """The seconds so far, and start afresh."""
        out, self.seconds = dict(self.seconds), defaultdict(float)
        return out


class Telemetry:
    def __init__(self, run_dir: Path, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.writer = None
        self.metrics_path = run_dir / "metrics.jsonl"
        self.selection_path = run_dir / "selection.jsonl"
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        # A rerun in a run_dir that holds output continues from resume_step (0: a run killed before its
        # first checkpoint starts afresh): drop what the killed run wrote after it, in TensorBoard
        # (purge_step) and in the jsonl files, so no line passes for this run's output.
        restarted = self.metrics_path.exists() or self.selection_path.exists()
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step if restarted else None)
        if restarted:
            for path in (self.metrics_path, self.selection_path):
                _truncate_jsonl(path, resume_step)

    def log(self, step: int, scalars: dict) -> None:
        """scalars: {"train/loss": 2.3, ...}; written to TensorBoard and as one metrics.jsonl line."""
        if not self.enabled:
            return
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")

    def scalars(self, step: int, scalars: dict) -> None:
        """TensorBoard only (per-step detail that metrics.jsonl does not repeat)."""
        if self.enabled:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)

    def histogram(self, step: int, tag: str, values) -> None:
        if self.enabled and len(values):
            self.writer.add_histogram(tag, np.asarray(values), step)

    def append_jsonl(self, path: Path, records: list) -> None:
        if self.enabled and records:
            with open(path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class SelectionLog:
    """selection.jsonl (per step and replica: the method that took the step, candidates, validation ids,
    the positions the prefilter kept, the scored window [offset, length], selected ids in pick order,
    gains, eta, the preconditioner and the largest relative error of its rank-1 fits on the ghost path)
    and the TensorBoard selection/* scalars and histograms, gathered from every replica to the logging
    rank. The per-candidate score is the method's own (selection/catalog.py `reported`): with phase
    gating, early_method's steps log theirs under selection/<early_method>/, apart from the main
    method's selection/score_*."""

    def __init__(self, telemetry: Telemetry, train_samples, layout, early_method: str = None):
        self.telemetry, self.samples, self.layout = telemetry, train_samples, layout
        self.domain_names = list(train_samples.domain_names)
        self.early_method = early_method

    def record(self, step: int, choice) -> None:
        if self.layout.tensor_rank != 0 or self.layout.pipeline_rank != 0:
            return  # the replica's selecting rank reports for it
        mine = {"step": step, "replica": self.layout.data_rank, "method": choice.method,
                "candidates": choice.candidates.tolist(), "selected": choice.ids.tolist(),
                "gains": [float(g) for g in choice.gains], "picked": choice.picked.tolist(),
                "alignment_terms": None if choice.alignment_terms is None else
                [float(a) for a in choice.alignment_terms],
                "scores": None if choice.scores is None else [float(x) for x in choice.scores],
                "validation": None if choice.validation is None else choice.validation.tolist(),
                "prefiltered": None if choice.prefiltered is None else choice.prefiltered.tolist(),
                "score_window": choice.score_window,
                "eta": choice.eta, "preconditioner": choice.preconditioner,
                "rank_one_error": choice.rank_one_error, "seconds": choice.seconds}
        records = [mine]
        if self.layout.data > 1:
            from megatron.core import parallel_state as ps

            gathered = [None] * self.layout.data if self.layout.is_logging_rank else None
            dist.gather_object(mine, gathered, dst=0, group=ps.get_data_parallel_group())
            records = gathered
        if not self.layout.is_logging_rank:
            return
        self.telemetry.append_jsonl(self.telemetry.selection_path, [
            {**{k: r[k] for k in ("step", "replica", "method", "candidates", "validation", "prefiltered",
                                  "score_window", "selected", "gains", "alignment_terms", "eta", "preconditioner",
                                  "rank_one_error", "seconds")},
             "selected_domains": [self.domain_names[d] for d in self.samples.domains(np.asarray(r["selected"]))]}
            for r in records])
        self._summaries(step, records)

    def _summaries(self, step: int, records: list) -> None:
        candidates = np.concatenate([r["candidates"] for r in records])
        selected = np.concatenate([r["selected"] for r in records])
        scalars = {}
        for name, ids in (("candidates", candidates), ("selected", selected)):
            counts = np.bincount(self.samples.domains(ids), minlength=len(self.domain_names))
            for domain, count in zip(self.domain_names, counts):
                scalars[f"selection/{name}_share/{domain}"] = count / len(ids)
        chosen, rejected = [], []
        for r in records:
            if r["scores"] is not None:
                scores = np.asarray(r["scores"])
                mask = np.zeros(len(scores), dtype=bool)
                mask[r["picked"]] = True
                scored = np.isfinite(scores)  # NaN: dropped by the prefilter, never scored
                chosen += list(scores[mask & scored])
                rejected += list(scores[~mask & scored])
        alignment = [a for r in records if r["alignment_terms"] for a in r["alignment_terms"]]
        if alignment:  # the greedy's interaction (and self) terms over its alignment terms, summed over picks
            gains = [g for r in records if r["alignment_terms"] for g in r["gains"]]
            scale = float(np.sum(np.abs(alignment)))
            if scale > 0:
                scalars["selection/interaction_over_alignment"] = float(np.sum(alignment) - np.sum(gains)) / scale
        # the score's meaning is its method's: an early method's apart from the main one's
        early = self.early_method is not None and records[0]["method"] == self.early_method
        score = f"selection/{self.early_method}/" if early else "selection/"
        if chosen:
            scalars[f"{score}score_selected_mean"] = float(np.mean(chosen))
        if rejected:
            scalars[f"{score}score_rejected_mean"] = float(np.mean(rejected))
        for name in ("scoring",) + STEP_PHASES:
            scalars[f"selection/seconds_{name}"] = float(np.mean([r["seconds"].get(name, 0.0) for r in records]))
        self.telemetry.scalars(step, scalars)
        self.telemetry.histogram(step, f"{score}scores_selected", chosen)
        self.telemetry.histogram(step, f"{score}scores_rejected", rejected)
