"""The one home of DeepSpeed's private API, and the start-up check that the installed DeepSpeed has it.

The rest of the project uses DeepSpeed's documented API (deepspeed.initialize, the engines' backward,
step, train_batch, eval_batch, checkpoint and get_* methods, deepspeed.pipe, the pipeline schedule
instructions, the accelerator) and the functions here. Everything below reads, patches or calls
names DeepSpeed does not document: a release may move any of them, which would fail deep inside a
step or silently change what it does. So only the releases in SUPPORTED are accepted (the ones this
code was run against; requirements.txt pins the same), and check_deepspeed() ends a run with another
one, or one that lacks a name, at start-up with one line.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from pathlib import Path
from typing import Optional

from megatron_greats.errors import DependencyError

SUPPORTED = "==0.19.8"  # a pip version specifier; requirements.txt has the line "deepspeed" + SUPPORTED

# What this module uses on DeepSpeed's classes and modules: (module, class or None, names).
# "name(param)": a callable that must take the keyword `param`.
REQUIRED = (
    ("deepspeed.runtime.pipe.engine", "PipelineEngine", ("_INSTRUCTION_MAP", "_exec_schedule")),
    ("deepspeed.runtime.engine", "DeepSpeedEngine",
     ("clip_fp32_gradients", "set_gradient_accumulation_boundary(is_boundary)", "backward(scale_wrt_gas)")),
    ("deepspeed.runtime.bf16_optimizer", "BF16_Optimizer", ("clear_lp_grads", "update_hp_grads(clear_lp_grads)")),
    ("deepspeed.utils.tensor_fragment", "tensor_fragment", ("get_hp_fragment",)),
    ("deepspeed.utils", None, ("lazy_init_hp_params_optimizer_state",)),
    ("deepspeed.comm.torch", None, ("build_shm_op",)),
)

# Attributes that exist only once an engine or PipelineModule is built (checked by check_engine).
# The exchange state: how DeepSpeed's Send/Recv instructions describe the training micro-batches.
EXCHANGE_STATE = ("dynamic_shape", "is_pipe_partitioned", "is_grad_partitioned", "first_output_send",
                  "pipe_recv_buf", "grad_layer", "_grad_layer_buf", "meta_buffer")
PIPELINE_ENGINE_STATE = ("pipe_buffers", "grid", "num_stages", "stage_id", "using_bf16_optimizer", *EXCHANGE_STATE)
PIPELINE_MODULE_STATE = ("tied_comms", "tied_modules", "forward_funcs", "_local_start", "_local_stop",
                         "micro_offset", "seed_layers", "activation_checkpoint_interval")

_checked = False


# ---- the check ----------------------------------------------------------------------------------
def installed_version() -> str:
    import deepspeed

    return deepspeed.__version__


def deepspeed_targets() -> list:
    """REQUIRED resolved: [(label, object or None where the module or class is gone, names)]."""
    import importlib

    targets = []
    for module_name, class_name, names in REQUIRED:
        try:
            obj = importlib.import_module(module_name)
        except ImportError:
            obj = None
        if obj is not None and class_name is not None:
            obj = getattr(obj, class_name, None)
        targets.append((class_name or module_name, obj, names))
    return targets


def missing(targets) -> list:
    """'label.name' for each name (or the whole label) that a target lacks."""
    out = []
    for label, obj, names in targets:
        if obj is None:
            out.append(label)
            continue
        for name in names:
            attr, _, param = name.partition("(")
            value = getattr(obj, attr, None)
            if value is None or (param and param.rstrip(")") not in _parameters(value)):
                out.append(f"{label}.{name}")
    return out


def _parameters(fn) -> tuple:
    """fn's parameter names, through decorators that take (*args, **kwargs) (DeepSpeed's
    instrument_w_nvtx keeps the function in its closure, not in __wrapped__)."""
    try:
        for _ in range(8):
            params = inspect.signature(fn, follow_wrapped=True).parameters
            if any(p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values()):
                break
            inner = [c.cell_contents for c in getattr(fn, "__closure__", None) or ()
                     if inspect.isfunction(c.cell_contents)]
            if len(inner) != 1:
                break
            fn = inner[0]
        return tuple(inspect.signature(fn, follow_wrapped=True).parameters)
    except (TypeError, ValueError):
        return ()


def _error(version: str, lacking: list) -> DependencyError:
    lacks = f" (missing: {', '.join(lacking)})" if lacking else ""
    return DependencyError(f"DeepSpeed {version} is installed{lacks}; megatron_greats supports deepspeed{SUPPORTED} "
                           f"(it uses DeepSpeed internals that other releases may move); "
                           f"allowed: pip install 'deepspeed{SUPPORTED}'")


def check_deepspeed(version: Optional[str] = None, targets: Optional[list] = None) -> None:
    """Raise DependencyError (one line) unless the DeepSpeed release is in SUPPORTED and has every name
    in REQUIRED. Defaults: the installed DeepSpeed (checked once per process)."""
    global _checked
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    defaults = version is None and targets is None
    if defaults and _checked:
        return
    version = installed_version() if version is None else version
    lacking = missing(deepspeed_targets() if targets is None else targets)
    try:
        in_range = Version(version) in SpecifierSet(SUPPORTED)
    except InvalidVersion:
        in_range = False
    if lacking or not in_range:
        raise _error(version, lacking)
    _checked = defaults


def require(obj, label: str, names) -> None:
    """The same one-line error where a built object (engine, module) lacks an attribute this module uses."""
    lacking = [f"{label}.{name}" for name in names if not hasattr(obj, name)]
    if lacking:
        raise _error(installed_version(), lacking)


def check_engine(engine) -> None:
    """Right after deepspeed.initialize: the attributes a built pipeline engine and module must have."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    if isinstance(engine, PipelineEngine):
        require(engine, "PipelineEngine", PIPELINE_ENGINE_STATE)
        require(engine.module, "PipelineModule", PIPELINE_MODULE_STATE)


