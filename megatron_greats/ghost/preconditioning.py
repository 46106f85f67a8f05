"""A diagonal preconditioner on one side of the Gram: rows of `samples` get D * g_i, the others g_j.

Then the Gram holds <D g_i, D g_j> between preconditioned samples and <D g_i, g_j> between a
preconditioned and a plain one (e.g. candidates against validation samples). D is given per
parameter, or is Adam's 1 / (sqrt(v_hat) + eps) for the coming step (see Preconditioning.block).

Exactness per path (products.py):
  materialise: elementwise, exact for any D (per-sample gradient blocks are scaled row by row);
  ghost:       the per-sample gradient is never formed, only its operands: D ~ r c^T (rank 1) makes
               D * (B_i^T A_i) = (B_i diag(r))^T (A_i diag(c)), exact for r c^T. r c^T is the best
               rank-1 fit of D (its leading singular pair); its relative error is reported. Adam's D
               there lacks the coming step's gradient (Preconditioning.matrix).
Parameters with sparse, bias or norm uses take the materialised path when preconditioned (exact).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def rank_one(d: torch.Tensor, iterations: int = 30) -> tuple:
    """(r, c, relative Frobenius error) of the best rank-1 fit r c^T of a positive matrix d [rows, cols]
    (power iteration; a positive matrix has a positive leading singular pair)."""
    d = d.to(torch.float64)
    c = d.mean(dim=0)
    for _ in range(iterations):
        r = d @ c
        r /= r.norm()
        c = d.T @ r
    fit = torch.outer(r, c)
    return r, c, float((d - fit).norm() / d.norm())


@dataclass
class Preconditioning:
    """D per parameter (this rank's shard), either given (`diagonal`) or Adam's (`second_moment`)."""
    samples: slice                                       # the Gram rows that are preconditioned
    diagonal: dict = field(default_factory=dict)         # param -> D, explicit
    second_moment: dict = field(default_factory=dict)    # param -> Adam's exp_avg_sq v (not bias-corrected)
    beta2: float = 0.999
    step: int = 1                                        # Adam's t of the step about to be taken
    eps: float = 1e-8
    factors: dict = field(default_factory=dict)          # param -> (r, c, error), filled by the ghost path

    def covers(self, param) -> bool:
        return param in self.diagonal or param in self.second_moment

    def block(self, param, rows: slice, cols: slice, width: int, candidate_mean: torch.Tensor) -> torch.Tensor:
        """D of one tile [rows, cols] of a parameter `width` columns wide. Adam's is that of the coming step:
        v_t = beta2 v + (1 - beta2) g^2 with g the preconditioned samples' mean gradient
        (`candidate_mean`, the same rows), so a coordinate the optimizer has not seen yet (v = 0)
        gets 1 / |g| as Adam's own step will, not 1 / eps."""
        if param in self.diagonal:
            return self.diagonal[param].reshape(-1, width)[rows, cols]
        v = self.second_moment[param].reshape(-1, width)[rows, cols].to(candidate_mean.dtype)
        return self._adam(v, candidate_mean.square())

    def matrix(self, param, rows: int, cols: int) -> torch.Tensor:
        """D as [rows, cols] without the coming step's gradient (the ghost path never forms it):
        the given D, or Adam's from beta2 v alone."""
        if param in self.diagonal:
            return self.diagonal[param].reshape(rows, cols)
        return self._adam(self.second_moment[param].reshape(rows, cols).to(torch.float64), 0.0)

    def _adam(self, v: torch.Tensor, gradient_square) -> torch.Tensor:
        """1 / (sqrt(v_t / (1 - beta2^t)) + eps) with v_t = beta2 v + (1 - beta2) g^2."""
        predicted = self.beta2 * v + (1.0 - self.beta2) * gradient_square
        return 1.0 / ((predicted / (1.0 - self.beta2 ** self.step)).sqrt() + self.eps)

    def factor(self, param, rows: int, cols: int) -> tuple:
        if param not in self.factors:
            self.factors[param] = rank_one(self.matrix(param, rows, cols))
        return self.factors[param]

    def rank_one_errors(self) -> dict:
        """param -> relative error of the rank-1 fit, for the parameters that took the ghost path."""
        return {p: f[2] for p, f in self.factors.items()}
