"""Online batch selection: the GREATS greedy and baselines, as pure functions of scores."""

from megatron_greats.selection.greedy import greats_greedy
from megatron_greats.selection.methods import (METHODS, Selection, SelectorInputs, method, select, top_k,
                                               unit_gradients)

__all__ = ["greats_greedy", "METHODS", "Selection", "SelectorInputs", "method", "select", "top_k", "unit_gradients"]
