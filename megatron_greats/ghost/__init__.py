"""Exact per-sample gradient inner products ("ghost" products) of the recorded layers. See recorder.py."""

from megatron_greats.ghost.recorder import GhostCapture, GhostRecorder

__all__ = ["GhostCapture", "GhostRecorder"]
