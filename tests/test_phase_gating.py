"""Phase gating (selection.early_method for the first selection.early_steps steps, then selection.method),
end to end through launch/pretrain.py, against runs that never switch within a run: the early steps
against a plain early_method run, the later ones against a plain selection.method run resumed from that
run's checkpoint at the switch. Plain SGD, so any difference in the gradients shows in the weights."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from conftest import read_metrics, read_selections, run_pretrain, tiny_overrides
from full_weights import full_weights

STEPS = 4
EARLY = 2
RUN = [f"train.steps={STEPS}", "train.warmup_steps=0", "train.save_interval=1", "train.optimizer=sgd",
       "train.lr=0.5", "train.weight_decay=0", "selection.candidates=16", "selection.val_batch=3"]
PHASED = ["selection.method=greats", "selection.early_method=maxloss", f"selection.early_steps={EARLY}"]


def train(data_cache, run_dir, *extra):
    proc = run_pretrain(tiny_overrides(data_cache, run_dir, *RUN, *extra), launcher="python")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def rewound(run_dir, to, step: int):
    """A copy of a finished run as a run killed right after saving step `step` leaves it: 'latest' names
    step_<step> (the later lines of its jsonl files are dropped by the resume itself)."""
    shutil.copytree(run_dir, to)
    for later in range(step + 1, STEPS + 1):
        shutil.rmtree(to / "checkpoints" / f"step_{later}")
    (to / "checkpoints" / "latest").write_text(f"step_{step}")
    return to


def weights(run_dir, step):
    return full_weights(run_dir / "checkpoints" / f"step_{step}")


def assert_same_steps(mine, theirs, steps):
    """The same candidates, validation samples, picks and gains, and the same weights after each step."""
    ours, other = ({r["step"]: r for r in read_selections(d)} for d in (mine, theirs))
    for step in steps:
        for key in ("method", "candidates", "validation", "selected", "eta"):
            assert ours[step][key] == other[step][key], (step, key)
        np.testing.assert_allclose(ours[step]["gains"], other[step]["gains"], rtol=1e-6, err_msg=f"step {step}")
        a, b = weights(mine, step), weights(theirs, step)
        assert set(a) == set(b) and len(a) > 10
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=f"step {step} {name}")
    losses = [{m["step"]: m["train/loss"] for m in read_metrics(d) if "train/loss" in m} for d in (mine, theirs)]
    np.testing.assert_allclose([losses[0][s] for s in steps], [losses[1][s] for s in steps], rtol=1e-6)


@pytest.fixture(scope="module")
def runs(data_cache, tmp_path_factory):
    """The phased run (maxloss for steps 1-2 of selection.jsonl, greats for 3-4), a plain maxloss run of
    the same 4-step schedule, and a plain greats run resumed from that maxloss run's checkpoint at step 2."""
    root = tmp_path_factory.mktemp("phases")
    train(data_cache, root / "phased", *PHASED)
    train(data_cache, root / "maxloss", "selection.method=maxloss")
    switched = rewound(root / "maxloss", root / "switched", EARLY)
    proc = train(data_cache, switched, "selection.method=greats")
    assert f"this run started at step {EARLY}" in proc.stdout
    return root


def test_a_phased_run_steps_as_early_method_then_as_method_from_the_same_weights(runs):
    phased = runs / "phased"
    records = read_selections(phased)
    assert [(r["step"], r["method"]) for r in records] == [(1, "maxloss"), (2, "maxloss"), (3, "greats"),
                                                           (4, "greats")]
    # maxloss draws no validation samples and has no eta; greats both
    assert [r["validation"] is None for r in records] == [True, True, False, False]
    assert_same_steps(phased, runs / "maxloss", range(1, EARLY + 1))
    # after the switch: the candidates of a plain run at those steps (the stream is one of seed and step),
    # and what GREATS picks from the weights the early steps left
    assert_same_steps(phased, runs / "switched", range(EARLY + 1, STEPS + 1))
    # the switch is real: GREATS does not pick what maxloss picks from the same candidates and weights
    plain = {r["step"]: r for r in read_selections(runs / "maxloss")}
    assert [r["candidates"] for r in records[EARLY:]] == [plain[s]["candidates"] for s in (3, 4)]
    assert [r["selected"] for r in records[EARLY:]] != [plain[s]["selected"] for s in (3, 4)]


