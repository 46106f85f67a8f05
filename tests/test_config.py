"""Config loading and validation: every bad value is one line naming the key and what is allowed."""

from pathlib import Path

import pytest

from megatron_greats.config import SCHEMA, load_config
from megatron_greats.data.splits import HELD_OUT
from megatron_greats.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(str(path))
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    # A layout-consistent world size must be accepted: one 8-GPU node, or the tiny CPU default.
    world_size = tp * pp * (1 if path.stem.startswith("tiny") else max(1, 8 // (tp * pp)))
    load_config(str(path), world_size=world_size)


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.steps=7", "model.arch=llama", "parallel.sequence_parallel=false"])
    assert cfg.train.steps == 7 and cfg.model.arch == "llama"
    assert cfg.ffn_hidden_size % 64 == 0
    assert cfg.to_dict()["train"]["steps"] == 7


MEGATRON = ["data.source=megatron", "tokenizer.model=t.model"]


def test_keys_a_method_does_not_read_are_noted_not_refused():
    """A config tuned for greats still runs as a baseline (quickstart, compare), and says what it does not use."""
    greats_keys = ["selection.preconditioner=adam", "selection.eta=auto", "selection.temperature=0.5",
                   "selection.alignment=cosine", "selection.score_exclude=['*word*']"]
    assert load_config(None, greats_keys).unread_selection_keys() == []
    notes = load_config(None, greats_keys + ["selection.method=maxloss", "train.optimizer=sgd"]).unread_selection_keys()
    assert [n.split("=")[0] for n in notes] == ["selection.eta", "selection.preconditioner", "selection.alignment",
                                                "selection.temperature", "selection.score_exclude"]
    assert "selection.preconditioner='adam' is not read by selection.method=maxloss (it applies to greats, " \
           "first_order, gradnorm)" in notes[1]
    notes = load_config(None, greats_keys + ["selection.method=first_order"]).unread_selection_keys()
    assert [n.split("=")[0] for n in notes] == ["selection.eta", "selection.temperature"]


def test_target_ema_is_read_by_the_alignment_methods_and_noted_for_the_others():
    """selection.target_ema applies to greats and first_order (they rank by the validation alignment); set
    for gradnorm it is noted, not refused (not even with ZeRO-3, which it would not meet), as unread keys are."""
    for method in ("greats", "first_order"):
        assert load_config(None, ["selection.target_ema=0.9", f"selection.method={method}"]).unread_selection_keys() == []
    cfg = load_config(None, ["selection.target_ema=0.9", "selection.method=gradnorm", "selection.update=two_pass",
                             "zero.stage=3"])
    assert cfg.unread_selection_keys() == ["selection.target_ema=0.9 is not read by selection.method=gradnorm (it "
                                           "applies to greats, first_order); this run does not use it"]
    assert load_config(None).selection.target_ema == 0.0


def test_candidates_equal_to_k_are_noted_not_refused():
    """N = k: the selection takes every candidate (a valid run that trains as Regular does, at the cost of
    scoring): one note naming both values, for every method that selects, none for regular."""
    (note,) = load_config(None, ["selection.candidates=8", "train.global_batch=8"]).selection_notes(1)
    assert note.startswith("selection.candidates=8 equals k = 8 (selected per step and replica): "
                           "selection.method=greats takes every candidate"), note
    assert "selection.candidates > 8 (null: 2k = 16)" in note
    # per data-parallel replica: k = 16 / 2
    assert load_config(None, ["selection.candidates=8", "train.global_batch=16", "selection.method=uniform"]
                       ).selection_notes(2)
    for overrides in (["selection.candidates=9"], ["selection.candidates=null"],
                      ["selection.candidates=8", "selection.method=regular"]):
        assert load_config(None, ["train.global_batch=8", *overrides]).selection_notes(1) == []


@pytest.mark.parametrize("overrides, needle", [
    (["train.stepz=3"], "unknown config key 'train.stepz' (did you mean 'steps'?)"),
    (["modle.arch=gpt2"], "unknown config key 'modle' (did you mean 'model'?)"),
    (["train.steps=ten"], "config key 'train.steps' has value 'ten' of type str; allowed type: int"),
    (["train.steps=true"], "config key 'train.steps' has value True"),
    (["model.arch=bert"], "allowed: gpt2, llama"),
    (["zero.stage=4"], "allowed: 0, 1, 2, 3"),
    (["parallel.pipeline=2", "zero.stage=2"], "allowed with pipeline parallelism: 0 or 1"),
    (["model.num_heads=3"], "not divisible by model.num_heads=3"),
    (["parallel.sequence_parallel=true"], "needs parallel.tensor > 1"),
    (["train"], "not of the form dotted.key=value"),
    (["train.precision=bf16"], "allowed: zero.stage >= 1 (also at data-parallel size 1), or fp32"),
    (["data.selection_fraction=0"], "config key 'data.selection_fraction' has value 0; allowed: a number in (0, 1)"),
    (["data.selection_fraction=1.0"], "'data.selection_fraction' has value 1.0; allowed: a number in (0, 1)"),
    (["data.val_fraction=0.5", "data.test_fraction=0.3", "data.selection_fraction=0.2"],
     "data.val_fraction + data.test_fraction + data.selection_fraction = 0.5 + 0.3 + 0.2 = 1 holds out every "
     "target-domain document; allowed: fractions whose sum is < 1"),
    (MEGATRON + ["data.megatron_prefixes={train: t, val: v, test: s}"],
     "data.megatron_prefixes has keys ['test', 'train', 'val'] (missing: selection); allowed: exactly the keys "
     "train, val, test, selection"),
    (MEGATRON + ["data.megatron_prefixes={train: t, val: v, test: s, selection: ./v}"],
     "data.megatron_prefixes.selection is './v', the same data as data.megatron_prefixes.val; allowed:"),
    (MEGATRON + ["data.megatron_prefixes={train: t, val: v, test: s, selection: x, tset: s}"], "unknown: tset"),
    (MEGATRON, "data.megatron_prefixes is None; source 'megatron' needs a mapping"),
    (["selection.update=one_pass"], "allowed: two_pass, single_pass"),
    (["selection.update=single_pass", "zero.stage=3"], "allowed with single_pass (the default): zero.stage 0, 1 or 2"),
    (["zero.stage=3"], "selection.update=single_pass with zero.stage=3"),
    (["selection.eta=fast"], "'selection.eta' has value 'fast'; allowed: > 0, auto, or null"),
    (["selection.eta=-1"], "'selection.eta' has value -1; allowed: > 0, auto, or null"),
    (["selection.preconditioner=shampoo"], "allowed: none, adam"),
    (["selection.eta=auto", "selection.batch_mean=true"], "auto already divides by k"),
    (["selection.preconditioner=adam", "train.optimizer=sgd"], "it reads AdamW's second moment"),
    (["selection.temperature=-0.5"], "allowed: >= 0"),
    (["selection.target_ema=1.0"], "'selection.target_ema' has value 1.0; allowed: [0, 1)"),
    (["selection.target_ema=-0.1"], "'selection.target_ema' has value -0.1; allowed: [0, 1)"),
    (["selection.target_ema=0.9", "selection.update=two_pass", "zero.stage=3"],
     "selection.target_ema=0.9 with zero.stage=3: ZeRO-3 partitions the parameters whose shards the target is "
     "kept for; allowed with a target EMA: zero.stage 0, 1 or 2, or selection.target_ema=0"),
    (["selection.update=single_pass", "model.dropout=0.1"],
     "selection.update=single_pass with model.dropout=0.1: the update reuses the scoring pass"),
])
def test_bad_config_is_one_line(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_layout_must_divide_world_size():
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by .* 2 x 2 = 4"):
        load_config(None, ["parallel.tensor=2", "parallel.pipeline=2"], world_size=6)
    with pytest.raises(ConfigError, match="train.global_batch=8 is not divisible"):
        load_config(None, ["train.micro_batch=3"], world_size=1)


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    nested = tmp_path / "nested.yaml"
    nested.write_text("train: 5\n")
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        load_config(str(nested))


def test_held_out_fractions_follow_the_split_table():
    cfg = load_config(None)
    assert [key for key in SCHEMA["data"] if key.endswith("_fraction")] == [s.key for s in HELD_OUT.values()]
    assert cfg.data.selection_fraction == HELD_OUT["selection"].default == 0.1
    assert cfg.data.val_fraction == cfg.data.test_fraction == 0.1
    load_config(None, [*MEGATRON, "data.megatron_prefixes={train: t, val: v, test: s, selection: x}"])


def test_schema_has_required_keys():
    for key in ("seed", "run_dir"):
        assert key in SCHEMA
    assert {"tensor", "pipeline", "sequence_parallel"} <= set(SCHEMA["parallel"])
    assert "stage" in SCHEMA["zero"] and "steps" in SCHEMA["train"]