# ---- pipeline engine: running schedules of our own ----------------------------------------------
def make_schedule(engine, kind, micro_batches: int):
    """A PipeSchedule subclass for this stage."""
    return kind(micro_batches=micro_batches, stages=engine.num_stages, stage_id=engine.stage_id)


def pipe_buffer(engine, kind: str, buffer_id: int):
    """kind: 'inputs', 'labels' or 'outputs'."""
    return engine.pipe_buffers[kind][buffer_id]


def set_pipe_buffer(engine, kind: str, buffer_id: int, value) -> None:
    engine.pipe_buffers[kind][buffer_id] = value


def received_grad(engine):
    """The gradient w.r.t. this stage's output that RecvGrad left (a view of a reused buffer)."""
    return engine.grad_layer


def deepspeed_instruction(engine, kind):
    """DeepSpeed's own fn(engine, **kwargs) for an instruction class."""
    return type(engine)._INSTRUCTION_MAP[kind]


@contextlib.contextmanager
def separate_exchange(engine):
    """Exchange state of its own for micro-batches of other shapes than training's: shapes are exchanged
    every time, nothing is partitioned; training's state comes back afterwards, the run's activations go."""
    saved = {name: getattr(engine, name) for name in EXCHANGE_STATE}
    engine.dynamic_shape = True
    engine.is_pipe_partitioned = engine.is_grad_partitioned = False
    engine._grad_layer_buf = []  # do not resize the buffers training's grad_layer views
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(engine, name, value)
        for buffers in engine.pipe_buffers.values():
            buffers[:] = [None] * len(buffers)


@contextlib.contextmanager
def with_instructions(engine, extra: dict):
    """This engine executes DeepSpeed's instructions and `extra` (class -> fn(engine, **kwargs)) meanwhile."""
    engine._INSTRUCTION_MAP = {**type(engine)._INSTRUCTION_MAP, **extra}
    try:
        yield
    finally:
        del engine._INSTRUCTION_MAP  # back to the class's map


