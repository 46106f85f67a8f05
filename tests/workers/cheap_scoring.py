"""Worker (run under torchrun): the scoring pass with a score window and with the top L layers only, on
the project's llama in float64, through the layout's own executor (PP > 1: a real DeepSpeed
PipelineEngine running the scoring schedule with DeepSpeed's activation and gradient exchange).

    torchrun --nproc_per_node TP*PP cheap_scoring.py OUT TP PP SP

For every case of CASES (tied or untied embeddings, selection.score_layers L or none, a window at the
start or at a seeded offset, one or two scoring micro-batches), ScoringPass(top_layers=L).scores(...)
of N candidates and m validation samples, both cut by ScoreWindow, gives the candidates' Gram, their
alignment with the mean validation gradient and their losses (every rank's result is kept). Meanwhile
each module of interest (every transformer layer by its block index, the embedding, the embedding
output, the final norm, the output layer) is instrumented, independently of the recorder:
  saved      tensors autograd saved for backward while the module ran forward (saved_tensors_hooks,
             counted for every module on the stack of running modules);
  grads      gradients that reached the module's output in backward (a tensor hook on its output);
  input_rg   forward calls whose input required grad (transformer layers);
  input_grads gradients that reached a transformer layer's input.
Per rank also `total_saved`, every tensor saved during the pass. The loss is the model's own with its
softmax in float64 (float64_losses). With one process, rank 0 also
writes the reference: per-sample gradients from torch.func (vmap of grad) of a plain-torch llama
(RMSNorm, SwiGLU, RoPE, causal attention) on the model's weights, of the tokens cut here by hand
(tokens[:, offset: offset + length + 1]), w.r.t. only the scored weights, named here: the layers with
block >= num_layers - L, the final norm, and the output layer when untied (with L none: every weight).
Writes {"cases", "results": {case: {...}}, "reference": {case: {...}}} to OUT on rank 0.
"""

import sys
import warnings
from collections import Counter
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.func import grad, vmap  # noqa: E402

from megatron_greats.config import load_config  # noqa: E402
from megatron_greats.model import build_model  # noqa: E402
from megatron_greats.model.gpt import (EmbeddingOutput, OutputLayer, RMSNorm, TokenEmbedding,  # noqa: E402
                                       TransformerLayer)
from megatron_greats.parallel.state import distributed_session, init_model_parallel  # noqa: E402
from megatron_greats.training import executors, pipeline_schedules  # noqa: E402
from megatron_greats.training.executors import executor_for  # noqa: E402
from megatron_greats.training.scoring import ScoredBatch, ScoreWindow, ScoringPass  # noqa: E402

VOCAB, T, H, HEADS, FFN, LAYERS, EPS, BASE, SEED = 50, 8, 16, 4, 24, 4, 1e-5, 10000.0, 1234
N, M = 4, 2  # candidates, validation samples
WINDOW = 6   # even: sequence parallel at TP=2 splits it


def window_step() -> int:
    """A step whose random window sits at the last offset, T - WINDOW (the far end of the range)."""
    window = ScoreWindow(WINDOW, "random", T, SEED)
    return next(step for step in range(1, 1000) if window.offset(step) == T - WINDOW)


# name: (tied, L, window length or None, where, scoring micro-batch or None)
CASES = {
    "tied-all": (True, None, None, "start", None),
    "untied-all": (False, None, None, "start", None),
    "tied-top2": (True, 2, None, "start", None),
    "untied-top1": (False, 1, None, "start", None),
    "untied-top2": (False, 2, None, "start", None),
    "untied-top3": (False, 3, None, "start", None),
    "untied-top2-micro": (False, 2, None, "start", 3),
    "tied-window-start": (True, None, WINDOW, "start", None),
    "untied-window-random": (False, None, WINDOW, "random", None),
    "untied-window-random-top1": (False, 1, WINDOW, "random", None),
}


