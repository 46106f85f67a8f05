"""Worker (run under torchrun): megatron-core's own GPTModel (local layer spec) at tensor-parallel size = world size.

    torchrun --nproc_per_node TP ghost_megatron_gpt.py

For each variant the recorder's Gram is compared with per-sample gradients taken the plain way: one
ordinary backward per sample through the same model, the tensor-parallel gradient shards gathered
into one full gradient, then G = g g^T. Variants: LayerNorm + biases + learned positions (per-sample
and shared [1, seq] position ids) and RMSNorm + SwiGLU + RoPE without biases, tied and untied output,
in float64 with the loss over gathered logits; and one in float32 with GPTModel's own loss
(forward(..., labels=...)). Prints on rank 0 one line per variant:
"RESULT <variant> <relative Gram error> <tolerance> <max rank difference> <uncovered count>".
"""

import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_greats.ghost import GhostRecorder  # noqa: E402
from megatron_greats.parallel.state import distributed_session, init_model_parallel  # noqa: E402

VOCAB, B, T, H, HEADS, LAYERS = 64, 4, 8, 16, 4, 2


def cpu_rng_tracker():
    """Attention and embedding dropout run inside megatron-core's CUDA RNG tracker (even at p=0): give it the CPU
    generator (test-side shim for a CPU-only torch; dropout is 0 here, so no random number is drawn)."""
    from megatron.core.tensor_parallel import random

    random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    tracker = random.get_cuda_rng_tracker()
    tracker.states_[random._MODEL_PARALLEL_RNG_TRACKER_NAME] = torch.get_rng_state()


def build(tp, llama, tied, dtype):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    norm = "RMSNorm" if llama else "LayerNorm"
    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=H, num_attention_heads=HEADS, tensor_model_parallel_size=tp,
        normalization=norm, add_bias_linear=not llama, gated_linear_unit=llama,
        activation_func=F.silu if llama else F.gelu, params_dtype=dtype, init_method_std=0.2,
        use_cpu_initialization=True, gradient_accumulation_fusion=False, bias_dropout_fusion=False,
        bias_activation_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        attention_dropout=0.0, hidden_dropout=0.0)
    torch.manual_seed(0)
    model = GPTModel(config, get_gpt_layer_local_spec(normalization=norm), vocab_size=VOCAB, max_sequence_length=T,
                     share_embeddings_and_output_weights=tied,
                     position_embedding_type="rope" if llama else "learned_absolute").to(dtype)
    values = torch.Generator().manual_seed(1)  # same draws on every rank: replicated parameters stay equal
    with torch.no_grad():  # norms start at 1 and biases at 0: make them count
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if name.endswith("layernorm.weight") else 0.0) + 0.3 * torch.randn(
                    p.shape, generator=values, dtype=dtype))
    return model


def causal_mask():
    return torch.ones(T, T, dtype=torch.bool).triu(1).expand(B, 1, T, T)   # True = masked


def gathered_losses(model, inputs, positions, labels):
    """Mean token cross entropy per sample over the gathered logits, in the model's dtype."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    logits = gather_from_tensor_model_parallel_region(model(inputs, positions, causal_mask()[: len(inputs)]))
    return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(dim=1)   # logits [B, T, V]


def own_losses(model, inputs, positions, labels):
    """GPTModel's own loss: forward(..., labels=) gives per-token losses [batch, seq]."""
    return model(inputs, positions, causal_mask()[: len(inputs)], labels=labels).mean(dim=1)


def full_gradient(model, tp):
    parts = []
    for p in model.parameters():
        g = p.grad.detach()
        if tp > 1 and getattr(p, "tensor_model_parallel", False):
            shards = [torch.empty_like(g) for _ in range(tp)]
            dist.all_gather(shards, g.contiguous())
            g = torch.cat(shards)
        parts.append(g.reshape(-1))
    return torch.cat(parts)


def reference(model, loss_fn, inputs, positions, labels, tp):
    rows = []
    for i in range(B):
        model.zero_grad(set_to_none=True)
        loss_fn(model, inputs[i:i + 1], positions[i:i + 1] if len(positions) > 1 else positions,
                labels[i:i + 1]).sum().backward()
        rows.append(full_gradient(model, tp))
    g = torch.stack(rows).double()
    return g @ g.T


def main():
    tp = dist.get_world_size()
    init_model_parallel(tp, 1)
    cpu_rng_tracker()
    tokens = torch.randint(0, VOCAB, (B, T + 1), generator=torch.Generator().manual_seed(2))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    rows, shared = torch.arange(T).expand(B, T), torch.arange(T).unsqueeze(0)
    variants = [  # name, llama, tied, position ids, dtype, loss, tolerance
        ("layernorm-tied-positions", False, True, rows, torch.float64, gathered_losses, 1e-9),
        ("layernorm-untied-sharedpositions", False, False, shared, torch.float64, gathered_losses, 1e-9),
        ("rmsnorm-swiglu-rope-tied", True, True, rows, torch.float64, gathered_losses, 1e-9),
        ("rmsnorm-swiglu-rope-untied", True, False, rows, torch.float64, gathered_losses, 1e-9),
        ("layernorm-tied-ownloss-fp32", False, True, rows, torch.float32, own_losses, 1e-4),
    ]
    for name, llama, tied, positions, dtype, loss_fn, tolerance in variants:
        model = build(tp, llama, tied, dtype)
        if name.startswith("layernorm-tied-positions"):  # the mask: True hides later tokens
            changed = inputs.clone()
            changed[:, -1] = (changed[:, -1] + 1) % VOCAB
            with torch.no_grad():
                before, after = model(inputs, positions, causal_mask()), model(changed, positions, causal_mask())
            assert torch.equal(before[:, :-1], after[:, :-1]) and not torch.equal(before[:, -1], after[:, -1])
        rec = GhostRecorder(model, batch_dim=1)   # torch norms see [seq, batch, hidden]
        with rec.capture() as cap:
            cap.backward(loss_fn(model, inputs, positions, labels))
        gram = cap.gram()
        ref = reference(model, loss_fn, inputs, positions, labels, tp)
        everyone = [torch.empty_like(gram) for _ in range(tp)]
        dist.all_gather(everyone, gram)
        spread = max(float((g - gram).abs().max()) for g in everyone)
        error = float((gram.double() - ref).abs().max() / ref.abs().max())
        uncovered = len(rec.uncovered()) + sum(p.numel() for p in model.parameters()) \
            - sum(p.numel() for p in rec.parameters())
        if dist.get_rank() == 0:
            print(f"RESULT tp{tp}-{name} {error:.3e} {tolerance:g} {spread:.3e} {uncovered}", flush=True)


if __name__ == "__main__":
    with distributed_session():  # ends the process group, also on failure
        main()