def execute_schedule(engine, schedule) -> None:
    engine._exec_schedule(schedule)


@contextlib.contextmanager
def bf16_master_gradients(engine):
    """Around a backward outside engine.backward, as PipelineEngine's BackwardPass: the bf16 optimizer's
    low-precision grads are cleared before and added into its fp32 master gradients after."""
    bf16 = engine.using_bf16_optimizer
    if bf16:
        engine.optimizer.clear_lp_grads()
    yield
    if bf16:
        engine.optimizer.update_hp_grads(clear_lp_grads=False)


def pipeline_grid(engine) -> Optional[tuple]:
    """(tensor rank, model-parallel group) from a pipeline engine's grid; None for a plain engine."""
    grid = getattr(engine, "grid", None)
    return None if grid is None else (grid.get_slice_parallel_rank(), grid.get_model_parallel_group())


# ---- plain engine -------------------------------------------------------------------------------
def backward_whole_step(engine, loss) -> None:
    """One backward that carries a whole optimizer step: at the accumulation boundary, and the loss is
    not divided by the gradient-accumulation steps (it is already the mean)."""
    engine.set_gradient_accumulation_boundary(True)
    engine.backward(loss, scale_wrt_gas=False)


# ---- the optimizer step -------------------------------------------------------------------------
def wraps_optimizer(optimizer) -> bool:
    """DeepSpeed's ZeRO, bf16 and fp16 wrappers (they keep an `overflow` flag): they compute the global
    norm, clip and skip a non-finite step themselves."""
    return hasattr(optimizer, "overflow")


def replace_plain_optimizer_step(engine, step) -> None:
    """engine.step() calls step(real_step, *args, **kwargs) instead of the plain torch optimizer's step,
    and no longer clips before it (DeepSpeedEngine.clip_fp32_gradients): `step` does."""
    optimizer = engine.optimizer
    engine.clip_fp32_gradients = lambda: None
    real_step = optimizer.step

    # wraps: keeps the LR scheduler's mark on its own wrapper of optimizer.step (which real_step is, and
    # which still runs), so torch does not warn that the step was overridden after the scheduler's start
    @functools.wraps(real_step)
    def replaced(*args, **kwargs):
        return step(real_step, *args, **kwargs)

    optimizer.step = replaced


def record_step(optimizer, norm: float, skipped: bool) -> None:
    """Where the engine reads, after optimizer.step(), the norm (get_global_grad_norm()) and whether the
    step was skipped (then: no LR-schedule step, skipped_steps + 1, was_step_applied() False)."""
    optimizer._global_grad_norm = norm
    optimizer.overflow = skipped


def is_pipeline_copy(param) -> bool:
    """A tied weight's copy on a later pipeline stage (its first stage's copy is the one that counts)."""
    return getattr(param, "ds_pipe_replicated", False)


# ---- optimizer state under ZeRO-1/2 and bf16 ----------------------------------------------------
def torch_optimizer(engine):
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO, bf16), or the engine's own."""
    import torch

    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def has_state_fragments(param) -> bool:
    """The parameter's optimizer state lives in flat partitions over the data-parallel ranks."""
    return getattr(param, "_hp_mapping", None) is not None or hasattr(param, "_dp_group")


def data_parallel_group(param):
    """The group its flat partitions are spread over."""
    return param._dp_group


def state_fragment(param, key: str) -> Optional[tuple]:
    """(start, numel, tensor): this rank's fragment of the parameter's optimizer state `key`, as a slice
    of the flattened parameter; None where this rank holds none of it."""
    mapping = param._hp_mapping
    if mapping is None:
        return None
    address = mapping.lp_fragment_address
    return address.start, address.numel, mapping.get_hp_fragment(key)