def float64_losses(logits, labels):
    """The model's per-sample losses with a float64 softmax over the gathered vocabulary: megatron-core's
    vocab_parallel_cross_entropy computes it in float32 whatever the logits' dtype, which would bound
    the comparison at 1e-7. The scoring pass calls it where it calls the model's own loss."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    logits = gather_from_tensor_model_parallel_region(logits)          # [t, b, vocab]
    return F.cross_entropy(logits.permute(1, 2, 0), labels, reduction="none").mean(dim=1)


executors.per_sample_losses = pipeline_schedules.per_sample_losses = float64_losses


# ---- the model under test ---------------------------------------------------------------------------
def build(tied: bool, tp: int, pp: int, sp: bool, layout):
    cfg = load_config(None, ["model.arch=llama", f"model.tie_embeddings={str(tied).lower()}",
                             f"model.num_layers={LAYERS}", f"model.hidden_size={H}", f"model.num_heads={HEADS}",
                             f"model.ffn_hidden_size={FFN}", f"model.seq_len={T}", "model.vocab_pad_multiple=8",
                             "model.init_std=0.2", f"model.norm_eps={EPS}", f"model.rope_base={BASE}",
                             f"parallel.tensor={tp}", f"parallel.pipeline={pp}", f"seed={SEED}",
                             f"parallel.sequence_parallel={str(sp).lower()}", "train.global_batch=2",
                             "train.micro_batch=1", "train.optimizer=sgd", "train.weight_decay=0"])
    model = build_model(cfg, VOCAB, layout).double()
    with torch.no_grad():  # norms start at 1: make them count, the same at every layout (by block)
        for m in model.modules():
            if isinstance(m, TransformerLayer):
                values = torch.Generator().manual_seed(100 + m.block)
                for norm in (m.attn_norm, m.mlp_norm):
                    norm.weight.copy_(1.0 + 0.3 * torch.randn(H, generator=values, dtype=torch.float64))
        for norm in final_norms(model):
            norm.weight.copy_(1.0 + 0.3 * torch.randn(H, generator=torch.Generator().manual_seed(99),
                                                      dtype=torch.float64))
    if pp == 1:
        engine = type("Engine", (), {"module": model})()  # the plain executor scores the module itself
    else:
        import deepspeed

        from megatron_greats.training.deepspeed_config import deepspeed_config, parameter_groups

        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=parameter_groups(model, 0.0),
                                               config=deepspeed_config(cfg, layout.data))
        assert type(engine).__name__ == "PipelineEngine", type(engine)
    return engine.module, executor_for(engine, layout)


def final_norms(model) -> list:
    inner = {id(n) for m in model.modules() if isinstance(m, TransformerLayer) for n in (m.attn_norm, m.mlp_norm)}
    return [m for m in model.modules() if isinstance(m, RMSNorm) and id(m) not in inner]


# ---- instrumentation ----------------------------------------------------------------------------------
class Probe:
    """Counts, per module label, what autograd saved during its forward and what gradients reached it."""

    def __init__(self, module):
        self.saved, self.grads, self.input_rg, self.input_grads = Counter(), Counter(), Counter(), Counter()
        self.total_saved, self.stack, self.handles = 0, [], []
        labels = {}
        for m in module.modules():
            if isinstance(m, TransformerLayer):
                labels[m] = f"layer{m.block}"
            elif isinstance(m, TokenEmbedding):
                labels[m] = "embedding"          # its first-stage call (the tied logits call it by forward_fn)
                if m.output is not None:
                    labels[m.output] = "output"  # the tied output layer
            elif isinstance(m, EmbeddingOutput):
                labels[m] = "embedding_output"
            elif isinstance(m, OutputLayer):
                labels[m] = "output"
        for m in final_norms(module):
            labels[m] = "final_norm"
        for m, label in labels.items():
            self.handles.append(m.register_forward_pre_hook(self._pre(label, isinstance(m, TransformerLayer))))
            self.handles.append(m.register_forward_hook(self._post(label)))

    def _pre(self, label, is_layer):
        def hook(module, args):
            self.stack.append(label)
            x = args[0]
            if is_layer and x.requires_grad:
                self.input_rg[label] += 1
                x.register_hook(lambda g: self.input_grads.update([label]))
        return hook

    def _post(self, label):
        def hook(module, args, output):
            self.stack.pop()
            if torch.is_tensor(output) and output.requires_grad:
                output.register_hook(lambda g: self.grads.update([label]))
        return hook

    def pack(self, tensor):
        self.total_saved += 1
        self.saved.update(set(self.stack))
        return tensor

    def counts(self) -> dict:
        for h in self.handles:
            h.remove()
        return {"saved": dict(self.saved), "grads": dict(self.grads), "input_rg": dict(self.input_rg),
                "input_grads": dict(self.input_grads), "total_saved": self.total_saved}


# ---- the independent reference: one sample, plain tensors ----------------------------------------------
# rms_norm and rope are ghost_llama.py's (the same eps and base); attention here takes any length
from ghost_llama import rms_norm, rope  # noqa: E402  (tests/workers/, next to this script)


def attention(x, qkv_w, proj_w):
    t, hd = x.shape[0], H // HEADS
    qkv = (x @ qkv_w.T).view(t, HEADS, 3, hd)       # output features laid out [head, (q, k, v), head_dim]
    q, k, v = (qkv[:, :, j].transpose(0, 1) for j in range(3))
    q, k = rope(q), rope(k)
    scores = q @ k.transpose(-1, -2) / hd ** 0.5
    probs = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    return (probs @ v).transpose(0, 1).reshape(t, H) @ proj_w.T


def reference_loss(w, tokens, labels):
    h = w["emb"][tokens]
    for i in range(LAYERS):
        h = h + attention(rms_norm(h, w[f"{i}.attn_norm"]), w[f"{i}.qkv"], w[f"{i}.proj"])
        x = rms_norm(h, w[f"{i}.mlp_norm"])
        h = h + (F.silu(x @ w[f"{i}.gate"].T) * (x @ w[f"{i}.up"].T)) @ w[f"{i}.down"].T
    logits = rms_norm(h, w["final_norm"]) @ w.get("out", w["emb"]).T   # tied: the embedding again
    return F.cross_entropy(logits, labels)


def plain_weights(model):
    """The one-process model's weights by plain names."""
    modules = list(model.modules())
    layers = sorted((m for m in modules if isinstance(m, TransformerLayer)), key=lambda m: m.block)
    w = {"emb": next(m for m in modules if isinstance(m, TokenEmbedding)).word.weight,
         "final_norm": final_norms(model)[0].weight}
    for i, m in enumerate(layers):
        w.update({f"{i}.attn_norm": m.attn_norm.weight, f"{i}.mlp_norm": m.mlp_norm.weight,
                  f"{i}.qkv": m.attention.qkv.weight, f"{i}.proj": m.attention.proj.weight,
                  f"{i}.up": m.mlp.fc_in.weight, f"{i}.gate": m.mlp.fc_gate.weight, f"{i}.down": m.mlp.fc_out.weight})
    outputs = [m for m in modules if isinstance(m, OutputLayer)]
    if outputs:
        w["out"] = outputs[0].output.weight
    return {k: v.detach().clone() for k, v in w.items()}


