"""Worker (one process): what a run should have done, computed outside the trainer.

    python reference.py SPEC_JSON OUT [dotted.key=value ...]

Builds the model at tensor/pipeline size 1 (its initial weights depend only on the seed) and uses
plain autograd with torch's own cross entropy: no DeepSpeed engine, no GhostRecorder, no selector.
SPEC_JSON:
  {"steps":  [{"weights": PT or null, "ids": [...], "lr": x, "clip": c}, ...],
   "select": [{"weights": PT or null, "candidates": [...], "validation": [...], "eta": x, "k": k}, ...],
   "adamw":  {"ids": [[...], ...], "lrs": [...], "clip": c, "betas": [b1, b2], "eps": e, "weight_decay": w},
   "losses": [{"weights": PT or null, "ids": [...]}, ...],
   "gradients": [{"weights": PT or null, "groups": {NAME: [SPLIT, [ids], [offset, length] or null]}}, ...]}
"weights" is a state dict saved with torch.save (null: the initial weights).
  steps:  the gradient of the mean per-sample loss over `ids`, its 2-norm, and the weights after one
          plain SGD step (no momentum, no weight decay) with clipping to `clip` (0: none);
  select: per-sample gradients of candidates (train split) and validation samples (the selection
          split: the selector's own, never val or test), one backward per sample, their Gram, and the
          GREATS greedy in a plain loop. With "adam": {"history": [{"weights", "ids"}, ...], "beta2",
          "eps", "clip"} the candidates' gradients are first multiplied by Adam's D for the coming
          step, rebuilt from scratch: v summed over the history's clipped mean gradients, then
          v_t = beta2 v + (1 - beta2) gbar^2 with gbar the candidates' mean gradient, bias-corrected.
          Optional, for the cheap-scoring settings: "window": [offset, length]: every candidate and
          validation sample is cut here to tokens[offset: offset + length + 1] before anything else;
          "top_layers": L: the gradients hold only the parameters of the layers from index
          num_layers + 2 - L on in the layer list [embedding, embedding output, num_layers transformer
          layers, final norm, output] (the top L transformer layers, the final norm, an untied output),
          found here by parameter name; "prefilter": M: first each candidate's loss (forward only),
          then the M highest (a stable sort: ties to the lower position), in ascending positions, are
          the only candidates selected from; picks are positions among all candidates, and
          "prefiltered" (the M positions) and "losses" (all candidates') are returned too.
  losses: per-sample losses of train samples `ids` at the given weights (forward only);
  gradients: per group, the mean over its samples (of split SPLIT, cut to the window if one is given) of
          each sample's flat gradient, one backward per sample; with the parameter names and sizes of the
          flat layout and AdamW's parameter order (decayed names first, Megatron's rule on module types);
  adamw:  consecutive steps from the initial weights with torch's own AdamW, on the mean gradient over
          each step's ids, clipped to `clip`, with parameter groups built here from Megatron's rule:
          no weight decay on biases, on the weights of normalisation layers, or on learned positions.
Writes {"initial": state, "steps": [{"grad_norm", "weights"}], "select": [{"picked", "gains"[, "prefiltered",
"losses"]}],
"losses": [tensor, ...], "gradients": [{"names", "sizes", "optimizer_order", NAME: flat tensor}], "adamw": {"decayed": [names], "grad_norms": [...], "weights": [state after each
step]}} to OUT.
"""

import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_greats.config import load_config  # noqa: E402
from megatron_greats.model import build_model  # noqa: E402
from megatron_greats.parallel.state import distributed_session, init_model_parallel  # noqa: E402
from megatron_greats.training.trainer import load_data  # noqa: E402


def per_sample_losses(model, tokens):
    logits = model(tokens[:, :-1]).float()                      # [seq, batch, vocab]
    return F.cross_entropy(logits.permute(1, 2, 0), tokens[:, 1:], reduction="none").mean(dim=1)


def load(model, initial, weights):
    state = initial if weights is None else torch.load(weights, weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)


