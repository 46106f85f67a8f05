"""The GREATS greedy (Wang et al., NeurIPS 2024) on precomputed inner products.

    phi_i = eta * <g_i, g_val>                       for every candidate i
    repeat k times:
        j = argmax over unselected i of phi_i        (ties: lowest index)
        select j; its gain is phi_j
        phi_i -= eta^2 * <g_i, g_j>                  for every unselected i

This is the second-order Taylor estimate of the validation-loss drop of a step on the selected set
(Hessian replaced by the identity), maximised greedily. Variants are explicit options:
  self_term:   also subtract (eta^2 / 2) ||g_i||^2 from phi_i (the utility's diagonal term);
  batch_mean:  the training step averages the k selected gradients, so each one moves the weights
               by eta / k: use eta / k in place of eta.
  temperature: > 0 makes each pick a draw (Boltzmann): P(j) ~ exp(phi_j / (temperature * s)) over the
               unselected, with s the standard deviation of their phi (so the setting is free of the
               scores' units); 0 is the deterministic argmax.
"""

from __future__ import annotations

from typing import Optional

import torch


def greedy_step(eta: float, k: int, batch_mean: bool) -> float:
    """The step size the greedy scores with: eta, or eta / k with batch_mean."""
    return eta / k if batch_mean else eta


def greats_greedy(val_alignment: torch.Tensor, gram: torch.Tensor, k: int, eta: float, *,
                  self_term: bool = False, batch_mean: bool = False, temperature: float = 0.0,
                  generator: Optional[torch.Generator] = None, return_gains: bool = False):
    """val_alignment [N] = <g_i, g_val>, gram [N, N] = <g_i, g_j>; returns LongTensor [k] in pick order
    (and the marginal gain of each pick, [k], with return_gains=True)."""
    n = val_alignment.shape[0]
    if gram.shape != (n, n):
        raise ValueError(f"gram has shape {tuple(gram.shape)}; expected ({n}, {n}) to match val_alignment")
    if not 0 < k <= n:
        raise ValueError(f"k={k}; allowed: 1 <= k <= N={n}")
    step = greedy_step(eta, k, batch_mean)
    dtype = torch.float64
    phi = step * val_alignment.to(dtype).clone()
    gram = gram.to(dtype)
    if self_term:
        phi -= 0.5 * step ** 2 * torch.diagonal(gram)
    available = torch.ones(n, dtype=torch.bool, device=phi.device)
    picked, gains = [], []
    for _ in range(k):
        masked = torch.where(available, phi, torch.full_like(phi, -torch.inf))
        spread = float(phi[available].std()) if temperature > 0 and int(available.sum()) > 1 else 0.0
        if spread > 0:
            weights = torch.softmax(masked / (temperature * spread), dim=0)
            j = int(torch.multinomial(weights.float().cpu(), 1, generator=generator))
        else:
            j = int(torch.argmax(masked))  # first maximal index: ties go to the lowest index
        picked.append(j)
        gains.append(phi[j].item())
        available[j] = False
        phi -= step ** 2 * gram[:, j]
    picked = torch.tensor(picked, dtype=torch.long, device=val_alignment.device)
    if return_gains:
        return picked, torch.tensor(gains, dtype=dtype, device=val_alignment.device)
    return picked
