"""Selection methods by name: GREATS and the baselines of the paper. An unknown name is an error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron_greats.selection.catalog import CATALOG, spec_of
from megatron_greats.selection.greedy import greats_greedy


@dataclass
class Selection:
    picked: torch.Tensor     # LongTensor [k], candidate indices in pick order
    scores: torch.Tensor     # [k]: marginal gains (greats) or the ranking score of each pick


@dataclass
class SelectorInputs:
    """Everything a method may read about the N candidates of a step (None where not computed)."""
    losses: Optional[torch.Tensor] = None            # [N] per-sample losses
    gram: Optional[torch.Tensor] = None              # [N, N] <g_i, g_j>
    val_alignment: Optional[torch.Tensor] = None     # [N] <g_i, mean validation gradient>
    reference_losses: Optional[torch.Tensor] = None  # [N] the reference model's losses (RHO-Loss)

    def tensors(self) -> dict:
        return {name: value for name, value in vars(self).items() if value is not None}

    def all_finite(self) -> bool:
        return all(bool(torch.isfinite(v).all()) for v in self.tensors().values())


def unit_gradients(inputs: SelectorInputs) -> SelectorInputs:
    """The scores of unit gradients g_i / |g_i| (selection.alignment=cosine): no bias toward candidates
    with large gradients. |g_i| comes from the Gram's diagonal (preconditioned where the Gram is)."""
    norms = torch.diagonal(inputs.gram).clamp(min=0).sqrt().clamp(min=torch.finfo(inputs.gram.dtype).tiny)
    return SelectorInputs(losses=inputs.losses, gram=inputs.gram / torch.outer(norms, norms),
                          val_alignment=inputs.val_alignment / norms, reference_losses=inputs.reference_losses)


@dataclass(frozen=True)
class Method:
    needs: tuple             # inputs the method reads: "gram", "val_alignment", "losses", "reference_losses"
    pick: Callable


METHODS = {}  # name -> Method: the catalog's facts with the pick function registered below


def picks(name: str):
    """Register a method's pick function, called with keyword arguments k, n, eta, generator, options
    and the inputs of SelectorInputs (those the catalog says it ranks by are given)."""
    def register(fn: Callable) -> Callable:
        METHODS[name] = Method(spec_of(name).ranks_by, fn)
        return fn
    return register


def top_k(score: torch.Tensor, k: int) -> Selection:
    """The k largest scores, ties broken by lowest index (a stable sort, unlike torch.topk)."""
    order = torch.argsort(-score.to(torch.float64), stable=True)[:k]
    return Selection(order, score[order])


@picks("greats")
def _greats(k, eta, gram, val_alignment, options, generator, **_):
    picked, gains = greats_greedy(val_alignment, gram, k, eta, return_gains=True, generator=generator, **options)
    return Selection(picked, gains)


@picks("first_order")
def _first_order(k, val_alignment, **_):
    return top_k(val_alignment, k)


@picks("gradnorm")
def _gradnorm(k, gram, **_):
    return top_k(torch.diagonal(gram), k)


@picks("maxloss")
def _maxloss(k, losses, **_):
    return top_k(losses, k)


@picks("rholoss")
def _rholoss(k, losses, reference_losses, **_):
    return top_k(losses - reference_losses, k)


@picks("uniform")
def _uniform(k, n, generator, **_):
    picked = torch.randperm(n, generator=generator)[:k]
    return Selection(picked, torch.zeros(k, dtype=torch.float64))


@picks("regular")
def _regular(k, **_):  # trains on k samples straight from the stream: the first k candidates
    return Selection(torch.arange(k), torch.zeros(k, dtype=torch.float64))


assert set(METHODS) == set(CATALOG), f"methods without a pick function: {set(CATALOG) - set(METHODS)}"


def method(name: str) -> Method:
    spec_of(name)  # an unknown name: one line naming the allowed ones
    return METHODS[name]


def select(name: str, k: int, n: int, *, eta: Optional[float] = None, gram=None, val_alignment=None,
           losses=None, reference_losses=None, generator: Optional[torch.Generator] = None,
           greats_options: Optional[dict] = None) -> Selection:
    """Pick k of n candidates with the named method; the inputs it needs must be given."""
    m = method(name)
    given = vars(SelectorInputs(losses, gram, val_alignment, reference_losses))
    missing = [x for x in m.needs if given[x] is None]
    if missing:
        raise ValueError(f"selection method '{name}' needs {', '.join(missing)}")
    if not 0 < k <= n:
        raise ValueError(f"k={k}; allowed: 1 <= k <= N={n}")
    if spec_of(name).reads("eta") and eta is None:
        raise ValueError(f"selection method '{name}' needs eta (the step's learning rate)")
    return m.pick(k=k, n=n, eta=eta, generator=generator, options=greats_options or {}, **given)
