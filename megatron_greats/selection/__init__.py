"""Online batch selection: the GREATS greedy and baselines, as pure functions of scores.

catalog.py (each method's facts) imports without torch; the rest is loaded on first use, so config
validation can read the catalog in a process that has not imported torch."""

import importlib

_LAZY = {"greats_greedy": "greedy", **{name: "methods" for name in (
    "METHODS", "Selection", "SelectorInputs", "method", "select", "top_k", "unit_gradients")}}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"megatron_greats.selection.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'megatron_greats.selection' has no attribute '{name}'")
