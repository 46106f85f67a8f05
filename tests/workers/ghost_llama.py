"""Worker (run under torchrun): the project's llama model, float64, against torch.func.

    torchrun --nproc_per_node TP ghost_llama.py

For tied and untied embeddings (and, at TP > 1, with and without sequence parallelism) the recorder's
Gram of the model built by `build_model` is compared with per-sample gradients from torch.func (vmap of
grad) of an independent plain-torch llama (RMSNorm, SwiGLU, RoPE, causal attention) that uses the
gathered full weights. Prints on rank 0 one line per variant:
"RESULT <variant> <relative Gram error> <max rank difference> <relative loss error> <uncovered count>".
"""

import itertools
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.func import grad, vmap  # noqa: E402

from megatron_greats.config import load_config  # noqa: E402
from megatron_greats.ghost import GhostRecorder  # noqa: E402
from megatron_greats.model import build_model  # noqa: E402
from megatron_greats.model.gpt import MLP, OutputLayer, RMSNorm, SelfAttention, TokenEmbedding  # noqa: E402
from megatron_greats.parallel.state import distributed_session, init_model_parallel  # noqa: E402
from shards import gather  # noqa: E402  (tests/workers/shards.py, next to this script)

VOCAB, B, T, H, HEADS, FFN, LAYERS, EPS, BASE = 50, 4, 8, 16, 4, 24, 2, 1e-5, 10000.0


def per_sample_losses(model, inputs, labels):
    """float64 mean token cross entropy per sample, over the full (gathered) vocabulary."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    logits = gather_from_tensor_model_parallel_region(model(inputs))      # [T, B, V]
    return F.cross_entropy(logits.permute(1, 2, 0), labels, reduction="none").mean(dim=1)


def full_weights(model, tp):
    """The unsharded weights, by plain names. Column shards cat on dim 0 (whole heads each), row shards on dim 1."""
    modules = list(model.modules())
    embedding = next(m for m in modules if isinstance(m, TokenEmbedding))
    attention = [m for m in modules if isinstance(m, SelfAttention)]
    mlps = [m for m in modules if isinstance(m, MLP)]
    norms = [m for m in modules if isinstance(m, RMSNorm)]   # attn, mlp per layer, then the final one
    w = {"emb": gather(embedding.word.weight, 0, tp), "final_norm": norms[-1].weight.detach().clone()}
    for i in range(LAYERS):
        w[f"{i}.attn_norm"], w[f"{i}.mlp_norm"] = (norms[2 * i].weight.detach().clone(),
                                                   norms[2 * i + 1].weight.detach().clone())
        w[f"{i}.qkv"], w[f"{i}.proj"] = gather(attention[i].qkv.weight, 0, tp), gather(attention[i].proj.weight, 1, tp)
        w[f"{i}.up"], w[f"{i}.gate"] = gather(mlps[i].fc_in.weight, 0, tp), gather(mlps[i].fc_gate.weight, 0, tp)
        w[f"{i}.down"] = gather(mlps[i].fc_out.weight, 1, tp)
    outputs = [m for m in modules if isinstance(m, OutputLayer)]
    if outputs:
        w["out"] = gather(outputs[0].output.weight, 0, tp)
    return w


# ---- the independent reference: one sample, plain tensors --------------------------------------------
def rms_norm(x, weight):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight


def rope(x):  # [heads, T, hd]; angles in float32, as the model computes them
    hd = x.shape[-1]
    inv_freq = 1.0 / (BASE ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    angles = torch.arange(x.shape[-2], dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def attention(x, qkv_w, proj_w):
    hd = H // HEADS
    qkv = (x @ qkv_w.T).view(T, HEADS, 3, hd)       # output features laid out [head, (q, k, v), head_dim]
    q, k, v = (qkv[:, :, j].transpose(0, 1) for j in range(3))   # [heads, T, hd]
    q, k = rope(q), rope(k)
    scores = q @ k.transpose(-1, -2) / hd ** 0.5
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(future, float("-inf")).softmax(-1)
    return (probs @ v).transpose(0, 1).reshape(T, H) @ proj_w.T


def reference_loss(w, tokens, labels):
    h = w["emb"][tokens]                                            # [T, H]
    for i in range(LAYERS):
        h = h + attention(rms_norm(h, w[f"{i}.attn_norm"]), w[f"{i}.qkv"], w[f"{i}.proj"])
        x = rms_norm(h, w[f"{i}.mlp_norm"])
        h = h + (F.silu(x @ w[f"{i}.gate"].T) * (x @ w[f"{i}.up"].T)) @ w[f"{i}.down"].T
    logits = rms_norm(h, w["final_norm"]) @ w.get("out", w["emb"]).T   # tied: the embedding again
    return F.cross_entropy(logits, labels)


def reference(w, inputs, labels):
    losses = torch.stack([reference_loss(w, x, y) for x, y in zip(inputs, labels)])
    per_sample = vmap(grad(reference_loss), in_dims=(None, 0, 0))(w, inputs, labels)
    flat = torch.cat([g.reshape(inputs.shape[0], -1) for g in per_sample.values()], dim=1)
    return flat @ flat.T, losses


def main():
    tp = dist.get_world_size()
    layout = init_model_parallel(tp, 1)
    tokens = torch.randint(0, VOCAB, (B, T + 1), generator=torch.Generator().manual_seed(7))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    for tied, sp, path in itertools.product([True, False], [False, True], ["ghost", "materialise"]):
        if sp and tp == 1:
            continue
        cfg = load_config(None, ["model.arch=llama", f"model.tie_embeddings={str(tied).lower()}",
                                 f"model.num_layers={LAYERS}", f"model.hidden_size={H}", f"model.num_heads={HEADS}",
                                 f"model.ffn_hidden_size={FFN}", f"model.seq_len={T}", "model.vocab_pad_multiple=8",
                                 "model.init_std=0.2", f"model.norm_eps={EPS}", f"model.rope_base={BASE}",
                                 f"parallel.tensor={tp}", f"parallel.sequence_parallel={str(sp).lower()}"])
        model = build_model(cfg, VOCAB, layout).double()
        norm_values = torch.Generator().manual_seed(8)  # the same on every rank: norms are replicated
        with torch.no_grad():  # norms start at 1: make them count
            for m in model.modules():
                if isinstance(m, RMSNorm):
                    m.weight.copy_(1.0 + 0.3 * torch.randn(H, generator=norm_values, dtype=torch.float64))
        rec = GhostRecorder(model, batch_dim=1, path=path)
        with rec.capture() as cap:
            losses = per_sample_losses(model, inputs, labels)
            cap.backward(losses)
        gram = cap.gram()
        ref, ref_losses = reference(full_weights(model, tp), inputs, labels)
        everyone = [torch.empty_like(gram) for _ in range(tp)]
        dist.all_gather(everyone, gram)
        spread = max(float((g - gram).abs().max()) for g in everyone)
        error = float((gram - ref).abs().max() / ref.abs().max())
        loss_error = float((losses.detach() - ref_losses).abs().max() / ref_losses.abs().max())
        uncovered = len(rec.uncovered()) + sum(p.numel() for p in model.parameters()) \
            - sum(p.numel() for p in rec.parameters())
        if dist.get_rank() == 0:
            name = f"tp{tp}-tied{int(tied)}-sp{int(sp)}-{path}"
            print(f"RESULT {name} {error:.3e} {spread:.3e} {loss_error:.3e} {uncovered}", flush=True)


if __name__ == "__main__":
    with distributed_session():  # ends the process group, also on failure
        main()
