"""Worker (run under torchrun): the scoring pass with selection.target_ema over 3 steps, on the project's
llama in float64, through the layout's own executor (PP > 1: a real DeepSpeed PipelineEngine), the
model and loss of cheap_scoring.py.

    torchrun --nproc_per_node TP*PP target_ema.py OUT TP PP SP

For every case of CASES (tied embeddings and every layer scored; untied, the top 2 layers, two scoring
micro-batches) a TargetEMA(BETA) goes through STEPS steps: each scores N candidates and M validation
samples of the step's own tokens (ScoringPass.scores with the target), commits, and then every weight
is scaled by 1 + 0.05 step (the same at every layout), so that each step's gradients differ. At step 1
the pass also runs without a target first: the Gram and alignment of both must be the same tensors.
Every rank's alignments are kept. With one process rank 0 also writes each step's per-sample
gradients from torch.func (cheap_scoring.per_sample_flat) w.r.t. the scored weights, from which the
test forms the EMA by hand. Writes {"results": {case: [per rank: [per step: {...}]]}, "reference":
{case: [per step: flat]}} to OUT on rank 0.
"""

import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_greats.parallel.state import distributed_session, init_model_parallel  # noqa: E402
from megatron_greats.training.scoring import ScoredBatch, ScoringPass  # noqa: E402
from megatron_greats.training.target import TargetEMA  # noqa: E402
# the model, its float64 loss (installed in the executors on import) and the torch.func reference
from cheap_scoring import M, N, T, VOCAB, build, per_sample_flat, plain_weights  # noqa: E402

BETA, STEPS = 0.6, 3
# name: (tied, top L or None, scoring micro-batch or None)
CASES = {"tied-all": (True, None, None), "untied-top2-micro": (False, 2, 3)}


def main():
    out, tp, pp, sp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
    layout = init_model_parallel(tp, pp)
    results, references = {}, {}
    for name, (tied, top, micro) in CASES.items():
        module, executor = build(tied, tp, pp, sp, layout)
        scoring = ScoringPass(module, layout, executor, micro_batch=micro, top_layers=top)
        target = TargetEMA(BETA, scoring.recorder.names)
        steps, flats = [], []
        for step in range(1, STEPS + 1):
            tokens = torch.randint(0, VOCAB, (N + M, T + 1), generator=torch.Generator().manual_seed(20 + step))
            batch = ScoredBatch.of(tokens[:N], tokens[N:])
            mine = {}
            if step == 1:  # the plain target first: the EMA's first step must be the same
                plain = scoring.scores(batch)
                mine["plain_gram"], mine["plain_alignment"] = plain.gram.clone(), plain.val_alignment.clone()
                scoring.release()
            inputs = scoring.scores(batch, target=target)
            mine.update(gram=inputs.gram.double(), alignment=inputs.val_alignment.double(), updates=target.updates,
                        staged=len(target.pending))
            scoring.release()
            target.commit()
            if dist.get_world_size() == 1:
                flats.append(per_sample_flat(plain_weights(module), tokens, top))
            steps.append(mine)
            with torch.no_grad():
                for p in module.parameters():
                    p.mul_(1.0 + 0.05 * step)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, steps)
        results[name] = everyone
        references[name] = flats
    if dist.get_rank() == 0:
        torch.save({"cases": CASES, "beta": BETA, "n": N, "results": results, "reference": references}, out)


if __name__ == "__main__":
    with distributed_session():  # ends the process group, also on failure
        main()
