"""Run outputs on the logging rank: TensorBoard scalars and metrics.jsonl (one JSON object per logged step)."""

from __future__ import annotations

import json
import os
from pathlib import Path


class Telemetry:
    def __init__(self, run_dir: Path, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.writer = None
        self.metrics_path = run_dir / "metrics.jsonl"
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run wrote after its last checkpoint
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step or None)
        if resume_step:
            self._truncate_metrics(resume_step)

    def _truncate_metrics(self, resume_step: int) -> None:
        if not self.metrics_path.exists():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        tmp = self.metrics_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.metrics_path)

    def log(self, step: int, scalars: dict) -> None:
        """scalars: {"train/loss": 2.3, ...}; written to TensorBoard and as one metrics.jsonl line."""
        if not self.enabled:
            return
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
