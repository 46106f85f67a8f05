"""Pretraining loop: DeepSpeed engine (plain or pipeline), periodic evaluation, checkpoints, telemetry.

Data order is a function of (seed, step) only: every step takes the next global batch of sample ids,
and data-parallel replica r trains on its contiguous slice of it, split into micro-batches. So the
samples of a step, and the loss, do not depend on the parallel layout.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_greats import deepspeed_internals
from megatron_greats.errors import ConfigError, TrainingError
from megatron_greats.model import ModelSpec, build_model
from megatron_greats.parallel.state import Layout, MegatronMpu, device, distributed_session, init_model_parallel
from megatron_greats.training.deepspeed_config import deepspeed_config, parameter_groups
from megatron_greats.training import checkpoint
from megatron_greats.training.optimizer_step import grad_norm, install_plain_step
from megatron_greats.training.preemption import StopOnSigterm
from megatron_greats.training.schedule import ScheduleFactor
from megatron_greats.training.candidates import ReplicaBatches
from megatron_greats.training.executors import executor_for
from megatron_greats.training.memory import check_scoring_memory
from megatron_greats.training.step import step_strategy
from megatron_greats.training.telemetry import SelectionLog, Telemetry


def prepare_run_dir(cfg) -> Path:
    """Create run_dir (and check it is writable) before anything heavy starts."""
    run_dir = Path(cfg.run_dir)
    if not cfg.train.resume and ((run_dir / "checkpoints" / "latest").exists() or (run_dir / "metrics.jsonl").exists()):
        raise ConfigError(f"run_dir '{run_dir}' holds an earlier run and train.resume=false; "
                          "allowed: train.resume=true to continue it, or another run_dir")
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_probe{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run_dir '{run_dir}' is not writable ({e.strerror}); allowed: a writable folder") from None
    return run_dir


def load_data(cfg, show_progress: bool):
    from megatron_greats.data import prepare_data
    from megatron_greats.data.splits import fraction_args

    d = cfg.data
    return prepare_data(
        cache_dir=d.cache_dir, seq_len=cfg.model.seq_len, source=d.source, files=d.files, file_format=d.format,
        text_field=d.text_field, domain_field=d.domain_field, megatron_prefixes=d.megatron_prefixes,
        target_domain=d.target_domain, **fraction_args(d),
        split_seed=d.split_seed, max_docs_per_domain=d.max_docs_per_domain, vocab_size=cfg.tokenizer.vocab_size,
        tokenizer_model=cfg.tokenizer.model, crawl=d.crawl, show_progress=show_progress,
    )


def build_engine(cfg, vocab_size: int, layout: Layout):
    import deepspeed

    if cfg.train.init_checkpoint is None:
        model = build_model(cfg, vocab_size, layout)
    else:  # weights only, before DeepSpeed copies them into its optimizer partitions
        model = checkpoint.model_from_checkpoint(cfg, vocab_size, layout, Path(cfg.train.init_checkpoint),
                                                 "train.init_checkpoint")
    torch.manual_seed(cfg.seed)  # dropout stream, after the per-layer initialisation seeds
    t = cfg.train
    factor = ScheduleFactor(t.lr, t.min_lr, t.warmup_steps, t.steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=parameter_groups(model, t.weight_decay),
        config=deepspeed_config(cfg, layout.data),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor),
        mpu=None if layout.pipeline > 1 else MegatronMpu(),  # PipelineModule brings its own grid
    )
    deepspeed_internals.check_engine(engine)
    install_plain_step(engine, device())
    return engine


class Trainer:
    """The cadence of a run: steps (the step strategy does the work), logging, evaluation, checkpoints."""

    def __init__(self, cfg, engine, data, layout: Layout, run_dir: Path, reference_module=None):
        self.cfg, self.engine, self.data, self.layout, self.run_dir = cfg, engine, data, layout, run_dir
        self.executor = executor_for(engine, layout)  # the layout is dispatched here, once
        self.strategy = step_strategy(cfg, data, layout, engine, self.executor, reference_module=reference_module)
        self.batches = ReplicaBatches(layout, cfg.train.micro_batch)
        self.step = 0
        self.saved_step = None
        self.skipped_in_a_row = self.skipped_total = 0
        self.tokens_per_sample = cfg.model.seq_len

    # ---- evaluation -------------------------------------------------------------------------------
    def evaluation_ids(self, samples) -> list:
        """Global batches covering the first eval_batches x global_batch samples (wrapping when fewer)."""
        g = self.cfg.train.global_batch
        count = evaluation_batches(self.cfg.train.eval_batches, len(samples), g)
        ids = np.arange(count * g) % len(samples)
        return [ids[i * g:(i + 1) * g] for i in range(count)]

    def evaluate(self, samples) -> float:
        return float(np.mean([self.executor.evaluate(self.batches.micro_batches(samples, self.batches.replica_ids(g)))
                              for g in self.evaluation_ids(samples)]))

    # ---- checkpoints ------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> str:
        return str(self.run_dir / "checkpoints")

    @property
    def checkpoint_shape(self) -> dict:
        """What a checkpoint is checked against on resume: the model shape and split, and the data."""
        return {**checkpoint.shape_of(self.cfg), checkpoint.DATA: self.data.identity}

    def save(self) -> None:
        if self.saved_step != self.step:
            checkpoint.save(self.engine, self.checkpoint_dir, self.step, self.cfg.seed, self.checkpoint_shape,
                            write_more=self.strategy.save_state)
            self.saved_step = self.step

    def maybe_resume(self) -> None:
        if not self.cfg.train.resume:
            return
        step = checkpoint.load(self.engine, self.checkpoint_dir, self.cfg.seed, self.checkpoint_shape,
                               read_more=self.strategy.load_state)
        if step is not None:
            self.step = self.saved_step = step

    # ---- non-finite steps -------------------------------------------------------------------------
    def _count_skips(self, skipped: bool, choice) -> dict:
        """TensorBoard scalars for a skipped step; stop after train.max_skipped_steps in a row."""
        if not skipped:
            self.skipped_in_a_row = 0
            return {}
        self.skipped_in_a_row += 1
        self.skipped_total += 1
        where = "scores (Gram or scoring losses)" if choice.skipped else "training loss or gradients"
        if self.layout.is_logging_rank:
            print(f"megatron_greats: warning: step {self.step} skipped: NaN/Inf in the {where}; "
                  f"{self.skipped_in_a_row} in a row", file=sys.stderr, flush=True)
        if self.skipped_in_a_row >= self.cfg.train.max_skipped_steps:
            self.save()  # skipped steps change no weight: this is the last good state
            raise TrainingError(
                f"{self.skipped_in_a_row} steps in a row (up to step {self.step}) had NaN/Inf in the {where} "
                f"(train.max_skipped_steps={self.cfg.train.max_skipped_steps}); the last good state is saved as "
                f"'{Path(self.checkpoint_dir) / checkpoint.tag_of(self.step)}'; allowed: a lower train.lr or "
                "train.grad_clip, or other data, then run again to resume")
        return {"train/skipped_steps": self.skipped_total, "train/step_skipped": 1.0}

    # ---- the loop ---------------------------------------------------------------------------------
    def train(self) -> dict:
        t = self.cfg.train
        self.maybe_resume()
        if self.layout.is_logging_rank:  # only now: a refused resume leaves the earlier run's config
            self.cfg.dump(str(self.run_dir / "config.yaml"))
        start_step = self.step
        telemetry = Telemetry(self.run_dir, enabled=self.layout.is_logging_rank, resume_step=start_step)
        early = self.cfg.selection.early_method if self.cfg.phased else None
        self.selection_log = SelectionLog(telemetry, self.data.train, self.layout, early_method=early)
        progress = None
        if self.layout.is_logging_rank and t.progress:
            from tqdm import tqdm

            progress = tqdm(total=t.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        summary = {"start_step": start_step, "train_loss": None, "val_loss": None, "test_loss": None}
        started = time.time()
        with StopOnSigterm(device()) as stop:
            self._loop(summary, telemetry, progress, stop, started)
        if progress is not None:
            progress.close()
        if summary["val_loss"] is None and not summary.get("preempted"):  # resumed a finished run
            summary["val_loss"], summary["test_loss"] = self.evaluate(self.data.val), self.evaluate(self.data.test)
        telemetry.close()
        summary.update(steps=self.step, seconds=time.time() - started)
        return summary

    def _loop(self, summary: dict, telemetry, progress, stop, started: float) -> None:
        t = self.cfg.train
        window_start, window_samples = started, 0
        while self.step < t.steps:
            # The optimizer's own rate: DeepSpeed does not advance the schedule on a skipped step, so
            # lr_at(self.step) would run ahead of it from then on.
            lr = self.engine.get_lr()[0]
            result = self.strategy.take(self.step, lr)
            choice, loss, skipped = result.choice, result.loss, result.skipped
            norm = grad_norm(self.engine)
            self.step += 1
            scalars = self._count_skips(skipped, choice)
            if not skipped:
                self.selection_log.record(self.step, choice)
                summary["train_loss"] = loss
            window_samples += t.global_batch
            if self.step % t.log_interval == 0 or self.step == t.steps:
                elapsed = time.time() - window_start
                scalars.update({
                    "train/loss": loss, "train/lr": lr,
                    "train/tokens_per_sec": window_samples * self.tokens_per_sample / max(elapsed, 1e-9),
                    "train/samples_seen": self.step * t.global_batch,
                    "train/elapsed_s": time.time() - started,
                })
                if norm is not None:  # before clipping; of the data-parallel mean gradient
                    scalars["train/grad_norm"] = norm
                if result.phase is not None:  # phase gating: 0 selection.early_method took the step, 1 method
                    scalars["selection/phase"] = result.phase
                window_start, window_samples = time.time(), 0
            if (t.eval_interval and self.step % t.eval_interval == 0) or self.step == t.steps:
                summary["val_loss"], summary["test_loss"] = self.evaluate(self.data.val), self.evaluate(self.data.test)
                scalars.update({"val/loss": summary["val_loss"], "test/loss": summary["test_loss"],
                                "train/elapsed_s": time.time() - started})  # wall time at each evaluation
            if scalars:
                telemetry.log(self.step, scalars)
            if (t.save_interval and self.step % t.save_interval == 0) or self.step == t.steps:
                self.save()
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
            telemetry.flush()
            if stop.agreed():
                self.save()
                summary["preempted"] = True
                return


def split_size_notes(cfg, data, world_size: int) -> list:
    """Refuse what a split cannot serve in one step (ConfigError); return notes on what a split serves
    less of than asked.

    A step's candidates are a slice of the train split's epoch orders, and its validation samples
    rotate through the selection split: both samplers go on over the split's end, so asking one step
    for more than a split holds would put the same samples into that step more than once (in g_val a
    repeated sample counts twice; a selection could take one twice), and cost scoring memory for no
    new sample: refused. Evaluation takes at most the whole split (evaluation_ids): a note says how
    much it uses."""
    sel, t = cfg.selection, cfg.train
    specs = [phase.method for phase in cfg.phases()]  # with phase gating: what either method draws
    if any(spec.needs_gram for spec in specs) and sel.val_batch > len(data.selection):
        raise ConfigError(f"selection.val_batch={sel.val_batch} is more than the selection split holds "
                          f"({len(data.selection)} samples): a step's validation samples would repeat some of them; "
                          f"allowed: <= {len(data.selection)}, or a larger data.selection_fraction")
    if not all(spec.from_stream for spec in specs):
        dp = cfg.data_parallel_size(world_size)
        n = cfg.num_candidates(world_size)
        if n * dp > len(data.train):
            per_step = f"{n} x data-parallel size {dp} = {n * dp}" if dp > 1 else f"{n}"
            raise ConfigError(f"selection.candidates={sel.candidates} asks each step for {per_step} candidates, more "
                              f"than the train split holds ({len(data.train)} samples): a step would score samples "
                              f"twice; allowed: <= {len(data.train) // dp}")
    used = {name: evaluation_batches(t.eval_batches, len(getattr(data, name)), t.global_batch)
            for name in ("val", "test")}
    if all(count == t.eval_batches for count in used.values()):
        return []
    splits = " and ".join(f"{count} batches on {name} ({len(getattr(data, name))} samples)"
                          for name, count in used.items())
    return [f"train.eval_batches={t.eval_batches} is more than a held-out split holds: each evaluation uses "
            f"{splits}, of train.global_batch={t.global_batch} samples each"]


def evaluation_batches(eval_batches: int, samples: int, global_batch: int) -> int:
    """How many global batches an evaluation of a split of `samples` samples takes (the last one wraps)."""
    return min(eval_batches, -(-samples // global_batch))


def start_up(cfg):
    """Inside a distributed_session: the data, megatron-core's groups: (data, layout). Data comes before
    the model-parallel groups so that bad data fails before heavy work; so do the split sizes
    (split_size_notes: its notes, and the data's, are printed on rank 0)."""
    deepspeed_internals.check_deepspeed()  # another DeepSpeed release ends the run here (once per process)
    timeout = cfg.parallel.distributed_timeout_minutes
    data = load_data(cfg, show_progress=dist.get_rank() == 0)
    notes = data.notes + split_size_notes(cfg, data, dist.get_world_size())
    if dist.get_rank() == 0:
        for note in notes:
            print(f"megatron_greats: note: {note}", file=sys.stderr, flush=True)
    return data, init_model_parallel(cfg.parallel.tensor, cfg.parallel.pipeline, timeout)


def pretrain(cfg) -> dict:
    """Start-up in the order that lets bad input fail before heavy work, then train. The process group
    lives for this call only (distributed_session): it has ended when this returns or raises."""
    deepspeed_internals.check_deepspeed()  # before the run folder is written
    run_dir = prepare_run_dir(cfg)
    with distributed_session(cfg.parallel.distributed_timeout_minutes):
        data, layout = start_up(cfg)
        cfg = cfg.with_value("data.target_domain", data.target_domain)  # config.yaml: the target trained for
        needs_reference = any(phase.method.needs_reference for phase in cfg.phases())
        reference = checkpoint.reference_model(cfg, data.vocab_size, layout) if needs_reference else None
        engine = build_engine(cfg, data.vocab_size, layout)
        trainer = Trainer(cfg, engine, data, layout, run_dir, reference_module=reference)
        # before the first step (and before anything is written): the scoring pass must fit in memory
        check_scoring_memory(trainer.strategy, ModelSpec.from_config(cfg, data.vocab_size).vocab_size, layout)
        summary = trainer.train()
    summary.update(run_dir=str(run_dir), tensorboard=str(run_dir / "tensorboard"), world_size=layout.world_size,
                   layout=f"dp={layout.data} tp={layout.tensor} pp={layout.pipeline}", target_domain=data.target_domain)
    return summary
