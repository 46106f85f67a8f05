"""Worker (run under torchrun): a capture's target (selection.target_ema) on megatron-core's tensor-parallel
layers at tensor-parallel size = world size.

The layers of ghost_tensor_parallel.py (vocab-parallel embedding, column- and row-parallel linear with
and without biases, an output layer tied or not, sequence parallelism on and off), float64, on either
path. Each rank holds its shard of one stored vector V per parameter, cut from a full V drawn the same
on every rank, as the weights are cut. Against torch.func per-sample gradients of the unsharded
re-implementation: each candidate's <g_i, V> (every rank holds the sum over ranks) and the validation
samples' mean gradient, each rank's shard where it counts the parameter (a replicated bias on tensor
rank 0 only). Prints "RESULT <variant> <alignment error> <mean error> <rank spread> <means per rank>"
on rank 0.
"""

import itertools
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_greats.ghost import GhostRecorder  # noqa: E402
from megatron_greats.parallel.state import distributed_session, init_model_parallel  # noqa: E402
from ghost_tensor_parallel import V, T, build, forward, per_sample_gradients  # noqa: E402

SAMPLES, A = 5, 3  # candidates 0..2, validation samples 3..4


def shards(layers, tied):
    """param -> (reference name, the dim it is split along over tensor-parallel ranks; None: replicated)."""
    out = {layers["emb"].weight: ("emb", 0), layers["col"].weight: ("col_w", 0), layers["row"].weight: ("row_w", 1)}
    if not tied:
        out[layers["out"].weight] = ("out_w", 0)
    if layers["col"].bias is not None:
        out[layers["col"].bias], out[layers["row"].bias] = ("col_b", 0), ("row_b", None)
    return out


def cut(full: torch.Tensor, dim, tp: int, rank: int) -> torch.Tensor:
    return full if dim is None else full.chunk(tp, dim=dim)[rank].contiguous()


def main():
    tp, rank = dist.get_world_size(), dist.get_rank()
    init_model_parallel(tp, 1)
    tokens = torch.randint(0, V, (SAMPLES, T), generator=torch.Generator().manual_seed(2))
    variants = itertools.product([(True, False), (False, False)], [False, True], [False, True], ["ghost", "materialise"])
    for (bias, skip), sp, tied, path in variants:
        if sp and tp == 1:
            continue
        layers = build(tp, bias, skip, sp, tied)
        names = shards(layers, tied)
        reference = per_sample_gradients(layers, tokens, tp, bias, tied)
        gen = torch.Generator().manual_seed(5)  # the same full V on every rank
        full = {name: torch.randn(reference[name].shape[1:], generator=gen, dtype=torch.float64)
                for name, _ in sorted(names.values())}
        vectors = {p: cut(full[name], dim, tp, rank) for p, (name, dim) in names.items()}
        rec = GhostRecorder(layers, path=path)
        with rec.capture(averaged=slice(A, SAMPLES), target=vectors) as cap:
            cap.backward(forward(layers, tokens, sp, tied))
        alignment, means = cap.target_alignment(), cap.averaged_gradients()
        expected = sum((g[:A] * full[name]).reshape(A, -1).sum(dim=1) for name, g in reference.items())
        error = float((alignment - expected).abs().max() / expected.abs().max())
        mean_error = 0.0
        for p, mean in means.items():
            name, dim = names[p]
            want = cut(reference[name][A:].mean(dim=0), dim, tp, rank)
            mean_error = max(mean_error, float((mean - want).abs().max() / want.abs().max()))
        counted = torch.tensor([len(means)], dtype=torch.float64)
        errors = torch.tensor([error, mean_error])
        dist.all_reduce(errors, op=dist.ReduceOp.MAX)
        everyone = [torch.empty_like(alignment) for _ in range(tp)]
        dist.all_gather(everyone, alignment)
        per_rank = [torch.empty_like(counted) for _ in range(tp)]
        dist.all_gather(per_rank, counted)
        spread = max(float((a - alignment).abs().max()) for a in everyone)
        name = f"tp{tp}-bias{int(bias)}-sp{int(sp)}-tied{int(tied)}-{path}"
        if rank == 0:
            counts = ",".join(str(int(c)) for c in per_rank)
            print(f"RESULT {name} {float(errors[0]):.3e} {float(errors[1]):.3e} {spread:.3e} {counts} "
                  f"{len(names)}", flush=True)


if __name__ == "__main__":
    with distributed_session():  # ends the process group, also on failure
        main()
