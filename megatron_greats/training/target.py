"""selection.target_ema: the alignment target as an exponential moving average of the steps' validation gradients.

With beta = selection.target_ema > 0, GREATS' and first_order's alignment term scores each candidate
against
    G_t = beta G_{t-1} + (1 - beta) g_val,t,   G_0 = 0,   bias-corrected  G_t / (1 - beta^t)
instead of this step's mean validation gradient g_val,t alone (beta = 0; the first step is the same
either way). The m validation samples of one step are few; the average over steps smooths their noise.

Per scored parameter the scoring pass forms, from its own operands (GhostCapture with a target):
  g_val,t    the validation samples' mean gradient (a linear layer: one GEMM over their tokens);
  <g_i, V>   each candidate's product with the stored V = G_{t-1} (a linear layer: rowsum((B_i V) * A_i),
             one GEMM over the candidates' tokens), preconditioned as the Gram's rows are (D g_i).
The alignment is then (beta <D g_i, G_{t-1}> + (1 - beta) <D g_i, g_val,t>) / (1 - beta^t) = <D g_i, G_t>
bias-corrected, where <D g_i, g_val,t> is the Gram's own validation column: both terms use the same D,
the one the Gram's rows get (exact on the materialised path, its rank-1 fit on the ghost path).

G lives per parameter shard like the weights: a tensor-parallel rank holds its shard, a pipeline stage
its layers, and a parameter replicated over tensor-parallel ranks only on tensor rank 0, which alone
counts it in the Gram. It is not partitioned over data-parallel ranks (ZeRO): every replica scores its
own candidates against all of its model-parallel shard of G in each step's backward, layer by layer,
so a partition would be all-gathered every step (the bytes of the copy each replica would then hold
anyway, plus a model-sized collective per step). Every replica holds the same G without a collective:
the validation samples are the same on every replica (CandidateStream.validation depends on the step
only) and so are the weights, so every replica forms the same g_val. G is updated only once the step's
selection stands (commit); a step whose scores held NaN/Inf leaves it as it was. It is saved with each
checkpoint (one file per tensor/pipeline rank, written by data-parallel rank 0), so a resumed run
selects as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path
import torch

from megatron_greats.errors import ConfigError

BETA, UPDATES, VECTORS = "beta", "updates", "vectors"


def target_file(folder: Path, layout) -> Path:
    """The file of this tensor/pipeline rank's G in a step_N checkpoint folder."""
    return Path(folder) / f"target_ema_tp{layout.tensor_rank}_pp{layout.pipeline_rank}.pt"


class TargetEMA:
    def __init__(self, beta: float, names: dict):
        """beta: selection.target_ema (0 < beta < 1); names: param -> name (the scoring recorder's)."""
        if not 0.0 < beta < 1.0:
            raise ValueError(f"TargetEMA: beta={beta}; allowed: 0 < beta < 1 (0: no EMA, the plain target)")
        self.beta, self.names = beta, names
        self.state = {}     # param -> G_t, not bias-corrected, param-shaped, in the Gram's dtype
        self.updates = 0    # t: the steps folded into G
        self.pending = None  # param -> g_val of the step being scored, until commit() or discard()

    def vectors(self) -> dict:
        """The stored vectors the scoring pass aligns the candidates with: G_{t-1} ({} before the first step)."""
        return self.state

    def alignment(self, column: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        """The candidates' alignment with the bias-corrected G_t, from the Gram's validation column
        <D g_i, g_val,t> and the products with the stored G_{t-1} <D g_i, G_{t-1}>. At the first step it
        is the column itself (G_1 corrected is g_val,1)."""
        if self.updates == 0:
            return column
        t = self.updates + 1
        return (self.beta * stored + (1.0 - self.beta) * column) / (1.0 - self.beta ** t)

    def stage(self, means: dict) -> None:
        """This step's g_val per parameter (GhostCapture.averaged_gradients), folded in by commit()."""
        self.pending = means

    def commit(self) -> None:
        """G_t = beta G_{t-1} + (1 - beta) g_val,t, once the step's selection stands."""
        if self.pending is None:
            return
        for param, mean in self.pending.items():
            if param in self.state:
                self.state[param].mul_(self.beta).add_(mean, alpha=1.0 - self.beta)
            else:
                self.state[param] = mean * (1.0 - self.beta)
        self.updates += 1
        self.pending = None

    def discard(self) -> None:
        """A skipped step (NaN/Inf in the scores of some replica): G stays G_{t-1}."""
        self.pending = None

    def bytes_per_element(self, dtype: torch.dtype) -> int:
        """G and one step's g_val, per scored element (the memory estimate)."""
        from megatron_greats.ghost.products import compute_dtype

        return 2 * compute_dtype(dtype).itemsize

    # ---- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {BETA: self.beta, UPDATES: self.updates,
                VECTORS: {self.names[p]: g.detach().cpu() for p, g in self.state.items()}}

    def load_state_dict(self, state: dict, where: str) -> None:
        if state.get(BETA) != self.beta:
            raise ConfigError(f"checkpoint '{where}' holds the target of selection.target_ema={state.get(BETA)}, "
                              f"this run has selection.target_ema={self.beta}; allowed: the same value (the "
                              "selections follow it), or another run_dir")
        by_name = {name: p for p, name in self.names.items()}
        unknown = sorted(set(state[VECTORS]) - set(by_name))
        if unknown:
            raise ConfigError(f"checkpoint '{where}' holds a target for '{unknown[0]}', which this run does not "
                              "score; allowed: the scoring settings the checkpoint was saved with, or another run_dir")
        self.state = {by_name[name]: g.to(by_name[name].device) for name, g in state[VECTORS].items()}
        self.updates, self.pending = int(state[UPDATES]), None

    def save(self, folder: Path, layout) -> None:
        """Written by data-parallel rank 0 (the replicas hold the same G)."""
        if layout.data_rank == 0:
            torch.save(self.state_dict(), target_file(folder, layout))

    def load(self, folder: Path, layout) -> None:
        path = target_file(folder, layout)
        if not path.is_file():
            raise ConfigError(f"checkpoint '{folder}' has no {path.name} (the selection.target_ema={self.beta} "
                              "target of this tensor/pipeline rank): it was saved by a run with "
                              "selection.target_ema=0; allowed: selection.target_ema=0 to resume it, or another "
                              "run_dir")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConfigError(f"checkpoint file '{path}' is not a plain tensor file ({type(e).__name__}); "
                              "allowed: the target_ema files this project writes") from None
        self.load_state_dict(state, str(folder))
