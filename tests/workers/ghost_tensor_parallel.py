"""Worker (run under torchrun): megatron-core layers at tensor-parallel size = world size.

For every variant (bias, skip_bias_add, sequence parallel, tied output, forced path) the recorder's
Gram is compared with torch.func per-sample gradients of an unsharded float64 re-implementation that
uses the gathered full weights. Prints one "RESULT <variant> <relative error> <max rank difference>"
line per variant on rank 0.
"""

import itertools
import sys
import warnings
from functools import partial
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.func import grad, vmap  # noqa: E402

from megatron_greats.ghost import GhostRecorder  # noqa: E402
from megatron_greats.parallel.state import distributed_session, init_model_parallel  # noqa: E402
from shards import gather  # noqa: E402  (tests/workers/shards.py, next to this script)

V, H, FFN, T, B = 32, 8, 16, 4, 5


def build(tp, bias, skip, sp, tied):
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    cfg = ModelParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp, use_cpu_initialization=True,
                              params_dtype=torch.float64, gradient_accumulation_fusion=False)
    init = partial(torch.nn.init.normal_, std=0.3)
    torch.manual_seed(0)
    layers = torch.nn.ModuleDict({
        "emb": VocabParallelEmbedding(V, H, init_method=init, config=cfg),
        "col": ColumnParallelLinear(H, FFN, config=cfg, init_method=init, bias=bias, gather_output=False,
                                    skip_bias_add=skip),
        "row": RowParallelLinear(FFN, H, config=cfg, init_method=init, bias=bias, input_is_parallel=True,
                                 skip_bias_add=skip),
        "out": ColumnParallelLinear(H, V, config=cfg, init_method=init, bias=False, gather_output=False,
                                    skip_weight_param_allocation=tied),
    })
    for p in layers.parameters():  # megatron zero-initialises biases: make them count
        if p.dim() == 1:
            torch.nn.init.normal_(p, std=0.3)
    return layers


def forward(layers, tokens, sp, tied):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region

    h = layers["emb"](tokens).transpose(0, 1).contiguous()      # ids [B, T] -> [T, B, H]
    if sp:
        h = scatter_to_sequence_parallel_region(h)
    y, b = layers["col"](h)
    y = F.gelu(y if b is None else y + b)
    z, b = layers["row"](y)
    h = h + (z if b is None else z + b)
    logits, _ = layers["out"](h, weight=layers["emb"].weight if tied else None)
    logits = gather_from_tensor_model_parallel_region(logits)   # full vocab, float64 loss
    return F.cross_entropy(logits.permute(1, 2, 0), tokens.roll(-1, 1), reduction="none").mean(1)


def per_sample_gradients(layers, tokens, tp, bias, tied):
    """{name: [B, *full shape]} per-sample gradients of the unsharded re-implementation (torch.func); a tied
    output layer's weight is 'emb'."""
    full = {"emb": gather(layers["emb"].weight, 0, tp), "col_w": gather(layers["col"].weight, 0, tp),
            "row_w": gather(layers["row"].weight, 1, tp)}
    full["out_w"] = full["emb"] if tied else gather(layers["out"].weight, 0, tp)
    if bias:
        full["col_b"], full["row_b"] = gather(layers["col"].bias, 0, tp), layers["row"].bias.detach().clone()

    def loss(p, toks):
        h = p["emb"][toks]
        y = F.gelu(h @ p["col_w"].T + (p["col_b"] if bias else 0))
        h = h + y @ p["row_w"].T + (p["row_b"] if bias else 0)
        return F.cross_entropy(h @ p["out_w"].T, toks.roll(-1, 0))

    if tied:  # one parameter: its gradient is the sum of both uses
        def loss_tied(p, toks):
            q = dict(p)
            q["out_w"] = q["emb"]
            return loss(q, toks)
        params = {k: v for k, v in full.items() if k != "out_w"}
        per_sample = vmap(grad(loss_tied), in_dims=(None, 0))(params, tokens)
    else:
        per_sample = vmap(grad(loss), in_dims=(None, 0))(full, tokens)
    return per_sample


def reference(layers, tokens, tp, bias, tied):
    per_sample = per_sample_gradients(layers, tokens, tp, bias, tied)
    flat = torch.cat([g.reshape(tokens.shape[0], -1) for g in per_sample.values()], dim=1)
    return flat @ flat.T


def main():
    tp = dist.get_world_size()
    init_model_parallel(tp, 1)
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    variants = itertools.product([(True, False), (True, True), (False, False)], [False, True], [False, True],
                                 ["ghost", "materialise"])
    for (bias, skip), sp, tied, path in variants:
        if sp and tp == 1:
            continue
        layers = build(tp, bias, skip, sp, tied)
        rec = GhostRecorder(layers, path=path)
        with rec.capture() as cap:
            cap.backward(forward(layers, tokens, sp, tied))
        gram = cap.gram()
        ref = reference(layers, tokens, tp, bias, tied)
        everyone = [torch.empty_like(gram) for _ in range(tp)]
        dist.all_gather(everyone, gram)
        spread = max(float((g - gram).abs().max()) for g in everyone)
        error = float((gram - ref).abs().max() / ref.abs().max())
        name = f"tp{tp}-bias{int(bias)}-skip{int(skip)}-sp{int(sp)}-tied{int(tied)}-{path}"
        if dist.get_rank() == 0:
            print(f"RESULT {name} {error:.3e} {spread:.3e}", flush=True)


if __name__ == "__main__":
    with distributed_session():  # ends the process group, also on failure
        main()
