"""Selection inside the training step, end to end through launch/pretrain.py."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from conftest import (REPO, child_env, error_lines, read_metrics, read_selections, run_pretrain, run_reference,
                      tiny_overrides)
from full_weights import full_weights, relative_gap

# adam_eps=1e-3: a gradient that is 0 in exact arithmetic (e.g. the attention key bias) holds only
# reduction-order noise, which AdamW's g / (sqrt(v) + eps) would blow up to a sizeable step at eps=1e-8;
# comparisons of two exact update paths must not hinge on that noise.
STEPS = ["train.steps=3", "train.lr=0.01", "train.warmup_steps=0", "train.adam_eps=1e-3", "selection.val_batch=3",
         "train.save_interval=1"]
# Plain SGD: its step is lr x gradient, so a wrong 1/k, a data-parallel sum or a doubled tied weight in
# the single-pass gradient shows in the weights, where AdamW would divide it out.
SGD = ["train.optimizer=sgd", "train.lr=0.5", "train.weight_decay=0"]

def greats(data_cache, run_dir, *extra):
    return tiny_overrides(data_cache, run_dir, *STEPS, "selection.method=greats", "selection.candidates=16",
                          "selection.update=two_pass", *extra)


def assert_selections_match_reference(run_dir, data_cache, adam: bool = False, top_layers=None, prefilter=None,
                                      model=()):
    """Each step's picks and gains against tests/workers/reference.py: per-sample gradients by ordinary
    backward passes of a 1-process copy of the model at the weights the step started from (the
    previous step's checkpoint, merged over tensor/pipeline shards), their Gram, and a plain greedy.
    The candidates, validation samples and eta are those the run logged; eta must be the scheduled LR.
    adam: the run scores with selection.preconditioner=adam and eta=auto; the reference rebuilds Adam's
    second moment from the logged selections of the earlier steps (not from the optimizer's state).
    The cheap-scoring settings: the reference cuts the samples to the window the run logged, keeps
    the top_layers' parameters only, and applies the prefilter's rule itself (the positions it keeps
    must be those the run logged). model: the run's model.* overrides (the reference builds the same)."""
    from megatron_greats.training.schedule import lr_at

    records = read_selections(run_dir)
    t = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]

    def weights_after(step):
        if step == 0:
            return None
        path = run_dir / f"weights_{step}.pt"
        if not path.exists():
            torch.save(full_weights(run_dir / "checkpoints" / f"step_{step}"), path)
        return str(path)

    selected_at = {}
    for r in sorted(records, key=lambda r: (r["step"], r["replica"])):
        selected_at.setdefault(r["step"], []).extend(r["selected"])
    spec = []
    for r in records:
        step, k = r["step"], len(r["selected"])
        lr = lr_at(step - 1, t["lr"], t["min_lr"], t["warmup_steps"], t["steps"])
        entry = {"weights": weights_after(step - 1), "candidates": r["candidates"], "validation": r["validation"],
                 "eta": r["eta"], "k": k, "window": r["score_window"], "top_layers": top_layers, "prefilter": prefilter}
        if not adam:
            assert r["eta"] == pytest.approx(lr, rel=1e-12)
        elif step == 1:  # no second moment yet: raw gradients, eta = lr / k
            assert r["preconditioner"].startswith("none (step 0") and r["eta"] == pytest.approx(lr / k, rel=1e-12)
        else:
            assert r["preconditioner"] == "adam"
            assert r["eta"] == pytest.approx(lr * (1 - t["beta1"]) / ((1 - t["beta1"] ** step) * k), rel=1e-12)
            entry["adam"] = {"history": [{"weights": weights_after(u - 1), "ids": selected_at[u]}
                                         for u in range(1, step)],
                             "beta2": t["beta2"], "eps": t["adam_eps"], "clip": t["grad_clip"]}
        spec.append(entry)
    reference = run_reference({"select": spec}, tiny_overrides(data_cache, run_dir / "reference", *model), run_dir)
    for r, ref in zip(records, reference["select"]):
        if prefilter is not None:
            assert r["prefiltered"] == ref["prefiltered"], f"step {r['step']}"
        assert [r["candidates"][i] for i in ref["picked"]] == r["selected"], f"step {r['step']}"
        gains, ref_gains = np.asarray(r["gains"]), np.asarray(ref["gains"])
        error = np.abs(gains - ref_gains).max() / np.abs(ref_gains).max()
        assert error < 1e-4, f"step {r['step']}: gains differ by {error:.2e} (relative)"
    return reference


def assert_single_pass_equals_two_pass(two_pass_dir, data_cache, run_dir, nproc, *extra):
    """The same run with selection.update=single_pass: the same picks, and per step the same loss and
    global gradient norm, and the same weights after each step (relative to that step's update), to 1e-5."""
    overrides = greats(data_cache, run_dir, *extra, "selection.update=single_pass")
    proc = run_pretrain(overrides, nproc=nproc, launcher="python" if nproc == 1 else "torchrun")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["selected"] for r in read_selections(run_dir)] == [r["selected"] for r in read_selections(two_pass_dir)]
    single, double = read_metrics(run_dir), read_metrics(two_pass_dir)
    for key in ("train/loss", "train/grad_norm"):
        np.testing.assert_allclose([m[key] for m in single], [m[key] for m in double], rtol=1e-5, err_msg=key)
    steps = len(double)
    theirs = [full_weights(two_pass_dir / "checkpoints" / f"step_{s}") for s in range(1, steps + 1)]
    for step in range(2, steps + 1):
        mine = full_weights(run_dir / "checkpoints" / f"step_{step}")
        update = {k: theirs[step - 1][k] - theirs[step - 2][k] for k in mine}
        gap = relative_gap(mine, theirs[step - 1], update)
        assert gap < 1e-5, f"single_pass weights after step {step} differ by {gap:.2e} of the step's update"