@pytest.mark.parametrize("step", [1, 3], ids=["in-the-early-phase", "in-the-main-phase"])
def test_a_phased_run_resumed_in_either_phase_goes_on_as_it_would_have(runs, data_cache, tmp_path, step):
    resumed = rewound(runs / "phased", tmp_path / "resumed", step)
    proc = train(data_cache, resumed, *PHASED)
    assert f"this run started at step {step}" in proc.stdout
    assert [r["step"] for r in read_selections(resumed)] == [1, 2, 3, 4]
    assert_same_steps(resumed, runs / "phased", range(step + 1, STEPS + 1))


def test_phased_telemetry_labels_each_step_with_its_method(runs):
    """selection/phase is 0 for the early steps and 1 after them (a plain run has none); each phase's
    per-candidate score is its own method's (catalog `reported`): maxloss's candidate losses under
    selection/maxloss/, greats's alignment with the validation gradient under selection/ as in a plain
    run. Checked against the picks' gains and alignment terms in selection.jsonl."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    phased = runs / "phased"
    assert [m["selection/phase"] for m in read_metrics(phased) if "train/loss" in m] == [0, 0, 1, 1]
    assert not any("selection/phase" in m for m in read_metrics(runs / "maxloss"))
    events = EventAccumulator(str(phased / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    records = {r["step"]: r for r in read_selections(phased)}

    def scalars(tag):
        return {e.step: e.value for e in events.Scalars(tag)}
    early = scalars("selection/maxloss/score_selected_mean")
    assert sorted(early) == [1, 2]
    for step, value in early.items():  # maxloss's gains are the picked candidates' losses
        assert value == pytest.approx(np.mean(records[step]["gains"]), rel=1e-5)
    assert sorted(scalars("selection/maxloss/score_rejected_mean")) == [1, 2]
    main = scalars("selection/score_selected_mean")
    assert sorted(main) == [3, 4]
    for step, value in main.items():  # the greedy's alignment term of a pick is eta <g_j, g_val>
        r = records[step]
        assert value == pytest.approx(np.mean(r["alignment_terms"]) / r["eta"], rel=1e-5)
    assert {"selection/maxloss/scores_selected", "selection/scores_selected"} <= set(events.Tags()["histograms"])


def test_phases_that_both_read_the_target_ema_share_one_average(data_cache, tmp_path):
    """With selection.target_ema both first_order and greats align with the average of the validation
    gradients; phased, the greats steps go on with the average the first_order steps built (one file in
    a checkpoint). Reference: a plain first_order run, then a plain greats run resumed from its checkpoint
    at the switch (which reads the target file it left). A resume in the main phase goes on alike."""
    ema = ["selection.target_ema=0.5"]
    phased_keys = ["selection.method=greats", "selection.early_method=first_order", f"selection.early_steps={EARLY}"]
    train(data_cache, tmp_path / "phased", *phased_keys, *ema)
    assert sorted(p.name for p in (tmp_path / "phased" / "checkpoints" / "step_3").glob("target_ema*")) == \
        ["target_ema_tp0_pp0.pt"]
    train(data_cache, tmp_path / "first", "selection.method=first_order", *ema)
    switched = rewound(tmp_path / "first", tmp_path / "switched", EARLY)
    train(data_cache, switched, "selection.method=greats", *ema)
    assert_same_steps(tmp_path / "phased", tmp_path / "first", range(1, EARLY + 1))
    assert_same_steps(tmp_path / "phased", switched, range(EARLY + 1, STEPS + 1))
    resumed = rewound(tmp_path / "phased", tmp_path / "resumed", EARLY + 1)
    train(data_cache, resumed, *phased_keys, *ema)
    assert_same_steps(resumed, tmp_path / "phased", range(EARLY + 2, STEPS + 1))
