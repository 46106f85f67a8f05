"""Preemption: SIGTERM on any rank makes every rank finish the current step, save, and exit 0.

The handler only sets a flag; after each step the ranks agree on it (one MAX all-reduce of a single
number), so they all stop after the same step and save the same checkpoint. Launchers forward
SIGTERM to the ranks (deepspeed's launcher, torchrun, srun) and give them time before killing (30 s by
default for deepspeed's launcher and torchrun).
"""

from __future__ import annotations

import signal

from megatron_greats.parallel.state import any_rank


class StopOnSigterm:
    def __init__(self, device):
        self.device, self.requested, self._previous = device, False, None

    def _handler(self, signum, frame):
        self.requested = True

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous)
        return False

    def agreed(self) -> bool:
        """True on every rank when any rank got SIGTERM (every rank must call this after each step)."""
        return any_rank(self.requested, self.device)
