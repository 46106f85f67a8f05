"""Learning-rate schedule: linear warmup, then cosine decay to min_lr at the last step.

lr_at(n) is the rate of the n-th applied update (0-based): the LambdaLR factor. DeepSpeed advances the
schedule only on applied steps, so the trainer (and GREATS' eta) read the optimizer's current rate.
"""

from __future__ import annotations

import math


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class ScheduleFactor:
    """A picklable LambdaLR factor (base lr x factor = lr_at), so DeepSpeed can checkpoint the scheduler."""

    def __init__(self, lr: float, min_lr: float, warmup_steps: int, total_steps: int):
        self.args = (lr, min_lr, warmup_steps, total_steps)

    def __call__(self, step: int) -> float:
        return lr_at(step, *self.args) / self.args[0]
