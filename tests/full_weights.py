"""A checkpoint of any layout as the single-process model's state dict (tests only).

DeepSpeed writes the plain engine's weights as mp_rank_<tp>_model_states.pt (keys `layers.<i>.<name>`)
and the pipeline engine's per layer as layer_<i>-model_<tp>-model_states.pt (keys `<name>`; the tied
output layer is not written again). Tensor-parallel shards are joined along the dimension megatron-core
splits them on, which this table states independently of the model code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

# Column-parallel layers (and the vocab-parallel embedding) split output rows, row-parallel ones input
# columns; everything else (norms, positions, row-parallel biases) is replicated.
SPLIT_DIM = [(re.compile(r"\.(qkv|fc_in|fc_gate|output)\.(weight|bias)$"), 0),
             (re.compile(r"\.word\.weight$"), 0),
             (re.compile(r"\.(proj|fc_out)\.weight$"), 1)]


def _split_dim(name: str):
    for pattern, dim in SPLIT_DIM:
        if pattern.search(name):
            return dim
    return None


def _rank_states(step_dir: Path, tp: int, pipelined: bool) -> list:
    """Per tensor-parallel rank: {single-process name: tensor}."""
    states = []
    for rank in range(tp):
        if not pipelined:
            module = torch.load(step_dir / f"mp_rank_{rank:02d}_model_states.pt", map_location="cpu",
                                weights_only=False)["module"]
            states.append({k: v for k, v in module.items() if torch.is_tensor(v)})
            continue
        state = {}
        for path in sorted(step_dir.glob(f"layer_*-model_{rank:02d}-model_states.pt")):
            layer = int(path.name.split("-")[0].split("_")[1])
            for k, v in torch.load(path, map_location="cpu", weights_only=True).items():
                if torch.is_tensor(v):
                    state[f"layers.{layer}.{k}"] = v
        states.append(state)
    return states


def full_weights(step_dir) -> dict:
    """{name: full tensor} of checkpoint folder step_dir, as a 1-process run of the same model names them.
    Replicated parameters must be identical on every tensor-parallel rank (checked)."""
    step_dir = Path(step_dir)
    shape = json.loads((step_dir / "shape.json").read_text())
    tp, pipelined = shape["parallel.tensor"], shape["parallel.pipeline"] > 1
    states = _rank_states(step_dir, tp, pipelined)
    full = {}
    for name in states[0]:
        parts = [s[name].float() for s in states]
        dim = _split_dim(name)
        if dim is None or tp == 1:
            for rank, part in enumerate(parts[1:], start=1):
                assert torch.equal(part, parts[0]), f"replicated {name} differs on tensor rank {rank}"
            full[name] = parts[0]
        else:
            full[name] = torch.cat(parts, dim=dim)
    return full


def relative_gap(a: dict, b: dict, scale: dict) -> float:
    """||a - b|| / ||scale|| over all tensors of b (global 2-norms)."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    gap = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in b) ** 0.5
    return gap / sum(float(scale[k].double().pow(2).sum()) for k in b) ** 0.5
