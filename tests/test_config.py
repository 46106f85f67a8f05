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
    (["selection.early_method=greatz", "selection.early_steps=1"],
     "config key 'selection.early_method' has value 'greatz'; allowed: greats, first_order, gradnorm, maxloss, "
     "rholoss, uniform, regular, or null"),
    (["selection.early_steps=-1"], "config key 'selection.early_steps' has value -1; allowed: >= 0"),
    (["selection.early_steps=3"], "selection.early_steps=3 without selection.early_method: no method is named for "
                                  "those steps; allowed: selection.early_method set to one of greats, "),
    (["selection.early_method=greats", "selection.early_steps=3"],
     "selection.early_method=greats is selection.method itself: every step would be taken the same way; allowed: "
     "another method (first_order, gradnorm, maxloss, rholoss, uniform, regular), or null"),
    # early_steps=0 with the method itself: still refused (the note on early_steps=0 is for another method)
    (["selection.early_method=greats"], "selection.early_method=greats is selection.method itself"),
    (["selection.early_method=maxloss", "selection.early_steps=10", "train.steps=10"],
     "selection.early_steps=10 with train.steps=10: selection.method=greats would take no step; allowed: "
     "selection.early_steps < 10, or a larger train.steps"),
    # what the early method needs is checked as for a run of it, and named by its key
    (["selection.early_method=rholoss", "selection.early_steps=3"],
     "selection.early_method=rholoss needs selection.reference_checkpoint; allowed: "),
    (["selection.method=maxloss", "selection.early_method=gradnorm", "selection.early_steps=3",
      "selection.preconditioner=adam", "train.optimizer=sgd"], "it reads AdamW's second moment"),
    (["selection.method=maxloss", "selection.early_method=greats", "selection.early_steps=3", "zero.stage=3"],
     "selection.update=single_pass with zero.stage=3"),
])
def test_bad_config_is_one_line(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_phase_gating_checks_each_phase_as_a_run_of_its_method():
    """Each phase's config is the run's with selection.method = its method: keys one method reads are
    checked for the phase that reads them, and noted only where neither reads them."""
    cfg = load_config(None, ["selection.early_method=maxloss", "selection.early_steps=3", "selection.prefilter=12",
                             "train.global_batch=8", "selection.candidates=16"], world_size=1)
    early, main = cfg.phases()
    assert cfg.phased and (early.selection.method, main.selection.method) == ("maxloss", "greats")
    assert (early.method_key, main.method_key) == ("selection.early_method", "selection.method")
    assert early.selection.early_method is None and early.selection.early_steps == 0 and not early.phased
    assert (early.num_scored(1), main.num_scored(1)) == (16, 12)  # maxloss does not read the prefilter
    assert early.update_mode() == "two_pass" and main.update_mode() == "single_pass"
    # the prefilter of the main method is checked against the layout; the early method's micro-batches too
    # (greats scores M + m = 11 + 4 samples, maxloss N + m = 16 + 4)
    phased = ["selection.method=greats", "selection.early_method=maxloss", "selection.early_steps=3",
              "selection.candidates=16", "selection.prefilter=11", "selection.val_batch=4"]
    load_config(None, [*phased, "selection.early_method=null", "selection.early_steps=0", "selection.score_micro_batch=3"],
                world_size=1)
    with pytest.raises(ConfigError, match=r"selection.score_micro_batch=3 does not divide candidates \+ val_batch = "
                                          r"20; allowed: a divisor of 20"):
        load_config(None, [*phased, "selection.score_micro_batch=3"], world_size=1)
    # read by the early method only: no note; read by neither: noted, naming both
    greats_keys = ["selection.eta=auto", "selection.preconditioner=adam"]
    assert load_config(None, ["selection.method=maxloss", "selection.early_method=greats", "selection.early_steps=3",
                              *greats_keys]).unread_selection_keys() == []
    (note,) = load_config(None, ["selection.method=maxloss", "selection.early_method=uniform",
                                 "selection.early_steps=3", "selection.eta=auto"]).unread_selection_keys()
    assert note.startswith("selection.eta='auto' is not read by selection.early_method=uniform nor "
                           "selection.method=maxloss (it applies to greats)"), note


def test_an_early_method_without_early_steps_is_noted_not_refused():
    """early_steps=0 (the default) is phase gating off: an early_method left set takes no step, which the
    run says (as it does for any set key it does not read), and steps as selection.method throughout."""
    cfg = load_config(None, ["selection.early_method=maxloss"], world_size=1)
    assert not cfg.phased and [c.selection.method for c in cfg.phases()] == ["greats"]
    assert cfg.unread_selection_keys() == [
        "selection.early_method='maxloss' with selection.early_steps=0 takes no step; this run steps with "
        "selection.method=greats throughout (to use it: selection.early_steps > 0)"]
    assert load_config(None, ["selection.early_method=maxloss", "selection.early_steps=1"]).unread_selection_keys() \
        == []


def test_phase_notes_name_the_phase_they_are_about():
    """N = k under phase gating: each selecting phase's note names its own method and key."""
    notes = load_config(None, ["selection.candidates=8", "train.global_batch=8", "selection.method=greats",
                               "selection.early_method=maxloss", "selection.early_steps=2"]).selection_notes(1)
    assert [n.split(": ")[1].split(" takes")[0] for n in notes] == ["selection.early_method=maxloss",
                                                                    "selection.method=greats"]
    assert "so the steps of selection.early_method=maxloss train on the samples" in notes[0]
    # regular draws k from the stream: nothing to note for its steps
    (note,) = load_config(None, ["selection.candidates=8", "train.global_batch=8", "selection.method=greats",
                                 "selection.early_method=regular", "selection.early_steps=2"]).selection_notes(1)
    assert "selection.method=greats takes every candidate, so the steps of selection.method=greats train" in note


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
