"""Checkpoints that resume exactly, and that a kill can never leave half-loaded.

A checkpoint is the folder <checkpoints>/step_N:
  DeepSpeed's files           model, optimizer (ZeRO shards), LR scheduler, client state
                              {"step", "seed"}: the data stream, the candidate/validation rotation and
                              the selector's random picks are functions of (seed, step)
  shape.json                  the model config and tensor/pipeline sizes: checked before loading; and
                              the world size (how many rank_state files there must be)
  rank_state_<rank>.pt        this rank's RNG states (torch, accelerator, numpy, python) and the
                              pipeline module's micro-batch counter (it seeds dropout per micro-batch)
<checkpoints>/latest names the last complete one. It is written last, after every rank finished its
files, through a temporary file and an atomic rename: a kill during a save leaves the previous
"latest" in place, so a half-written folder is never loaded.

Also here: a model built for this run's layout with the weights of another run's checkpoint
(model_from_checkpoint: continued pretraining, and RHO-Loss' reference model).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_greats import deepspeed_internals
from megatron_greats.data.cache import atomic_path
from megatron_greats.errors import ConfigError
from megatron_greats.model import ModelSpec, build_model, layer_specs
from megatron_greats.parallel.state import Layout, device

LATEST = "latest"
WORLD_SIZE = "world_size"  # in shape.json: the number of ranks that saved (and of rank_state files)
DATA = "data"              # in shape.json: the identity of the data trained on (DataBundle.identity)


def tag_of(step: int) -> str:
    return f"step_{step}"


def read_latest(folder) -> Optional[str]:
    path = Path(folder) / LATEST
    if not path.exists():
        return None
    tag = path.read_text().strip()
    return tag or None


def _write_durably(path: Path, text: str) -> None:
    """Atomic (a temporary file renamed onto path) and on disk before returning."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a crash
    finally:
        os.close(fd)


def _rank_state(engine) -> dict:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": _python_state_to_plain(random.getstate()),
        "micro_offset": deepspeed_internals.micro_offset(engine.module),
    }
    if acc.device_name() != "cpu":
        state["accelerator"] = acc.get_rng_state()
    return state


def _python_state_to_plain(state) -> dict:
    version, internal, gauss = state
    return {"version": version, "internal": list(internal), "gauss": gauss}


def _restore_rank_state(engine, state: dict) -> None:
    from deepspeed.accelerator import get_accelerator

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    deepspeed_internals.set_micro_offset(engine.module, state["micro_offset"])
    if "accelerator" in state:
        get_accelerator().set_rng_state(state["accelerator"])


def shape_of(cfg) -> dict:
    """What a checkpoint's tensors depend on: the model config and the tensor/pipeline split."""
    model = cfg.model.to_dict()
    return {**{f"model.{k}": model[k] for k in _SHAPE_KEYS}, "model.ffn_hidden_size": cfg.ffn_hidden_size,
            "parallel.tensor": cfg.parallel.tensor, "parallel.pipeline": cfg.parallel.pipeline}


# model keys that decide tensor shapes (dropout, init, checkpointing may change on resume)
_SHAPE_KEYS = ("arch", "num_layers", "hidden_size", "num_heads", "seq_len", "tie_embeddings", "vocab_pad_multiple")


def save(engine, folder, step: int, seed: int, shape: dict, write_more: Optional[Callable[[Path], None]] = None) -> str:
    """Every rank calls this; returns the tag. 'latest' moves only once every rank's files are written.
    write_more(step folder): what else a rank writes there (the step strategy's state, e.g. the
    selection.target_ema target), before 'latest' moves."""
    folder = Path(folder)
    tag = tag_of(step)
    engine.save_checkpoint(str(folder), tag=tag, client_state={"step": step, "seed": seed}, save_latest=False)
    torch.save(_rank_state(engine), folder / tag / f"rank_state_{dist.get_rank()}.pt")
    if write_more is not None:
        write_more(folder / tag)
    if dist.get_rank() == 0:
        saved = {**shape, WORLD_SIZE: dist.get_world_size()}
        (folder / tag / "shape.json").write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n")
    dist.barrier()
    if dist.get_rank() == 0:
        _write_durably(folder / LATEST, tag)
    dist.barrier()
    return tag


def read_shape(checkpoint_dir, allowed: str, what: str = "checkpoint") -> dict:
    """shape.json of a step_N folder; a folder without one is refused (`allowed` ends the error line)."""
    path = Path(checkpoint_dir) / "shape.json"
    if not path.is_file():
        raise ConfigError(f"{what} '{checkpoint_dir}' has no shape.json (the model shape and tensor/pipeline "
                          f"sizes it was saved with, checked before loading); allowed: {allowed}")
    return json.loads(path.read_text())