@pytest.fixture(scope="module")
def single_process_selection(data_cache, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("greats-single")
    proc = run_pretrain(greats(data_cache, run_dir, *SGD), launcher="python")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_selections(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert len(r["candidates"]) == 16 and len(r["selected"]) == 8 and len(r["gains"]) == 8
        assert set(r["selected"]) <= set(r["candidates"]) and len(r["validation"]) == 3
    assert_selections_match_reference(run_dir, data_cache)
    return run_dir


def test_selection_in_one_process_matches_an_independent_reference(single_process_selection):
    assert len(read_selections(single_process_selection)) == 3  # the fixture compared every step


def test_single_pass_equals_two_pass_in_one_process_under_plain_sgd(single_process_selection, data_cache, tmp_path):
    assert_single_pass_equals_two_pass(single_process_selection, data_cache, tmp_path / "single", 1, *SGD)


@pytest.mark.parametrize("nproc, layout", [
    (2, ["parallel.tensor=2"]),
    (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    (2, ["parallel.pipeline=2"]),
    (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
], ids=["tp2", "tp2-sp", "pp2", "tp2-pp2"])
def test_selection_at_a_layout_matches_the_reference(single_process_selection, data_cache, tmp_path, nproc, layout):
    """PP=2 runs the production scoring path: DeepSpeed's 1F1B schedule with the scoring instructions.
    Plain SGD, so the single-pass update's scale is checked too."""
    run_dir = tmp_path / "two"
    layout = [*SGD, *layout]
    proc = run_pretrain(greats(data_cache, run_dir, *layout), nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["selected"] for r in read_selections(run_dir)] == \
        [r["selected"] for r in read_selections(single_process_selection)]
    assert_selections_match_reference(run_dir, data_cache)
    assert_single_pass_equals_two_pass(run_dir, data_cache, tmp_path / "single", nproc, *layout)


@pytest.mark.parametrize("nproc, layout", [
    (1, []),
    (2, ["zero.stage=1"]),
    (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
], ids=["1p", "dp2-zero1", "tp2-pp2"])
def test_adam_preconditioned_selection_matches_the_reference(data_cache, tmp_path, nproc, layout):
    """selection.preconditioner=adam, eta=auto: Adam's second moment read from the optimizer's state
    (torch's per parameter, ZeRO's flat partitions, tensor/pipeline shards) must give the picks and
    gains of a reference that rebuilds it from the gradients of the steps taken."""
    run_dir = tmp_path / "adam"
    overrides = greats(data_cache, run_dir, "selection.preconditioner=adam", "selection.eta=auto",
                       "selection.update=single_pass", *layout)
    proc = run_pretrain(overrides, nproc=nproc, launcher="python" if nproc == 1 else "torchrun")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_selections_match_reference(run_dir, data_cache, adam=True)


@pytest.mark.parametrize("nproc, extra", [
    (1, []),
    (2, ["zero.stage=0", *SGD]),   # the project's own norm and clipping around the plain optimizer
    (2, ["zero.stage=1"]),
    (2, ["zero.stage=2", *SGD]),
], ids=["dp1", "dp2-zero0-sgd", "dp2-zero1", "dp2-zero2-sgd"])
def test_update_equals_an_ordinary_step_on_the_selected_samples(data_cache, tmp_path, nproc, extra):
    """Two GREATS steps, then compare the weights with a single process that takes ordinary steps on
    exactly the selected samples (same optimizer, same state): nothing of the scoring pass leaks in.
    At DP=2 the single_pass update is also compared with two_pass (DeepSpeed's reduction of its
    gradients under ZeRO-0, 1 and 2; under SGD the gradients' scale shows in the weights)."""
    run_dir = tmp_path / "greats"
    overrides = greats(data_cache, run_dir, "train.steps=2", *extra)
    proc = run_pretrain(overrides, nproc=nproc, launcher="python" if nproc == 1 else "torchrun")
    assert proc.returncode == 0, proc.stderr[-3000:]
    if nproc > 1:
        assert_single_pass_equals_two_pass(run_dir, data_cache, tmp_path / "single", nproc, "train.steps=2", *extra)
    records = read_selections(run_dir)
    steps = [[i for r in sorted(records, key=lambda r: r["replica"]) if r["step"] == s for i in r["selected"]]
             for s in (1, 2)]
    assert all(len(ids) == 8 for ids in steps)
    ids_file, out = tmp_path / "ids.json", tmp_path / "reference.pt"
    ids_file.write_text(json.dumps(steps))
    ref_overrides = tiny_overrides(data_cache, tmp_path / "reference", "train.steps=2", "train.lr=0.01",
                                   "train.warmup_steps=0", "train.adam_eps=1e-3",
                                   *[e for e in extra if e.startswith("train.")])
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "workers" / "train_on_ids.py"), str(ids_file),
                           str(out), *ref_overrides], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = torch.load(out, weights_only=True)
    initial, reference = saved["initial"], saved["final"]
    trained = torch.load(run_dir / "checkpoints" / "step_2" / "mp_rank_00_model_states.pt",
                         map_location="cpu", weights_only=False)["module"]
    assert set(reference) <= set(trained) and len(reference) > 10
    # Adam divides by sqrt(v): an element whose gradient is ~0 in exact arithmetic moves by
    # reduction-order noise (ZeRO reduces in another order). So: the update must agree to 0.1% as a
    # whole, and every element to 1% of one step (lr 0.01). A leaked or wrong gradient changes the
    # update direction itself, far beyond both.
    gap = sum(float((trained[n].float() - r.float()).pow(2).sum()) for n, r in reference.items()) ** 0.5
    update = sum(float((r.float() - initial[n].float()).pow(2).sum()) for n, r in reference.items()) ** 0.5
    assert update > 0 and gap / update < 1e-3, (gap, update)
    for name, ref in reference.items():
        torch.testing.assert_close(trained[name].float(), ref.float(), rtol=0, atol=1e-4, msg=name)


@pytest.mark.parametrize("method", ["first_order", "gradnorm", "maxloss", "uniform"])  # regular: test_pretrain
def test_every_method_trains(data_cache, tmp_path, method):
    proc = run_pretrain(tiny_overrides(data_cache, tmp_path, "train.steps=2", f"selection.method={method}"),
                        launcher="python")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len([m for m in read_metrics(tmp_path) if "train/loss" in m]) == 2
    records = read_selections(tmp_path)
    assert len(records) == 2 and all(len(r["selected"]) == 8 for r in records)
    assert all(len(r["selected_domains"]) == 8 for r in records)


@pytest.mark.parametrize("reference_layout", [[], ["parallel.pipeline=2"]], ids=["reference-pp1", "reference-pp2"])
def test_rholoss_selects_the_same_at_pp2_as_in_one_process(data_cache, tmp_path, reference_layout):
    """One reference checkpoint (without a pipeline: one file for the whole model; with one: a file per
    layer) scores the same in a 1-process run and in a PP=2 run, where each stage loads its layers and
    runs them in the pipeline scoring schedule: the same picks and excess losses."""
    reference_run = tmp_path / "reference"
    proc = run_pretrain(tiny_overrides(data_cache, reference_run, "train.steps=2", *reference_layout),
                        nproc=2 if reference_layout else 1, launcher="torchrun" if reference_layout else "python")
    assert proc.returncode == 0, proc.stderr[-3000:]
    step_dir = reference_run / "checkpoints" / "step_2"
    assert bool(list(step_dir.glob("layer_*-model_00-model_states.pt"))) == bool(reference_layout)
    runs = {}
    for name, nproc, layout in (("single", 1, []), ("pp2", 2, ["parallel.pipeline=2"])):
        run_dir = tmp_path / name
        proc = run_pretrain(tiny_overrides(data_cache, run_dir, "train.steps=2", "selection.method=rholoss",
                                           f"selection.reference_checkpoint={step_dir}", *layout),
                            nproc=nproc, launcher="python" if nproc == 1 else "torchrun")
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = read_selections(run_dir)
        assert [r["step"] for r in runs[name]] == [1, 2]
    assert [r["selected"] for r in runs["pp2"]] == [r["selected"] for r in runs["single"]]
    single, pp2 = (np.array([r["gains"] for r in runs[name]]) for name in ("single", "pp2"))
    np.testing.assert_allclose(pp2, single, rtol=1e-4, atol=1e-6)
    # at step 1 the run's model is its initial one, which the reference run started from too: without the
    # reference's trained weights every excess loss would be exactly 0
    assert np.abs(single[0]).min() > 1e-3, single[0]
    # step 1 against plain forwards outside the trainer (tests/workers/reference.py): each candidate's loss
    # at the initial weights minus its loss at the reference checkpoint's weights, merged over its shards
    merged = tmp_path / "reference_weights.pt"
    torch.save(full_weights(step_dir), merged)
    first = runs["single"][0]
    spec = {"losses": [{"weights": w, "ids": first["candidates"]} for w in (None, str(merged))]}
    own, ref = run_reference(spec, tiny_overrides(data_cache, tmp_path / "plain"), tmp_path)["losses"]
    excess = (own - ref).double().numpy()
    order = np.argsort(-excess, kind="stable")[:len(first["selected"])]
    assert [first["candidates"][i] for i in order] == first["selected"]
    np.testing.assert_allclose(first["gains"], excess[order], rtol=1e-4, atol=1e-6)


def test_unknown_method_is_an_error(data_cache, tmp_path):
    proc = run_pretrain(tiny_overrides(data_cache, tmp_path, "selection.method=greatz"), launcher="python")
    assert proc.returncode == 2
    (line,) = set(error_lines(proc))
    assert "selection.method" in line and "'greatz'" in line and "allowed: greats, first_order" in line


def test_selection_telemetry(data_cache, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    proc = run_pretrain(greats(data_cache, tmp_path, "train.steps=2"), launcher="python")
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for domain in ("bible", "python_docs", "shakespeare"):
        assert f"selection/candidates_share/{domain}" in tags and f"selection/selected_share/{domain}" in tags
    for tag in ("selection/score_selected_mean", "selection/score_rejected_mean", "selection/seconds_scoring",
                "selection/seconds_selection", "selection/seconds_training"):
        assert tag in tags
    shares = [events.Scalars(f"selection/selected_share/{d}")[0].value
              for d in ("bible", "python_docs", "shakespeare")]
    assert np.isclose(sum(shares), 1.0)
    selected = events.Scalars("selection/score_selected_mean")[0].value
    rejected = events.Scalars("selection/score_rejected_mean")[0].value
    assert np.isfinite(selected) and np.isfinite(rejected)
    assert set(events.Tags()["histograms"]) >= {"selection/scores_selected", "selection/scores_rejected"}
    # the greedy's alignment terms per pick: the first pick's gain is its alignment term alone (no pick
    # before it to interact with); the scalar is the interaction's share, from the logged terms
    for record, scalar in zip(read_selections(tmp_path), events.Scalars("selection/interaction_over_alignment")):
        terms, gains = np.asarray(record["alignment_terms"]), np.asarray(record["gains"])
        assert len(terms) == len(gains) == len(record["selected"])
        assert np.isclose(terms[0], gains[0], rtol=1e-9, atol=0), (terms[0], gains[0])
        assert np.isclose(scalar.value, (terms.sum() - gains.sum()) / np.abs(terms).sum(), rtol=1e-5)


@pytest.mark.parametrize("nproc, layout", [(1, []), (2, ["parallel.pipeline=2"])], ids=["single", "pp2"])
def test_scoring_in_micro_batches_selects_the_same(data_cache, tmp_path, nproc, layout):
    """N + m = 20 scored at once, or in 4 micro-batches of 5: the Gram includes every cross pair."""
    runs = {}
    for name, micro in (("whole", "null"), ("micro", "5")):
        run_dir = tmp_path / name
        proc = run_pretrain(greats(data_cache, run_dir, "selection.val_batch=4", f"selection.score_micro_batch={micro}",
                                   *layout), nproc=nproc, launcher="python" if nproc == 1 else "torchrun")
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = read_selections(run_dir)
    assert [r["selected"] for r in runs["micro"]] == [r["selected"] for r in runs["whole"]]
    np.testing.assert_allclose([g for r in runs["micro"] for g in r["gains"]],
                               [g for r in runs["whole"] for g in r["gains"]], rtol=1e-4)


def test_score_micro_batch_must_divide(data_cache, tmp_path):
    proc = run_pretrain(greats(data_cache, tmp_path, "selection.score_micro_batch=4"), launcher="python")
    assert proc.returncode == 2
    assert "selection.score_micro_batch=4 does not divide candidates + val_batch = 19" in error_lines(proc)[0]


@pytest.mark.parametrize("stages", [2, 4])
def test_scoring_schedule_is_deepspeeds_1f1b_without_an_optimizer_step(stages):
    """The pipeline scoring pass is a DeepSpeed PipeSchedule: the same exchange of activations and
    gradients as TrainSchedule, scoring compute in place of ForwardPass/BackwardPass, no reduction or step."""
    from deepspeed.runtime.pipe import schedule as ds

    from megatron_greats.training.pipeline_schedules import (ScoreBackward, ScoreForward, ScoreLoad,
                                                           ScoringForwardSchedule, ScoringSchedule)

    def names(steps, keep):
        return [(type(c).__name__, c.kwargs.get("buffer_id")) for cmds in steps for c in cmds if isinstance(c, keep)]

    exchange = (ds.SendActivation, ds.RecvActivation, ds.SendGrad, ds.RecvGrad)
    for stage in range(stages):
        for kind, reference in ((ScoringSchedule, ds.TrainSchedule), (ScoringForwardSchedule, ds.InferenceSchedule)):
            ours = list(kind(micro_batches=3, stages=stages, stage_id=stage).steps())
            theirs = list(reference(micro_batches=3, stages=stages, stage_id=stage).steps())
            assert names(ours, exchange) == names(theirs, exchange)
            flat = [c for cmds in ours for c in cmds]
            assert not any(isinstance(c, (ds.OptimizerStep, ds.ReduceGrads, ds.ReduceTiedGrads, ds.ForwardPass,
                                          ds.BackwardPass, ds.LoadMicroBatch)) for c in flat)
            assert [c.micro_batch_id for c in flat if isinstance(c, ScoreForward)] == [0, 1, 2]
            backward = [c.micro_batch_id for c in flat if isinstance(c, ScoreBackward)]
            assert backward == ([0, 1, 2] if kind is ScoringSchedule else [])
            loads = [c.micro_batch_id for c in flat if isinstance(c, ScoreLoad)]
            assert loads == ([0, 1, 2] if stage in (0, stages - 1) else [])


def test_a_method_added_to_the_catalog_alone_trains(data_cache, tmp_path):
    """Adding a method touches the catalog and its own pick function, nothing else:
    tests/workers/pretrain_with_a_new_method.py adds `minloss` (the k lowest losses) that way and runs the
    real command. Its first step sees maxloss's candidates with the same weights, and with N = 2k the k
    lowest and the k highest losses split the candidates: its picks must be exactly those maxloss leaves."""
    worker = REPO / "tests" / "workers" / "pretrain_with_a_new_method.py"
    runs = {}
    for method in ("minloss", "maxloss"):
        run_dir = tmp_path / method
        overrides = tiny_overrides(data_cache, run_dir, "train.steps=1", f"selection.method={method}")
        script = [str(worker)] if method == "minloss" else [str(REPO / "launch" / "pretrain.py")]
        proc = subprocess.run([sys.executable, *script, "--config", str(REPO / "configs/tiny-cpu.yaml"), *overrides],
                              cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[method] = read_selections(run_dir)[0]
    low, high = runs["minloss"], runs["maxloss"]
    assert low["candidates"] == high["candidates"] and len(low["candidates"]) == 2 * len(low["selected"])
    assert not set(low["selected"]) & set(high["selected"])
    assert set(low["selected"]) | set(high["selected"]) == set(low["candidates"])
