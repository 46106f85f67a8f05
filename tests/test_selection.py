"""The GREATS greedy against a brute-force evaluation of its utility, with ties; the baselines by name."""

from __future__ import annotations

import itertools

import pytest
import torch

from megatron_greats.selection import METHODS, SelectorInputs, greats_greedy, select, unit_gradients


def utility(subset, val, gram, eta, self_term):
    """U(S) = eta sum_S <g_i, g_val> - eta^2 sum_{i<j in S} <g_i, g_j> [- eta^2/2 sum_S ||g_i||^2]."""
    s = list(subset)
    u = eta * sum(val[i] for i in s) - eta ** 2 * sum(gram[i, j] for i, j in itertools.combinations(s, 2))
    if self_term:
        u -= 0.5 * eta ** 2 * sum(gram[i, i] for i in s)
    return float(u)


def brute_force_greedy(val, gram, k, eta, self_term=False):
    """Each step: the candidate with the largest marginal utility, evaluated from U itself; ties -> lowest."""
    chosen, gains = [], []
    for _ in range(k):
        base = utility(chosen, val, gram, eta, self_term)
        best, best_gain = None, None
        for i in range(len(val)):
            if i in chosen:
                continue
            gain = utility(chosen + [i], val, gram, eta, self_term) - base
            if best is None or gain > best_gain + 1e-12:
                best, best_gain = i, gain
        chosen.append(best)
        gains.append(best_gain)
    return chosen, gains


def random_problem(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(n, d, generator=g, dtype=torch.float64)
    val = torch.randn(d, generator=g, dtype=torch.float64)
    return grads @ val, grads @ grads.T


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("self_term", [False, True])
def test_greedy_matches_brute_force(seed, self_term):
    val, gram = random_problem(n=9, d=5, seed=seed)
    eta = [0.05, 0.3, 1.0][seed % 3]
    picked, gains = greats_greedy(val, gram, 5, eta, self_term=self_term, return_gains=True)
    ref_picked, ref_gains = brute_force_greedy(val, gram, 5, eta, self_term)
    assert picked.tolist() == ref_picked
    torch.testing.assert_close(gains, torch.tensor(ref_gains, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def test_greedy_ties_go_to_the_lowest_index():
    # Candidates 1, 3 and 4 are identical: equal gains at every step.
    grads = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    val, gram = grads @ torch.tensor([0.2, 1.0], dtype=torch.float64), grads @ grads.T
    picked = greats_greedy(val, gram, 4, eta=0.1)
    assert picked.tolist() == brute_force_greedy(val, gram, 4, 0.1)[0]
    assert picked.tolist()[:1] == [1]
    # all equal: picks 0, 1, 2 in order
    assert greats_greedy(torch.zeros(4), torch.zeros(4, 4), 3, 0.5).tolist() == [0, 1, 2]


def test_interaction_term_changes_the_pick():
    # Two near-duplicates with the best alignment, one independent candidate slightly worse:
    # first-order picks both duplicates, GREATS (large eta) swaps the second for the independent one.
    grads = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 0.95]], dtype=torch.float64)
    val, gram = grads @ torch.tensor([1.0, 1.0], dtype=torch.float64), grads @ grads.T
    assert select("first_order", 2, 3, val_alignment=val).picked.tolist() == [1, 0]
    assert greats_greedy(val, gram, 2, eta=0.5).tolist() == [1, 2]


def test_batch_mean_is_eta_over_k():
    val, gram = random_problem(8, 4, seed=3)
    a = greats_greedy(val, gram, 4, 0.8, batch_mean=True, return_gains=True)
    b = greats_greedy(val, gram, 4, 0.2, return_gains=True)
    assert a[0].tolist() == b[0].tolist()
    torch.testing.assert_close(a[1], b[1])