def state_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def decays(name, module, seq_len):
    """Megatron's rule, stated on module types (the trainer's own rule reads tensor shapes and names)."""
    is_norm = type(module).__name__.endswith("Norm")                                  # LayerNorm, RMSNorm
    is_positions = isinstance(module, torch.nn.Embedding) and module.num_embeddings == seq_len
    return not (name == "bias" or is_norm or is_positions)


def optimizer_order(model, seq_len):
    """The parameter names in AdamW's order: the decayed group, then the rest."""
    decay, rest = [], []
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            (decay if decays(name, module, seq_len) else rest).append(f"{module_name}.{name}")
    return decay + rest


def adamw_steps(model, data, spec, seq_len):
    decay, no_decay, decayed = [], [], []
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if decays(name, module, seq_len):
                decay.append(param)
                decayed.append(f"{module_name}.{name}")
            else:
                no_decay.append(param)
    groups = [{"params": decay, "weight_decay": spec["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=spec["lrs"][0], betas=tuple(spec["betas"]), eps=spec["eps"])
    norms, weights = [], []
    for ids, lr in zip(spec["ids"], spec["lrs"]):
        optimizer.zero_grad(set_to_none=True)
        per_sample_losses(model, data.train.get(np.asarray(ids))).mean().backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), spec["clip"] or float("inf"))))
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        weights.append(state_of(model))
    return {"decayed": decayed, "grad_norms": norms, "weights": weights}


def sgd_step(model, tokens, lr, clip):
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    per_sample_losses(model, tokens).mean().backward()
    norm = sum(float(p.grad.double().pow(2).sum()) for p in params) ** 0.5
    scale = clip / (norm + 1e-6) if clip > 0 and norm + 1e-6 > clip else 1.0
    with torch.no_grad():
        for p in params:
            p -= lr * scale * p.grad
    return norm


def greedy(alignment, gram, k, eta):
    phi = [eta * a for a in alignment]
    available = set(range(len(phi)))
    picked, gains = [], []
    for _ in range(k):
        j = min(available, key=lambda i: (-phi[i], i))  # the largest gain, ties to the lowest index
        picked.append(j)
        gains.append(phi[j])
        available.discard(j)
        phi = [p - eta * eta * gram[i][j] for i, p in enumerate(phi)]
    return picked, gains


def flat_gradient(model, tokens, clip=0.0, names=None):
    """The gradient of the mean per-sample loss over tokens, flat, in float64 (clipped to `clip`); with
    `names`, of those parameters only."""
    params = [p for n, p in model.named_parameters() if p.requires_grad and (names is None or n in names)]
    model.zero_grad(set_to_none=True)
    per_sample_losses(model, tokens).mean().backward()
    g = torch.cat([p.grad.reshape(-1).double() for p in params])
    norm = float(g.norm())
    return g * (clip / (norm + 1e-6) if clip > 0 and norm + 1e-6 > clip else 1.0)


def adam_second_moment(model, data, initial, adam):
    v = None
    for past in adam["history"]:
        load(model, initial, past["weights"])
        g = flat_gradient(model, data.train.get(np.asarray(past["ids"])), adam["clip"])
        v = (1 - adam["beta2"]) * g ** 2 if v is None else adam["beta2"] * v + (1 - adam["beta2"]) * g ** 2
    return v


def adam_diagonal(v, t, beta2, eps):
    """D(gbar) for the coming step t: Adam's v_t = beta2 v + (1 - beta2) gbar^2, bias-corrected."""
    return lambda gbar: 1.0 / (((beta2 * v + (1 - beta2) * gbar ** 2) / (1 - beta2 ** t)).sqrt() + eps)


def top_layer_names(model, num_layers, top):
    """The parameter names of layers num_layers + 2 - top, ... of the layer list (SequentialGPT's
    `layers.<index>.`): the top transformer layers, the final norm and an untied output layer."""
    first = num_layers + 2 - top
    return {n for n, _ in model.named_parameters() if n.startswith("layers.") and int(n.split(".")[1]) >= first}


