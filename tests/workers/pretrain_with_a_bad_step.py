"""Worker: launch/pretrain.py with one non-finite update injected (tests only).

    python pretrain_with_a_bad_step.py STEP RANK --config FILE [dotted.key=value ...]

At step STEP (1-based), on global rank RANK, the update's gradients are made non-finite: the loss that
the update differentiates (two_pass: each training micro-batch's mean loss; single_pass: the surrogate
that hands the formed gradients to DeepSpeed) is multiplied by inf. Scoring and selection are left alone,
so the step is selected as usual and only its optimizer step must be skipped. Everything else is the
real command, with the real engine and optimizer.
"""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "launch"))

import pretrain  # noqa: E402  launch/pretrain.py

from megatron_greats.training import executors, pipeline_schedules, step  # noqa: E402

BAD_STEP, BAD_RANK = int(sys.argv[1]), int(sys.argv[2])
current = {"step": None}


def on_bad_step(loss_fn):
    def poisoned(*args, **kwargs):
        loss = loss_fn(*args, **kwargs)
        if current["step"] == BAD_STEP and int(os.environ.get("RANK", "0")) == BAD_RANK:
            return loss * float("inf")
        return loss
    return poisoned


real_take = step.TwoPassStep.take


def take(self, index, lr):
    current["step"] = index + 1  # the trainer counts steps from 0 here, from 1 in its logs
    return real_take(self, index, lr)


step.TwoPassStep.take = take
executors.mean_loss = on_bad_step(executors.mean_loss)
pipeline_schedules.surrogate_loss = on_bad_step(pipeline_schedules.surrogate_loss)

if __name__ == "__main__":
    sys.exit(pretrain.main(sys.argv[3:]))