def link_state_fragments(engine) -> None:
    """Point every parameter's fragment mapping at the optimizer state of its flat partition.

    DeepSpeed 0.19 links them once, right after the first parameter group's step, when the later
    groups have no state yet (their fragments stay empty); linking again is cheap (views)."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    wrapper, state = engine.optimizer, torch_optimizer(engine).state
    lp_groups = getattr(wrapper, "bit16_groups", None) or getattr(wrapper, "bf16_groups", None)
    partitions = getattr(wrapper, "single_partition_of_fp32_groups", None) or \
        getattr(wrapper, "fp32_groups_flat_partition", None)
    if lp_groups is None or partitions is None:
        raise NotImplementedError(f"selection.preconditioner=adam: cannot read Adam's state from "
                                  f"{type(wrapper).__name__}")
    for lp, flat in zip(lp_groups, partitions):
        if flat in state:
            lazy_init_hp_params_optimizer_state(lp, flat, state)


# ---- PipelineModule -----------------------------------------------------------------------------
def tied_weights(model) -> list:
    """[(module, weight attribute paths, group, ranks)] per weight a PipelineModule ties across stages,
    in key order; [] for any other module."""
    return [(comm["module"], comm["weight_attr"], comm["group"], comm["ranks"])
            for _, comm in sorted(getattr(model, "tied_comms", {}).items())]


def local_layer_modules(model, specs: list) -> dict:
    """{layer index: module} of this stage's layers; a tied layer's module also where only its
    forward_fn is used."""
    from deepspeed.pipe import TiedLayerSpec

    require(model, "PipelineModule", PIPELINE_MODULE_STATE)
    return {i: model.tied_modules[specs[i].key] if isinstance(specs[i], TiedLayerSpec) else
            model.forward_funcs[i - model._local_start] for i in range(model._local_start, model._local_stop)}


def micro_offset(module) -> int:
    """A PipelineModule's micro-batch counter (it seeds dropout per micro-batch); 0 for other modules."""
    return int(getattr(module, "micro_offset", 0))


def set_micro_offset(module, value: int) -> None:
    if hasattr(module, "micro_offset"):
        module.micro_offset = value


def stop_layer_seeding(model) -> None:
    """Its forward no longer reseeds the random streams per layer (seed_layers=True at construction)."""
    model.seed_layers = False


@contextlib.contextmanager
def without_activation_checkpointing(module):
    """A PipelineModule that recomputes no activations meanwhile (no-op for other modules)."""
    if not hasattr(module, "activation_checkpoint_interval"):
        yield
        return
    saved = module.activation_checkpoint_interval
    module.activation_checkpoint_interval = 0
    try:
        yield
    finally:
        module.activation_checkpoint_interval = saved


# ---- checkpoint files ---------------------------------------------------------------------------
def model_state_files(folder: Path, layers, tensor_rank: int, pipelined: bool) -> dict:
    """{layer index: the file of a step_N folder holding its weights}: a model without a pipeline is
    saved whole per tensor rank (keys `layers.<i>.<name>` under "module"), a pipeline one per layer
    (keys `<name>`; a tied layer only where it is first used)."""
    if not pipelined:
        return {i: folder / f"mp_rank_{tensor_rank:02d}_model_states.pt" for i in layers}
    return {i: folder / f"layer_{i:02d}-model_{tensor_rank:02d}-model_states.pt" for i in layers}


def saved_module_state(loaded: dict, pipelined: bool) -> dict:
    """The module's state dict in a loaded model_states file."""
    return loaded if pipelined else loaded["module"]


# ---- CPU ----------------------------------------------------------------------------------------
def skip_shm_op_build() -> None:
    """DeepSpeed compiles a shared-memory all-reduce op at init on CPU (55-90 s with ninja); gloo does
    the same reductions."""
    import importlib

    # through sys.modules: the attribute deepspeed.comm.torch is shadowed by the torch module
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