def select(model, data, candidates, validation, eta, k, diagonal=None, window=None, names=None, prefilter=None):
    def cut(tokens):
        return tokens if window is None else tokens[:, window[0]: window[0] + window[1] + 1]

    candidates = np.asarray(candidates)
    extra = {}
    if prefilter is not None:
        with torch.no_grad():
            losses = per_sample_losses(model, cut(data.train.get(candidates))).double()
        order = sorted(range(len(candidates)), key=lambda i: (-float(losses[i]), i))  # ties to the lower position
        kept = sorted(order[:prefilter])
        extra = {"prefiltered": kept, "losses": losses}
        picked, gains = select(model, data, candidates[kept], validation, eta, k, diagonal, window, names)
        return [kept[i] for i in picked], gains, extra
    tokens = cut(torch.cat([data.train.get(candidates), data.selection.get(np.asarray(validation))]))
    rows = [flat_gradient(model, tokens[i:i + 1], names=names) for i in range(tokens.shape[0])]
    g = torch.stack(rows)
    if diagonal is not None:
        g[:len(candidates)] *= diagonal(g[:len(candidates)].mean(dim=0))
    gram = (g @ g.T).tolist()
    n = len(candidates)
    alignment = [sum(gram[i][n:]) / len(validation) for i in range(n)]
    return greedy(alignment, gram, k, eta)


def main():
    spec, out = json.loads(Path(sys.argv[1]).read_text()), sys.argv[2]
    cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu.yaml"), sys.argv[3:],
                      world_size=1)
    data = load_data(cfg, show_progress=False)
    model = build_model(cfg, data.vocab_size, init_model_parallel(1, 1)).eval()  # dropout off, as scoring
    initial = state_of(model)
    result = {"initial": initial, "steps": [], "select": []}
    for s in spec.get("steps", []):
        load(model, initial, s["weights"])
        norm = sgd_step(model, data.train.get(np.asarray(s["ids"])), s["lr"], s["clip"])
        result["steps"].append({"grad_norm": norm, "weights": state_of(model)})
    for s in spec.get("select", []):
        diagonal, adam = None, s.get("adam")
        if adam is not None:
            diagonal = adam_diagonal(adam_second_moment(model, data, initial, adam), len(adam["history"]) + 1,
                                     adam["beta2"], adam["eps"])
        load(model, initial, s["weights"])
        top = s.get("top_layers")
        names = None if top is None else top_layer_names(model, cfg.model.num_layers, top)
        if s.get("prefilter") is None:
            picked, gains = select(model, data, s["candidates"], s["validation"], s["eta"], s["k"], diagonal,
                                   s.get("window"), names)
            result["select"].append({"picked": picked, "gains": gains})
        else:
            picked, gains, extra = select(model, data, s["candidates"], s["validation"], s["eta"], s["k"], diagonal,
                                          s.get("window"), names, s["prefilter"])
            result["select"].append({"picked": picked, "gains": gains, **extra})
    for s in spec.get("losses", []):
        load(model, initial, s["weights"])
        with torch.no_grad():
            result.setdefault("losses", []).append(per_sample_losses(model, data.train.get(np.asarray(s["ids"]))))
    for s in spec.get("gradients", []):
        load(model, initial, s["weights"])
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        grads = {"names": [n for n, _ in named], "sizes": [p.numel() for _, p in named],
               "optimizer_order": optimizer_order(model, cfg.model.seq_len)}
        for name, (split, ids, window) in s["groups"].items():
            tokens = getattr(data, split).get(np.asarray(ids))
            if window is not None:
                tokens = tokens[:, window[0]: window[0] + window[1] + 1]
            grads[name] = torch.stack([flat_gradient(model, tokens[i:i + 1]) for i in range(tokens.shape[0])]).mean(0)
        result.setdefault("gradients", []).append(grads)
    if "adamw" in spec:
        load(model, initial, None)
        result["adamw"] = adamw_steps(model, data, spec["adamw"], cfg.model.seq_len)
    torch.save(result, out)


if __name__ == "__main__":
    with distributed_session():  # ends the process group, also on failure
        main()