def shape_difference(saved: dict, shape: dict, ignore=()) -> Optional[str]:
    """The first key (sorted) whose value differs, leaving out the world size and `ignore`."""
    for key in sorted((set(saved) | set(shape)) - {WORLD_SIZE, DATA, *ignore}):
        if saved.get(key) != shape.get(key):
            return key
    return None


def check_shape(folder, tag: str, shape: dict) -> dict:
    """A checkpoint of another model shape or split is refused, naming the first difference; returns
    the saved shape.json."""
    saved = read_shape(Path(folder) / tag, "a complete step_N folder as this project writes it, or another run_dir")
    key = shape_difference(saved, shape)
    if key is not None:
        raise ConfigError(f"checkpoint '{Path(folder) / tag}' holds another model shape: it was saved with "
                          f"{key}={saved.get(key)!r}, this run has {key}={shape.get(key)!r}; allowed: the same "
                          "model and tensor/pipeline sizes, or another run_dir")
    return saved


def load(engine, folder, seed: int, shape: dict, read_more: Optional[Callable[[Path], None]] = None) -> Optional[int]:
    """Resume from the checkpoint 'latest' names; returns its step, or None when there is none.
    read_more(step folder): reads back what save's write_more wrote (before the engine loads anything, so
    that a refusal there leaves the engine as it was)."""
    folder = Path(folder)
    tag = read_latest(folder)
    if tag is None:
        return None
    if not (folder / tag).is_dir():
        raise ConfigError(f"'{folder / LATEST}' names checkpoint '{tag}', which is not there; "
                          f"allowed: a 'latest' file naming a step_N folder in '{folder}'")
    saved_shape = check_shape(folder, tag, shape)
    if DATA in shape and saved_shape.get(DATA) != shape[DATA]:
        raise ConfigError(f"checkpoint '{folder / tag}' was trained on other data ({saved_shape.get(DATA)!r}; "
                          f"this run has {shape[DATA]!r}; checkpoints from before the selection split record none): "
                          "resuming would continue on another sample stream; allowed: the same data settings "
                          "(source, files, fractions, split seed, tokenizer), or another run_dir")
    state_file = check_rank_states(folder / tag, dist.get_rank(), dist.get_world_size(), saved_shape.get(WORLD_SIZE))
    if read_more is not None:
        read_more(folder / tag)
    try:
        path, client_state = engine.load_checkpoint(str(folder), tag=tag)
    except RuntimeError as e:  # e.g. size mismatch in a checkpoint written before shape.json existed
        raise ConfigError(f"checkpoint '{folder / tag}' holds another model shape ({str(e).splitlines()[0][:200]}); "
                          "allowed: the same model and tensor/pipeline sizes, or another run_dir") from None
    if path is None:
        raise ConfigError(f"checkpoint '{folder / tag}' could not be loaded; allowed: a complete step_N folder")
    saved_seed = client_state.get("seed", seed)
    if saved_seed != seed:
        raise ConfigError(f"checkpoint '{folder / tag}' was trained with seed={saved_seed}, this run has seed={seed}; "
                          "allowed: the same seed (the data stream and the selections follow it), or another run_dir")
    try:
        state = torch.load(state_file, weights_only=True)  # tensors and plain values only
    except Exception as e:
        raise ConfigError(f"checkpoint file '{state_file}' is not a plain tensor file ({type(e).__name__}); "
                          "allowed: the rank_state files this project writes") from None
    _restore_rank_state(engine, state)
    return int(client_state["step"])


def check_rank_states(checkpoint_dir: Path, rank: int, world_size: int, saved_world_size: Optional[int]) -> Path:
    """This rank's rank_state file. Without every rank's file the run cannot resume exactly (RNG
    streams, dropout seeds), so it is refused. Every rank looks at all the files, so all ranks refuse
    alike, before any collective of the load. saved_world_size: from shape.json (None in checkpoints
    written before it was recorded: then the rank_state files present tell)."""
    saved = sorted(int(p.name[len("rank_state_"):-len(".pt")]) for p in checkpoint_dir.glob("rank_state_*.pt")
                   if p.name[len("rank_state_"):-len(".pt")].isdigit())
    if saved_world_size is None and saved == list(range(len(saved))):
        saved_world_size = len(saved) or None
    if saved_world_size is not None and saved_world_size != world_size:
        raise ConfigError(f"checkpoint '{checkpoint_dir}' holds the rank states of {_ranks(saved_world_size)} "
                          f"({_rank_files(saved_world_size)}), this run has {world_size}; allowed: resuming with "
                          f"{saved_world_size} process{'es' if saved_world_size > 1 else ''} (the world size it was "
                          "saved with; RNG streams and dropout seeds are per rank), or another run_dir")
    missing = [r for r in range(world_size) if r not in saved]
    if missing:
        raise ConfigError(f"checkpoint '{checkpoint_dir}' has no rank_state_{missing[0]}.pt (rank {missing[0]}'s RNG "
                          f"states and micro-batch counter); allowed: a complete step_N folder with "
                          f"{_rank_files(world_size)} for this run's {_ranks(world_size)}, or another run_dir")
    return checkpoint_dir / f"rank_state_{rank}.pt"


