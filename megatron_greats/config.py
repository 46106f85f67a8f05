"""The run configuration: one schema, YAML files plus dotted overrides, validated before any heavy work.

Every key has a type and a default; unknown keys, wrong types and values outside what is allowed raise
ConfigError with one line naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

import copy
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from megatron_greats.choices import (ADAM, ADAMW, ALIGNMENTS, ARCHS, BF16, DOT, EMBEDDED, ETA_AUTO, FILE_FORMATS,
                                     FILES, FORMAT_AUTO, FP32, GPT2, LLAMA, MEGATRON, NO_PRECONDITIONER,
                                     OPTIMIZERS, PRECISIONS, PRECONDITIONERS, SOURCES, WINDOW_PLACEMENTS,
                                     WINDOW_START)
from megatron_greats.data.splits import (EMBEDDED_TARGET, HELD_OUT, crawl_problem, fractions_problem,
                                        prefixes_problem)
from megatron_greats.errors import ConfigError
from megatron_greats.selection.catalog import (CATALOG, NOTED_KEYS, SINGLE_PASS, TWO_PASS, UPDATE_MODES, MethodSpec,
                                               methods_reading, spec_of)


@dataclass(frozen=True)
class Key:
    """One config key: allowed types, default, and an optional check returning an error text or None."""

    types: tuple
    default: Any
    check: Optional[Callable[[Any], Optional[str]]] = None
    help: str = ""


def _eta_problem(v):
    allowed = f"allowed: > 0, {ETA_AUTO}, or null"
    if isinstance(v, str):
        return None if v == ETA_AUTO else allowed
    return None if v > 0 else allowed


def _one_of(*allowed):
    return lambda v: None if v in allowed else f"allowed: {', '.join(map(str, allowed))}"


def _at_least(lo):
    return lambda v: None if v >= lo else f"allowed: >= {lo}"


def _fraction(v):
    return None if 0.0 < v < 1.0 else "allowed: a number in (0, 1)"


def _positive_or_null(v):
    return None if v is None or v > 0 else "allowed: > 0 or null"


def _non_negative(v):
    return None if v >= 0 else "allowed: >= 0"


def _a_method(or_null: str = ""):
    return lambda v: None if v in CATALOG else f"allowed: {', '.join(CATALOG)}{or_null}"


INT, FLOAT, STR, BOOL = (int,), (float, int), (str,), (bool,)
OPT_INT, OPT_FLOAT, OPT_STR = (int, type(None)), (float, int, type(None)), (str, type(None))

SCHEMA: dict = {
    "seed": Key(INT, 1234, help="seed of initialisation, data order and selection"),
    "run_dir": Key(STR, "runs/default", help="outputs: tensorboard/, metrics.jsonl, checkpoints/, config.yaml"),
    "data": {
        "source": Key(STR, EMBEDDED, _one_of(*SOURCES)),
        "cache_dir": Key(STR, "data_cache", help="built corpus, tokenizer and indexed data are cached here"),
        "crawl": Key(BOOL, False, help="source=embedded: add the crawl-like fourth domain (licence texts, "
                                      "RECORD hash lines, package metadata; docs/data.md), never the target"),
        "files": Key((list,), [], help="source=files: local json/jsonl/parquet/text files"),
        "format": Key(STR, FORMAT_AUTO, _one_of(FORMAT_AUTO, *FILE_FORMATS)),
        "text_field": Key(STR, "text"),
        "domain_field": Key(OPT_STR, None),
        "megatron_prefixes": Key((dict, type(None)), None,
                                 help="source=megatron: {train: prefix, val: prefix, test: prefix, "
                                      "selection: prefix}"),
        "target_domain": Key(OPT_STR, None,
                             help=f"{', '.join(HELD_OUT)} are held-out documents of this domain; null: "
                                  f"{EMBEDDED_TARGET} for source=embedded, else the data's only domain"),
        # One key per held-out split (data/splits.py HELD_OUT): its fraction of the target domain's documents
        **{split.key: Key(FLOAT, split.default, _fraction, help=f"{name}: {split.use}")
           for name, split in HELD_OUT.items()},
        "split_seed": Key(INT, 1234),
        "max_docs_per_domain": Key(OPT_INT, None, _positive_or_null),
    },
    "tokenizer": {
        "model": Key(OPT_STR, None, help="an existing sentencepiece .model; null trains one on the train split"),
        "vocab_size": Key(INT, 4096, _at_least(320), help="at least 320: 256 byte-fallback pieces + specials"),
    },
    "model": {
        "arch": Key(STR, GPT2, _one_of(*ARCHS)),
        "num_layers": Key(INT, 2, _at_least(1)),
        "hidden_size": Key(INT, 64, _at_least(1)),
        "num_heads": Key(INT, 4, _at_least(1)),
        "ffn_hidden_size": Key(OPT_INT, None, help="null: 4*hidden (gpt2) or 8/3*hidden rounded to 64 (llama)"),
        "seq_len": Key(INT, 64, _at_least(8)),
        "tie_embeddings": Key(BOOL, True),
        "dropout": Key(FLOAT, 0.0, lambda v: None if 0.0 <= v < 1.0 else "allowed: [0, 1)"),
        "init_std": Key(FLOAT, 0.02, lambda v: None if v > 0 else "allowed: > 0"),
        "norm_eps": Key(FLOAT, 1e-5, lambda v: None if v > 0 else "allowed: > 0"),
        "rope_base": Key(FLOAT, 10000.0, lambda v: None if v > 1 else "allowed: > 1"),
        "activation_checkpointing": Key(BOOL, False, help="recompute each transformer layer in backward"),
        "vocab_pad_multiple": Key(INT, 128, _at_least(1),
                                  help="vocab padded to this multiple (must be divisible by parallel.tensor)"),
    },
    "parallel": {
        "tensor": Key(INT, 1, _at_least(1)),
        "pipeline": Key(INT, 1, _at_least(1)),
        "sequence_parallel": Key(BOOL, False),
        "pipeline_partition": Key(STR, "type:TransformerLayer",
                                  help="DeepSpeed PipelineModule partition_method"),
        "distributed_timeout_minutes": Key(FLOAT, 30.0, lambda v: None if v > 0 else "allowed: > 0",
                                           help="a collective waiting longer than this fails the run (a rank "
                                                "died or hangs) instead of hanging"),
    },
    "zero": {
        "stage": Key(INT, 0, _one_of(0, 1, 2, 3)),
    },
    "selection": {
        "method": Key(STR, "greats", _a_method(), help="greats, or a baseline; regular = plain training on k samples "
                                                      "from the stream"),
        "early_method": Key(OPT_STR, None, _a_method(", or null"),
                            help="phase gating: the method of the first selection.early_steps steps, each taken "
                                 "exactly as a run of this method takes it (its candidates, scoring and update); "
                                 "selection.method takes the steps after them. null: selection.method throughout"),
        "early_steps": Key(INT, 0, _non_negative,
                           help="how many steps (the first ones, from step 0 of the run) selection.early_method "
                                "takes; 0: none"),
        "candidates": Key(OPT_INT, None, lambda v: None if v > 0 else "allowed: > 0 or null",
                          help="N candidates per data-parallel replica and step (null: 2k)"),
        "select": Key(OPT_INT, None, lambda v: None if v > 0 else "allowed: > 0 or null",
                      help="k samples trained on per replica (null: train.global_batch / data-parallel size)"),
        "val_batch": Key(INT, 4, _at_least(1),
                         help="m validation samples per step, from the selection split (target domain, rotating)"),
        "score_micro_batch": Key(OPT_INT, None, lambda v: None if v > 0 else "allowed: > 0 or null",
                                 help="samples per scoring forward/backward (null: all N + m at once)"),
        "eta": Key(OPT_FLOAT + STR, None, _eta_problem,
                   help="GREATS step size; null: the step's scheduled learning rate; auto: the optimizer's real "
                        "per-sample step scale, lr (1 - beta1) / ((1 - beta1^t) k) with the adam preconditioner "
                        "and lr / k without"),
        "preconditioner": Key(STR, NO_PRECONDITIONER, _one_of(*PRECONDITIONERS),
                              help="adam: score with AdamW's own diagonal D = 1 / (sqrt(v_hat) + eps), "
                                   "phi_i = eta <D g_i, g_val> and interaction eta^2 <D g_i, D g_j>; none: raw "
                                   "gradients (an SGD step)"),
        "alignment": Key(STR, DOT, _one_of(*ALIGNMENTS),
                         help="greats, first_order: cosine scores each candidate's unit gradient g_i / |g_i| "
                              "(no bias toward large gradients); dot: g_i itself"),
        "target_ema": Key(FLOAT, 0.0, lambda v: None if 0.0 <= v < 1.0 else "allowed: [0, 1)",
                          help="greats, first_order: align with an exponential moving average of the steps' mean "
                               "validation gradients, G_t = beta G_(t-1) + (1 - beta) g_val (bias-corrected: "
                               "G_t / (1 - beta^t), so the first step is unchanged), with beta this value, instead of "
                               "this step's g_val alone (0, the default); the average smooths the noise of a step's "
                               "m validation samples. Costs one copy of the scored parameters (kept, and saved with "
                               "each checkpoint) and about one GEMM per scored layer per step"),
        "temperature": Key(FLOAT, 0.0, lambda v: None if v >= 0 else "allowed: >= 0",
                           help="greats: 0 picks the largest gain; > 0 samples each pick with probability "
                                "proportional to exp(gain / (temperature x the gains' standard deviation))"),
        "self_term": Key(BOOL, False, help="GREATS variant: subtract (eta^2/2)||g_i||^2"),
        "batch_mean": Key(BOOL, False, help="GREATS variant: eta / k (the update averages k gradients)"),
        "score_exclude": Key((list,), [], help="parameter-name patterns left out of the score"),
        "score_window": Key(OPT_INT, None, _positive_or_null,
                            help="score each candidate and validation sample on a window of this many tokens (its "
                                 "losses and gradients over them); training still reads the whole sequence. "
                                 "null: the whole sequence"),
        "score_window_at": Key(STR, WINDOW_START, _one_of(*WINDOW_PLACEMENTS),
                               help="start: the first score_window tokens of every sample (the same tokens, with the "
                                    "same context, as in training); random: one offset per step, drawn from the "
                                    "seed and the step, shared by all samples (logged in selection.jsonl)"),
        "score_layers": Key(OPT_INT, None, _positive_or_null,
                            help="score only the top L transformer layers and the layers above them (final norm, "
                                 "untied output layer); the scoring backward stops below them, and embeddings (a "
                                 "tied one included) are left out of the score. null: every layer"),
        "prefilter": Key(OPT_INT, None, _positive_or_null,
                         help="M: a forward over all N candidates first, then only the M with the highest loss "
                              "are scored with gradients and selected from (k <= M < N). null: all N"),
        "reference_checkpoint": Key(OPT_STR, None, help="rholoss: checkpoint folder (step_N) of a reference run"),
        "update": Key(STR, SINGLE_PASS, _one_of(*UPDATE_MODES),
                      help="for the methods that score with the Gram (greats, first_order, gradnorm); single_pass: "
                           "the selected samples' gradient formed from the scoring pass's own layer operands (no "
                           "second pass; needs model.dropout=0 and zero.stage<=2); two_pass: an ordinary "
                           "forward/backward on them. The other methods always take an ordinary step, and so does "
                           "a scoring pass with score_window or score_layers (single_pass then falls back to "
                           "two_pass, with a note)"),
    },
    "train": {
        "steps": Key(INT, 100, _at_least(1)),
        "global_batch": Key(INT, 8, _at_least(1), help="samples per optimizer step, over all replicas"),
        "micro_batch": Key(INT, 4, _at_least(1), help="samples per forward pass per replica"),
        "precision": Key(STR, FP32, _one_of(*PRECISIONS)),
        "optimizer": Key(STR, ADAMW, _one_of(*OPTIMIZERS),
                         help="adamw, or sgd: plain SGD without momentum (its step is lr x gradient, so "
                              "checks can see the gradient's scale, which AdamW divides out)"),
        "lr": Key(FLOAT, 1e-3, lambda v: None if v > 0 else "allowed: > 0"),
        "min_lr": Key(FLOAT, 1e-4, _non_negative),
        "warmup_steps": Key(INT, 10, _non_negative),
        "weight_decay": Key(FLOAT, 0.1, _non_negative),
        "beta1": Key(FLOAT, 0.9, _fraction),
        "beta2": Key(FLOAT, 0.95, _fraction),
        "adam_eps": Key(FLOAT, 1e-8, lambda v: None if v > 0 else "allowed: > 0"),
        "grad_clip": Key(FLOAT, 1.0, _non_negative, help="0 disables clipping"),
        "log_interval": Key(INT, 1, _at_least(1)),
        "eval_interval": Key(INT, 50, _at_least(0), help="0 evaluates only at the end"),
        "eval_batches": Key(INT, 4, _at_least(1), help="global batches per evaluation of val and test"),
        "save_interval": Key(INT, 0, _at_least(0), help="0 saves only at the end"),
        "max_skipped_steps": Key(INT, 20, _at_least(1),
                                 help="stop (with a checkpoint) after this many non-finite steps in a row"),
        "resume": Key(BOOL, True, help="resume from run_dir/checkpoints when a checkpoint is there"),
        "init_checkpoint": Key(OPT_STR, None,
                               help="start from the weights of this step_N checkpoint folder (same model and "
                                    "parallel.tensor, any pipeline size); fresh optimizer, schedule and data "
                                    "stream: continued pretraining. A resumed run continues from its own checkpoint"),
        "progress": Key(BOOL, True, help="show a progress bar on rank 0"),
    },
}


# Names Megatron-LM / Hugging Face users type for our keys.
ALIASES = {
    "learning_rate": "lr", "lerning_rate": "lr", "max_lr": "lr", "lr_warmup_steps": "warmup_steps",
    "lr_warmup_iters": "warmup_steps", "train_iters": "steps", "max_steps": "steps",
    "micro_batch_size": "micro_batch", "global_batch_size": "global_batch", "clip_grad": "grad_clip",
    "max_grad_norm": "grad_clip", "tensor_model_parallel_size": "tensor",
    "pipeline_model_parallel_size": "pipeline", "seq_length": "seq_len", "num_attention_heads": "num_heads",
    "hidden_dropout": "dropout", "untie_embeddings_and_output_weights": "tie_embeddings",
}


def _suggest(name: str, options) -> str:
    if ALIASES.get(name) in options:
        return f" (did you mean '{ALIASES[name]}'?)"
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _defaults(schema: dict) -> dict:
    return {k: (_defaults(v) if isinstance(v, dict) else copy.deepcopy(v.default)) for k, v in schema.items()}


def _merge(base: dict, update: dict, schema: dict, prefix: str) -> None:
    if not isinstance(update, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {update!r}")
    for name, value in update.items():
        dotted = f"{prefix}{name}"
        if name not in schema:
            raise ConfigError(f"unknown config key '{dotted}'{_suggest(name, schema)}")
        if isinstance(schema[name], dict):
            _merge(base[name], value, schema[name], dotted + ".")
        else:
            base[name] = value


def _check_types(cfg: dict, schema: dict, prefix: str = "") -> None:
    for name, key in schema.items():
        dotted, value = f"{prefix}{name}", cfg[name]
        if isinstance(key, dict):
            _check_types(value, key, dotted + ".")
            continue
        if float in key.types and isinstance(value, str):
            value = cfg[name] = _yaml11_float(value)
        # bool is an int subclass in Python: never accept it where a number is meant
        if isinstance(value, bool) and bool not in key.types:
            ok = False
        else:
            ok = isinstance(value, key.types)
        if not ok:
            allowed = " or ".join("null" if t is type(None) else t.__name__ for t in key.types)
            raise ConfigError(f"config key '{dotted}' has value {value!r} of type {type(value).__name__}; "
                              f"allowed type: {allowed}")
        if key.check is not None and value is not None:
            problem = key.check(value)
            if problem:
                raise ConfigError(f"config key '{dotted}' has value {value!r}; {problem}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.steps=5' -> (['train', 'steps'], 5); the value is parsed as YAML (safe_load)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form dotted.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _yaml11_float(value: str):
    """PyYAML (YAML 1.1) reads 1e-4 or 3e30 as strings; everyone means the number."""
    try:
        number = float(value)
    except ValueError:
        return value
    if any(c in value.lower() for c in ".e") and value.strip().lower() not in ("nan", "inf", "-inf", "+inf"):
        return number
    return value


def _nest(path: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def load_config(path: Optional[str] = None, overrides: tuple = (), world_size: Optional[int] = None) -> "Config":
    """Defaults <- YAML file <- dotted overrides; then every check, including the layout against world_size."""
    cfg = _defaults(SCHEMA)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' does not exist; allowed: a YAML file such as configs/tiny-cpu.yaml")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML ({str(e).splitlines()[0]}); allowed: a YAML "
                              "mapping of sections such as configs/tiny-cpu.yaml") from None
        _merge(cfg, loaded, SCHEMA, "")
    for text in overrides:
        keys, value = parse_override(text)
        _merge(cfg, _nest(keys, value), SCHEMA, "")
    _check_types(cfg, SCHEMA)
    config = Config(cfg)
    config.check_combinations(world_size)
    return config


class Config:
    """Attribute access over the validated nested dict: cfg.train.steps. method_key: the key that named
    this config's selection.method (a phase's config, early_config(), names selection.early_method)."""

    def __init__(self, tree: dict, method_key: str = "selection.method"):
        object.__setattr__(self, "_tree", tree)
        object.__setattr__(self, "method_key", method_key)

    def __getattr__(self, name):
        tree = object.__getattribute__(self, "_tree")
        if name not in tree:
            raise AttributeError(name)
        value = tree[name]
        return Config(value) if isinstance(value, dict) and not name.endswith("prefixes") else value

    def __setattr__(self, name, value):
        raise AttributeError("Config is read-only; use overrides")

    def to_dict(self) -> dict:
        return copy.deepcopy(object.__getattribute__(self, "_tree"))

    def with_value(self, dotted: str, value) -> "Config":
        """A copy with one key set to a value the run resolved (e.g. data.target_domain from the data),
        so that config.yaml records what ran."""
        tree = self.to_dict()
        *parents, last = dotted.split(".")
        node = tree
        for key in parents:
            node = node[key]
        node[last] = value
        return Config(tree, self.method_key)

    def dump(self, path: str) -> None:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)
        os.replace(tmp, path)

    # ---- derived values -------------------------------------------------------------------------
    @property
    def ffn_hidden_size(self) -> int:
        m = self.model
        if m.ffn_hidden_size is not None:
            return m.ffn_hidden_size
        if m.arch == LLAMA:
            return 64 * ((int(8 * m.hidden_size / 3) + 63) // 64)
        return 4 * m.hidden_size

    def num_selected(self, world_size: int) -> int:
        """k: samples each data-parallel replica trains on per step."""
        return self.train.global_batch // self.data_parallel_size(world_size)

    def num_candidates(self, world_size: int) -> int:
        """N: candidates each replica scores per step."""
        n = self.selection.candidates
        return 2 * self.num_selected(world_size) if n is None else n

    @property
    def method(self) -> MethodSpec:
        """selection.method's facts (selection/catalog.py)."""
        return spec_of(self.selection.method)

    # ---- phase gating: selection.early_method for the first selection.early_steps steps ----------------
    @property
    def phased(self) -> bool:
        """Whether the first selection.early_steps steps are taken by selection.early_method."""
        sel = self.selection
        return sel.early_method is not None and sel.early_steps > 0

    def early_config(self) -> "Config":
        """The config the early steps are taken with: this one with selection.method = early_method, and
        no phases of its own (every other key, the candidates N, window, ... as they are)."""
        tree = self.to_dict()
        sel = tree["selection"]
        sel["method"], sel["early_method"], sel["early_steps"] = sel["early_method"], None, 0
        return Config(tree, method_key="selection.early_method")

    def phases(self) -> list:
        """The configs this run's steps are taken with, in step order: [early_config(), self] where
        phased, else [self]."""
        return [self.early_config(), self] if self.phased else [self]

    def methods_named(self) -> str:
        """'selection.method=greats', or where phased 'selection.early_method=maxloss nor selection.method=greats'
        (for 'is not read by ...')."""
        return " nor ".join(f"{phase.method_key}={phase.selection.method}" for phase in self.phases())

    def num_scored(self, world_size: int) -> int:
        """The candidates scored with gradients per replica: the prefilter's M, or all N."""
        prefilter = self.selection.prefilter
        return self.num_candidates(world_size) if prefilter is None or not self.method.reads("prefilter") \
            else prefilter

    def partial_scoring(self) -> list[str]:
        """The settings, as 'key=value', with which the scoring pass covers less than every layer over the
        whole sequence (those single_pass cannot form an update from)."""
        sel = self.selection
        keys = [key for key in ("score_window", "score_layers")
                if getattr(sel, key) is not None and self.method.reads(key)]
        return [f"selection.{key}={getattr(sel, key)}" for key in keys]

    def update_mode(self) -> str:
        """The update a step takes. single_pass forms it from the scoring pass's operands of every layer
        over the whole sequence, so it applies to the Gram methods, and only where the scoring pass has
        those: with a score window or top layers only, the run takes two_pass steps (noted at start)."""
        sel = self.selection
        single = sel.update == SINGLE_PASS and SINGLE_PASS in self.method.updates and not self.partial_scoring()
        return SINGLE_PASS if single else TWO_PASS

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.parallel.tensor * self.parallel.pipeline)

    def unread_selection_keys(self) -> list[str]:
        """One line per selection key set away from its default that no method of the run reads (where
        phased: neither early_method nor method), and one for an early_method that no step uses."""
        sel, schema, specs = self.selection, SCHEMA["selection"], [phase.method for phase in self.phases()]
        notes = [f"selection.{key}={getattr(sel, key)!r} is not read by {self.methods_named()} (it applies to "
                 f"{', '.join(methods_reading(key))}); this run does not use it"
                 for key in NOTED_KEYS if not any(spec.reads(key) for spec in specs)
                 and getattr(sel, key) != schema[key].default]
        if sel.early_method is not None and sel.early_steps == 0:
            notes.append(f"selection.early_method={sel.early_method!r} with selection.early_steps=0 takes no step; "
                         f"this run steps with selection.method={sel.method} throughout (to use it: "
                         "selection.early_steps > 0)")
        return notes

    def selection_notes(self, world_size: int) -> list[str]:
        """Settings that run but are unlikely what the user meant, one line each (printed at start).

        N = k: the selection takes every candidate, so the run trains on the stream's samples as Regular
        does, plus the cost of scoring them. A note, not an error: it is a valid run (a check that GREATS
        with nothing to choose trains as Regular, or a measure of the scoring overhead), but rarely the
        intent of a selection run."""
        phases = self.phases()
        if len(phases) == 1:
            return self._method_notes(world_size, "this run", "s")
        notes = []
        for phase in phases:  # each phase's steps, as a run of its method takes them
            steps = f"the steps of {phase.method_key}={phase.selection.method}"
            notes += [note for note in phase._method_notes(world_size, steps, "") if note not in notes]
        return notes

    def _method_notes(self, world_size: int, steps: str, verb_s: str) -> list[str]:
        """selection_notes() of this config's method; steps: what takes its steps ('this run', or a
        phase's), verb_s: 's' where that is singular."""
        sel, k = self.selection, self.num_selected(world_size)
        notes = []
        if sel.update == SINGLE_PASS and SINGLE_PASS in self.method.updates and self.partial_scoring():
            notes.append(f"selection.update=single_pass forms the update from every layer's operands over the whole "
                         f"sequence, which a scoring pass with {' and '.join(self.partial_scoring())} does not "
                         f"have: {steps} take{verb_s} two_pass steps (an ordinary forward/backward on the selected "
                         "samples)")
        if self.method.from_stream or self.num_candidates(world_size) != k:
            return notes
        return notes + [f"selection.candidates={sel.candidates} equals k = {k} (selected per step and replica): "
                f"{self.method_key}={sel.method} takes every candidate, so {steps} train{verb_s} on the samples "
                f"selection.method=regular trains on, plus the cost of scoring them; to select, set "
                f"selection.candidates > {k} "
                f"(null: 2k = {2 * k})"]

    def check_combinations(self, world_size: Optional[int]) -> None:
        m, p, t = self.model, self.parallel, self.train
        if m.hidden_size % m.num_heads:
            raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
        if m.num_heads % p.tensor:
            raise ConfigError(f"model.num_heads={m.num_heads} is not divisible by parallel.tensor={p.tensor}")
        if self.ffn_hidden_size % p.tensor:
            raise ConfigError(f"ffn hidden size {self.ffn_hidden_size} is not divisible by parallel.tensor={p.tensor}")
        if m.vocab_pad_multiple % p.tensor:
            raise ConfigError(f"model.vocab_pad_multiple={m.vocab_pad_multiple} is not divisible by "
                              f"parallel.tensor={p.tensor}")
        if m.arch == LLAMA and (m.hidden_size // m.num_heads) % 2:
            raise ConfigError(f"RoPE needs an even head size; hidden_size/num_heads = {m.hidden_size // m.num_heads}")
        if p.sequence_parallel and p.tensor == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor > 1")
        if p.sequence_parallel and m.seq_len % p.tensor:
            raise ConfigError(f"model.seq_len={m.seq_len} is not divisible by parallel.tensor={p.tensor} "
                              "(needed by sequence parallel)")
        if p.pipeline > 1 and self.zero.stage > 1:
            raise ConfigError(f"zero.stage={self.zero.stage} with parallel.pipeline={p.pipeline}; "
                              "allowed with pipeline parallelism: 0 or 1")
        if t.precision == BF16 and self.zero.stage == 0 and p.pipeline == 1:
            # DeepSpeed's plain engine then updates bf16 weights directly (no fp32 master copy)
            raise ConfigError("train.precision=bf16 with zero.stage=0 and no pipeline trains without fp32 master "
                              "weights; allowed: zero.stage >= 1 (also at data-parallel size 1), or fp32")
        if p.pipeline > m.num_layers:
            raise ConfigError(f"parallel.pipeline={p.pipeline} exceeds model.num_layers={m.num_layers}")
        if t.min_lr > t.lr:
            raise ConfigError(f"train.min_lr={t.min_lr} is larger than train.lr={t.lr}")
        problem = fractions_problem({name: getattr(self.data, split.key) for name, split in HELD_OUT.items()},
                                    prefix="data.")
        if problem:
            raise ConfigError(problem)
        problem = crawl_problem(self.data.source, self.data.crawl, self.data.target_domain, prefix="data.")
        if problem:
            raise ConfigError(problem)
        if self.data.source == FILES and not self.data.files:
            raise ConfigError("data.source=files needs data.files (a list of local files)")
        if self.data.source == MEGATRON:
            problem = prefixes_problem(self.data.megatron_prefixes, prefix="data.")
            if problem:
                raise ConfigError(f"data.source=megatron: {problem}")
            if self.tokenizer.model is None:
                raise ConfigError("data.source=megatron needs tokenizer.model (the tokenizer the data was built with)")
        sel = self.selection
        self._check_phases()
        if sel.score_window is not None and sel.score_window > m.seq_len:
            raise ConfigError(f"selection.score_window={sel.score_window} is longer than model.seq_len={m.seq_len}; "
                              f"allowed: 1..{m.seq_len}, or null (the whole sequence)")
        if sel.score_window is not None and p.sequence_parallel and sel.score_window % p.tensor:
            raise ConfigError(f"selection.score_window={sel.score_window} is not divisible by parallel.tensor={p.tensor} "
                              "(sequence parallel splits the window); allowed: a multiple of "
                              f"{p.tensor}, or null")
        if sel.score_layers is not None and sel.score_layers > m.num_layers:
            raise ConfigError(f"selection.score_layers={sel.score_layers} exceeds model.num_layers={m.num_layers}; "
                              f"allowed: 1..{m.num_layers}, or null (every layer)")
        if sel.eta == ETA_AUTO and sel.batch_mean:
            raise ConfigError("selection.batch_mean=true with selection.eta=auto: auto already divides by k; "
                              "allowed: one of them")
        if not all(isinstance(x, str) for x in sel.score_exclude):
            raise ConfigError(f"selection.score_exclude={sel.score_exclude!r}; allowed: a list of name patterns")
        for phase in self.phases():  # each phase as a run of its method would be checked
            phase._check_method()
        if world_size is None:
            return
        model_parallel = p.tensor * p.pipeline
        if world_size % model_parallel:
            raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline = "
                              f"{p.tensor} x {p.pipeline} = {model_parallel}; allowed: a world size that is a "
                              f"multiple of {model_parallel}, or tensor/pipeline sizes whose product divides {world_size}")
        dp = world_size // model_parallel
        if t.global_batch % (t.micro_batch * dp):
            raise ConfigError(f"train.global_batch={t.global_batch} is not divisible by train.micro_batch x "
                              f"data-parallel size = {t.micro_batch} x {dp}; allowed: a multiple of "
                              f"{t.micro_batch * dp}")
        k = self.num_selected(world_size)
        if sel.select is not None and sel.select != k:
            raise ConfigError(f"selection.select={sel.select} but train.global_batch / data-parallel size = "
                              f"{t.global_batch} / {dp} = {k}; allowed: {k} (or null)")
        n = self.num_candidates(world_size)
        if n < k:
            raise ConfigError(f"selection.candidates={sel.candidates} is smaller than selection.select={k}; "
                              f"allowed: >= {k}")
        for phase in self.phases():
            phase._check_method_layout(world_size)

    def _check_phases(self) -> None:
        """selection.early_method and early_steps: a phase gating that does something, and leaves
        selection.method some steps (an early_method with early_steps=0 is noted: unread_selection_keys)."""
        sel, steps = self.selection, self.train.steps
        if sel.early_method is None:
            if sel.early_steps > 0:
                raise ConfigError(f"selection.early_steps={sel.early_steps} without selection.early_method: no method "
                                  f"is named for those steps; allowed: selection.early_method set to one of "
                                  f"{', '.join(CATALOG)}, or selection.early_steps=0")
            return
        if sel.early_method == sel.method:
            others = ", ".join(name for name in CATALOG if name != sel.method)
            raise ConfigError(f"selection.early_method={sel.early_method} is selection.method itself: every step would "
                              f"be taken the same way; allowed: another method ({others}), or null")
        if sel.early_steps >= steps:
            raise ConfigError(f"selection.early_steps={sel.early_steps} with train.steps={steps}: "
                              f"selection.method={sel.method} would take no step; allowed: selection.early_steps < "
                              f"{steps}, or a larger train.steps")

    def _check_method(self) -> None:
        """What this config's method (selection.method; of a phase, early_config()) needs of the settings."""
        m, t, sel = self.model, self.train, self.selection
        if self.method.needs_reference and sel.reference_checkpoint is None:
            raise ConfigError(f"{self.method_key}={sel.method} needs selection.reference_checkpoint; allowed: a step_N "
                              "checkpoint folder of a reference run of the same model")
        single_pass = self.update_mode() == SINGLE_PASS
        if single_pass and self.zero.stage == 3:
            raise ConfigError("selection.update=single_pass with zero.stage=3: ZeRO-3 partitions the parameters the "
                              "update is formed for; allowed with single_pass (the default): zero.stage 0, 1 or 2, or "
                              "selection.update=two_pass")
        if single_pass and m.dropout > 0:
            raise ConfigError(f"selection.update=single_pass with model.dropout={m.dropout}: the update reuses the "
                              "scoring pass, which runs without dropout; allowed: model.dropout=0, or "
                              "selection.update=two_pass")
        if sel.preconditioner == ADAM and t.optimizer != ADAMW and self.method.needs_gram:
            raise ConfigError(f"selection.preconditioner=adam with train.optimizer={t.optimizer}: it reads AdamW's "
                              "second moment; allowed: train.optimizer=adamw, or selection.preconditioner=none")
        if sel.target_ema > 0 and self.method.reads("target_ema") and self.zero.stage == 3:
            raise ConfigError(f"selection.target_ema={sel.target_ema} with zero.stage=3: ZeRO-3 partitions the "
                              "parameters whose shards the target is kept for; allowed with a target EMA: zero.stage "
                              "0, 1 or 2, or selection.target_ema=0")

    def _check_method_layout(self, world_size: int) -> None:
        """What this config's method needs of the candidates per replica (the layout is checked)."""
        sel = self.selection
        k, n = self.num_selected(world_size), self.num_candidates(world_size)
        prefilter = sel.prefilter if self.method.reads("prefilter") else None  # else noted as unread
        if prefilter is not None and not k <= prefilter < n:
            raise ConfigError(f"selection.prefilter={sel.prefilter} with k = {k} selected of N = {n} candidates; "
                              f"allowed: {k}..{n - 1} (k <= M < N), or null" if n > k else
                              f"selection.prefilter={sel.prefilter} with N = k = {n} candidates: there is nothing to "
                              f"filter; allowed: null, or selection.candidates > {k}")
        scored = self.num_scored(world_size) + sel.val_batch
        if sel.score_micro_batch is not None and scored % sel.score_micro_batch:
            what = "prefilter" if prefilter is not None else "candidates"
            raise ConfigError(f"selection.score_micro_batch={sel.score_micro_batch} does not divide {what} + "
                              f"val_batch = {scored}; allowed: a divisor of {scored}, or null")