def scored_names(w, top):
    """The weights the score covers: with top L, layers L.. from the top, the final norm, an untied output."""
    if top is None:
        return list(w)
    return [k for k in w if k in ("final_norm", "out") or (k[0].isdigit() and int(k.split(".")[0]) >= LAYERS - top)]


def per_sample_flat(w, tokens, top):
    """[samples, scored elements]: the per-sample gradients of the (cut) tokens w.r.t. the scored weights."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    names = scored_names(w, top)
    fixed = {k: v for k, v in w.items() if k not in names}

    def loss(scored, x, y):
        return reference_loss({**fixed, **scored}, x, y)

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))({k: w[k] for k in names}, inputs, labels)
    return torch.cat([per_sample[k].reshape(tokens.shape[0], -1) for k in names], dim=1)


def reference(w, tokens, top):
    """Gram [N, N], alignment with the mean validation gradient [N], losses [N] of the (cut) tokens."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    names = scored_names(w, top)
    flat = per_sample_flat(w, tokens, top)
    gram = flat @ flat.T
    losses = torch.stack([reference_loss(w, x, y) for x, y in zip(inputs, labels)])
    return {"gram": gram[:N, :N], "alignment": gram[:N, N:].mean(dim=1), "losses": losses[:N], "names": names}


# ---- main ---------------------------------------------------------------------------------------------
def main():
    out, tp, pp, sp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
    layout = init_model_parallel(tp, pp)
    tokens = torch.randint(0, VOCAB, (N + M, T + 1), generator=torch.Generator().manual_seed(7))
    step = window_step()
    results, references, models = {}, {}, {}
    for name, (tied, top, length, where, micro) in CASES.items():
        if tied not in models:
            models[tied] = build(tied, tp, pp, sp, layout)
        module, executor = models[tied]
        window = ScoreWindow(length, where, T, SEED)
        offset = window.offset(step)
        cut = window.cut(tokens, offset)
        scoring = ScoringPass(module, layout, executor, micro_batch=micro, top_layers=top)
        probe = Probe(module)
        with torch.autograd.graph.saved_tensors_hooks(probe.pack, lambda t: t):
            inputs = scoring.scores(ScoredBatch.of(cut[:N], cut[N:]))
        scoring.release()
        mine = {"gram": inputs.gram.double(), "alignment": inputs.val_alignment.double(),
                "losses": inputs.losses.double(), "offset": offset, "tokens": cut.shape[1] - 1,
                "input_grad": scoring.input_grad, "stage": layout.pipeline_rank, "tensor_rank": layout.tensor_rank,
                **probe.counts()}
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        results[name] = everyone
        if dist.get_world_size() == 1:  # the reference, cut here by hand
            hand = tokens[:, offset: offset + (length or T) + 1]
            references[name] = {**reference(plain_weights(module), hand, top), "offset": offset}
    if dist.get_rank() == 0:
        torch.save({"cases": CASES, "step": step, "results": results, "reference": references,
                    "layers": LAYERS, "window": WINDOW, "seq_len": T}, out)


if __name__ == "__main__":
    with distributed_session():  # ends the process group, also on failure
        main()