def _ranks(n: int) -> str:
    return f"{n} rank{'s' if n > 1 else ''}"


def _rank_files(n: int) -> str:
    return "rank_state_0.pt" if n == 1 else f"rank_state_0.pt ... rank_state_{n - 1}.pt"


# ---- weights of another run: continued pretraining (train.init_checkpoint), RHO-Loss' reference model -----
def reference_model(cfg, vocab_size: int, layout: Layout) -> torch.nn.Module:
    """RHO-Loss' reference model, built for this run's layout (with a pipeline: this stage's
    PipelineModule, which the scoring schedule runs), weights from selection.reference_checkpoint."""
    model = model_from_checkpoint(cfg, vocab_size, layout, Path(cfg.selection.reference_checkpoint),
                                  "selection.reference_checkpoint")
    if layout.pipeline > 1:
        deepspeed_internals.stop_layer_seeding(model)  # eval only: must not reseed the training's random streams
    return model.eval()


def model_from_checkpoint(cfg, vocab_size: int, layout: Layout, folder: Path, key: str) -> torch.nn.Module:
    """The model built for this run's layout, weights from a step_N checkpoint folder of a run of the
    same model and tensor-parallel size, at any pipeline size (`key` names the setting in errors).

    DeepSpeed writes a model without a pipeline whole, as mp_rank_<tp>_model_states.pt (keys
    `layers.<i>.<name>`), and a pipeline one per layer, as layer_<i>-model_<tp>-model_states.pt (keys
    `<name>`; a tied layer only where it is first used). Either way layer i of the layer specs gets
    its weights, so the pipeline sizes of the two runs need not agree. Every rank checks every file
    that any rank reads before anything is loaded, so all ranks refuse alike."""
    what = f"{key} '{folder}'"
    allowed = "a step_N checkpoint folder of a run of the same model and parallel.tensor (any parallel.pipeline)"
    if not folder.is_dir():
        raise ConfigError(f"{what} is not a folder; allowed: {allowed}")
    saved = read_shape(folder, allowed, what=key)
    shape = shape_of(cfg)
    key = shape_difference(saved, shape, ignore=("parallel.pipeline",))
    if key is not None:
        raise ConfigError(f"{what} holds another model: it was saved with {key}={saved.get(key)!r}, this run has "
                          f"{key}={shape.get(key)!r}; allowed: {allowed}")
    specs = layer_specs(ModelSpec.from_config(cfg, vocab_size))
    owner = _layer_owners(specs)  # layer index -> index of the layer whose weights it uses
    pipelined = saved.get("parallel.pipeline", 1) > 1

    def files(tensor_rank: int) -> dict:  # layer index -> the file holding its weights
        return deepspeed_internals.model_state_files(folder, set(owner), tensor_rank, pipelined)

    for tensor_rank in range(layout.tensor):
        missing = sorted({p.name for p in files(tensor_rank).values() if not p.is_file()})
        if missing:
            raise ConfigError(f"{what} has no {missing[0]}; allowed: {allowed}")
    mine = files(layout.tensor_rank)
    model = build_model(cfg, vocab_size, layout)
    if layout.pipeline > 1:  # this stage's layers; a tied layer's module also where only its forward_fn is used
        local = deepspeed_internals.local_layer_modules(model, specs)
    else:  # SequentialGPT holds each module once, in the order of first use
        local = dict(zip(sorted(set(owner)), model.layers, strict=True))
    loaded = {}  # file -> its state (the whole model's file is read once)
    for i, layer in local.items():
        path = mine[owner[i]]
        if path not in loaded:  # tensors and plain values only
            loaded[path] = torch.load(path, map_location="cpu", weights_only=True)
        state = deepspeed_internals.saved_module_state(loaded[path], pipelined)
        if not pipelined:
            prefix = f"layers.{owner[i]}."
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            layer.load_state_dict(state)
        except RuntimeError as e:
            raise ConfigError(f"{what} holds another model shape in {path.name} ({str(e).splitlines()[0][:200]}); "
                              f"allowed: {allowed}") from None
    return model.to(device())


def _layer_owners(specs: list) -> list:
    """Per layer spec: the index of the spec whose module it is (itself, or the first use of a tied layer)."""
    from deepspeed.pipe import TiedLayerSpec

    first = {}
    return [first.setdefault(spec.key, i) if isinstance(spec, TiedLayerSpec) else i for i, spec in enumerate(specs)]