def test_boltzmann_greedy_draws_each_pick_from_the_gains():
    """temperature > 0: P(j) ~ exp(phi_j / (temperature * std(phi))) over the unselected, drawn with the
    step's generator (the same seed gives the same picks); a tiny temperature is the argmax."""
    val, gram = random_problem(n=10, d=6, seed=3)
    argmax = greats_greedy(val, gram, 4, 0.2).tolist()
    assert greats_greedy(val, gram, 4, 0.2, temperature=1e-6, generator=torch.Generator().manual_seed(0)).tolist() \
        == argmax

    def draw(seed, temperature=1.0):
        return greats_greedy(val, gram, 4, 0.2, temperature=temperature,
                             generator=torch.Generator().manual_seed(seed)).tolist()
    assert draw(5) == draw(5)
    draws = [draw(seed) for seed in range(40)]
    assert len({tuple(d) for d in draws}) > 5  # a draw
    assert max(range(10), key=[d[0] for d in draws].count) == argmax[0]  # that favours the largest gain
    # the first pick's frequencies follow the softmax of phi / (temperature * std(phi))
    phi = 0.2 * val
    expected = torch.softmax(phi / (2.0 * phi.std()), dim=0)
    firsts = torch.bincount(torch.tensor([draw(seed, 2.0)[0] for seed in range(2000)]), minlength=10) / 2000
    assert float((firsts - expected).abs().max()) < 0.04


def test_cosine_scores_are_those_of_unit_gradients():
    g = torch.Generator().manual_seed(1)
    grads = torch.randn(6, 4, generator=g, dtype=torch.float64) * torch.tensor([1, 10, 0.1, 3, 1, 5.0]).view(-1, 1)
    val = torch.randn(4, generator=g, dtype=torch.float64)
    unit = grads / grads.norm(dim=1, keepdim=True)
    scored = unit_gradients(SelectorInputs(gram=grads @ grads.T, val_alignment=grads @ val))
    torch.testing.assert_close(scored.gram, unit @ unit.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scored.val_alignment, unit @ val, rtol=1e-12, atol=1e-12)


def test_baselines_by_name():
    val, gram = random_problem(6, 3, seed=1)
    losses = torch.tensor([0.5, 2.0, 1.0, 2.0, 0.1, 0.3])
    reference = torch.tensor([0.4, 0.5, 0.1, 1.9, 0.0, 0.3])
    assert select("maxloss", 3, 6, losses=losses).picked.tolist() == [1, 3, 2]
    assert select("rholoss", 2, 6, losses=losses, reference_losses=reference).picked.tolist() == [1, 2]
    assert select("gradnorm", 2, 6, gram=gram).picked.tolist() == torch.argsort(-torch.diagonal(gram))[:2].tolist()
    assert select("regular", 3, 6).picked.tolist() == [0, 1, 2]
    gen = torch.Generator().manual_seed(0)
    uniform = select("uniform", 4, 6, generator=gen).picked.tolist()
    assert len(set(uniform)) == 4 and uniform == torch.randperm(6, generator=torch.Generator().manual_seed(0))[:4].tolist()
    greats = select("greats", 3, 6, eta=0.1, gram=gram, val_alignment=val)
    assert greats.picked.tolist() == brute_force_greedy(val, gram, 3, 0.1)[0]
    assert set(METHODS) == {"greats", "first_order", "gradnorm", "maxloss", "rholoss", "uniform", "regular"}


def test_the_catalog_imports_without_torch_and_every_method_has_a_pick_function():
    """Config validation reads selection/catalog.py in a process without torch; each catalog entry has a
    registered pick function that is given what the entry says it ranks by."""
    import subprocess
    import sys

    from megatron_greats.selection.catalog import CATALOG

    probe = ("import sys; from megatron_greats.config import load_config; load_config(None, []); "
             "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
    assert set(CATALOG) == set(METHODS)
    assert all(METHODS[name].needs == spec.ranks_by for name, spec in CATALOG.items())


def test_bad_requests_are_errors():
    with pytest.raises(ValueError, match="unknown selection method 'greatz'; allowed: greats, first_order"):
        select("greatz", 2, 4)
    with pytest.raises(ValueError, match="needs reference_losses"):
        select("rholoss", 2, 4, losses=torch.ones(4))
    with pytest.raises(ValueError, match="k=5; allowed: 1 <= k <= N=4"):
        select("maxloss", 5, 4, losses=torch.ones(4))
    with pytest.raises(ValueError, match="needs eta"):
        select("greats", 2, 4, gram=torch.eye(4), val_alignment=torch.ones(4))
