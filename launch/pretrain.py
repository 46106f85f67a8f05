#!/usr/bin/env python
"""Pretrain a GPT on DeepSpeed + megatron-core layers.

    python launch/pretrain.py --config configs/tiny-cpu.yaml [dotted.key=value ...]
    deepspeed --num_gpus N launch/pretrain.py --config FILE [...]
    torchrun --nproc_per_node N launch/pretrain.py --config FILE [...]

Bad input ends with one line on stderr and exit status 2, before any training starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a checkout without installing

from megatron_greats.errors import GreatsError  # noqa: E402


def _format_summary(summary: dict) -> str:
    def loss(value):
        return "n/a" if value is None else f"{value:.4f}"

    rows = [
        ("layout", f"{summary['layout']} (world size {summary['world_size']})"),
        ("steps", f"{summary['steps']} (this run started at step {summary['start_step']})"),
        *([("preempted", f"SIGTERM: stopped after step {summary['steps']} and saved a checkpoint; "
                         "run the same command to resume")] if summary.get("preempted") else []),
        ("train loss", loss(summary["train_loss"])),
        ("val loss", f"{loss(summary['val_loss'])} (held-out {summary['target_domain']})"),
        ("test loss", f"{loss(summary['test_loss'])} (held-out {summary['target_domain']})"),
        ("time", f"{summary['seconds']:.1f} s"),
        ("metrics", str(Path(summary["run_dir"]) / "metrics.jsonl")),
        ("checkpoints", str(Path(summary["run_dir"]) / "checkpoints")),
        ("curves", f"tensorboard --logdir {summary['tensorboard']}"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["", "=== megatron_greats run summary ==="] + [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.steps=10")
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from megatron_greats.quiet import quiet_run_output

    quiet_run_output()  # before DeepSpeed is imported

    from megatron_greats.config import load_config
    from megatron_greats.parallel.state import launcher_rank, launcher_world_size

    try:
        cfg = load_config(args.config, args.overrides, world_size=launcher_world_size())
        from megatron_greats.ghost.reduction import gram_form

        gram_form()  # a bad MEGATRON_GREATS_GRAM_FORM ends the run here, before anything is built
        if launcher_rank() == 0:  # once per job, not once per rank
            for note in cfg.unread_selection_keys() + cfg.selection_notes(launcher_world_size()):
                print(f"megatron_greats: note: {note}", file=sys.stderr, flush=True)
        from megatron_greats.training.trainer import pretrain

        summary = pretrain(cfg)  # the process group has ended when it returns or raises
    except GreatsError as e:
        print(f"megatron_greats: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    if launcher_rank() == 0:
        print(_format_summary(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
