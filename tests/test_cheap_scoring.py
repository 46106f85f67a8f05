"""The cheap-scoring settings (selection.score_window, score_window_at, score_layers, prefilter) against
independent references.

In workers under torchrun (tests/workers/cheap_scoring.py: the project's llama in float64 through the
layout's own executor, at PP > 1 a real DeepSpeed PipelineEngine): the Gram and validation alignment
of windowed and top-L scoring against torch.func per-sample gradients of a plain-torch llama on the
tokens cut by hand, w.r.t. only the weights named as scored (relative 1e-9), at 1 process, TP=2 with
sequence parallel, PP=2 and TP=2 x PP=2; and, with module hooks and saved_tensors_hooks that know
nothing of the recorder, that no gradient reaches and no autograd state is kept below the scored
layers (a pipeline stage with nothing scored runs no backward), while the same hooks fire without
score_layers. In process: ScoreWindow's offsets and cut, Selector.prefilter's rule with ties. End to
end through launch/pretrain.py (tiny gpt2): settings that cover everything change no pick; windowed
top-L picks and the prefilter's picks equal tests/workers/reference.py (plain autograd, the window cut
and the M highest losses kept by hand); single_pass falls back to two_pass with a note; bad
combinations are in test_bad_input.py's catalogue.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import read_metrics, read_selections, run_pretrain
from full_weights import full_weights, relative_gap
from test_ghost_parallel import runs_at_layouts
from test_selection_training import SGD, assert_selections_match_reference, assert_single_pass_equals_two_pass, greats

LAYOUTS = {"1p": (1, 1, 0), "tp2-sp": (2, 1, 1), "pp2": (1, 2, 0), "tp2-pp2-sp": (2, 2, 1)}


@pytest.fixture(scope="module")
def scoring_runs(tmp_path_factory):
    """layout -> the worker's output at that layout (run once per layout and module)."""
    return runs_at_layouts(tmp_path_factory, "cheap_scoring.py", LAYOUTS)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_score_window_offsets_are_drawn_per_step_within_the_sequence():
    """ScoreWindow by hand: 'start' is offset 0 at every step; 'random' draws every offset of 0..T - w
    over steps (both ends included), the same again for the same seed and step, another for another
    seed; the logged [offset, length] is that offset; no window logs nothing and cuts nothing."""
    from megatron_greats.training.scoring import ScoreWindow

    tokens = torch.arange(3 * 33).reshape(3, 33)
    start, random = ScoreWindow(8, "start", 32, 1), ScoreWindow(8, "random", 32, 1)
    assert {start.offset(step) for step in range(1, 200)} == {0}
    offsets = [random.offset(step) for step in range(1, 400)]
    assert set(offsets) == set(range(0, 25))  # 0 .. 32 - 8, every one drawn
    assert offsets == [ScoreWindow(8, "random", 32, 1).offset(step) for step in range(1, 400)]
    assert offsets != [ScoreWindow(8, "random", 32, 2).offset(step) for step in range(1, 400)]
    for step in (1, 2, 3):
        offset = random.offset(step)
        assert random.logged(step) == [offset, 8]
        assert torch.equal(random.cut(tokens, offset), tokens[:, offset: offset + 9])
    assert ScoreWindow().logged(5) is None and ScoreWindow().cut(tokens, 0) is tokens


@pytest.fixture(scope="module")
def layout():
    from megatron_greats.parallel.state import distributed_session, init_model_parallel

    with distributed_session():  # the group ends with this module: no test after it inherits one
        yield init_model_parallel(1, 1)


def test_prefilter_keeps_the_m_highest_losses_ties_to_the_lower_position(layout):
    """Selector.prefilter on losses with ties, against the rule by hand (sort by (-loss, position), keep
    M, ascending); NaN or Inf anywhere: all -1 (the step is skipped)."""
    from megatron_greats.config import load_config
    from megatron_greats.training.selecting import Selector

    cfg = load_config(None, ["selection.method=greats", "train.global_batch=2", "train.micro_batch=1",
                             "selection.candidates=10", "selection.prefilter=5"], world_size=1)
    selector = Selector(cfg, layout)
    losses = torch.tensor([2.0, 3.0, 1.0, 3.0, 2.0, 0.5, 3.0, 2.0, 2.0, 1.0])
    by_hand = sorted(sorted(range(10), key=lambda i: (-float(losses[i]), i))[:5])
    assert by_hand == [0, 1, 3, 4, 6]  # three 3.0s, then the 2.0s at positions 0 and 4 of 0, 4, 7, 8
    assert selector.prefilter(losses).tolist() == by_hand
    for bad in (float("nan"), float("inf")):
        assert selector.prefilter(torch.cat([losses[:9], torch.tensor([bad])])).tolist() == [-1] * 5


def test_windowed_gram_matches_torch_func_of_the_cut_tokens(scoring_runs):
    """One process: a window at the start and one at a seeded offset (the worker picks a step whose
    offset is the last one, T - w), with and without top layers: Gram and validation alignment against
    torch.func of the tokens cut by hand, float64, relative 1e-9; losses 1e-12."""
    run = scoring_runs("1p")
    reference, windowed = run["reference"], [name for name, case in run["cases"].items() if case[2] is not None]
    assert len(windowed) == 3
    for name in windowed:
        (mine,) = run["results"][name]
        ref = reference[name]
        assert mine["tokens"] == run["window"] < run["seq_len"]
        assert mine["offset"] == (0 if run["cases"][name][3] == "start" else run["seq_len"] - run["window"]) == \
            ref["offset"]
        assert relative(mine["gram"], ref["gram"]) < 1e-9, name
        assert relative(mine["alignment"], ref["alignment"]) < 1e-9, name
        assert relative(mine["losses"], ref["losses"]) < 1e-12, name
    # the windows matter: the whole sequence's Gram is another one
    assert relative(reference["tied-window-start"]["gram"], reference["tied-all"]["gram"]) > 1e-2
    assert relative(reference["untied-window-random"]["gram"], reference["untied-all"]["gram"]) > 1e-2


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_top_layers_gram_matches_torch_func_at_layouts(scoring_runs, layout):
    """Every case (top L = 1, 2, 3 of 4 layers, tied and untied, windows, two micro-batches) at the
    layout, against the one-process torch.func reference over only the scored weights: Gram and
    alignment relative 1e-9 on every rank (losses 1e-6: a pipeline passes them on in float32). At
    PP=2 stage 0 holds layers 0-1: with L <= 2 it has nothing scored, and L = 1 leaves layer 2 of
    stage 1 unscored too. A stage asks for its input's gradient exactly where an earlier one scores."""
    run, reference = scoring_runs(layout), scoring_runs("1p")["reference"]
    layers = run["layers"]
    for name, (tied, top, _, _, _) in run["cases"].items():
        ref = reference[name]
        assert ref["names"] == [k for k in ref["names"] if k != "emb" or top is None]  # a tied embedding: unscored
        assert ("out" in ref["names"]) == (not tied)
        for rank, mine in enumerate(run["results"][name]):
            assert relative(mine["gram"], ref["gram"]) < 1e-9, (name, rank)
            assert relative(mine["alignment"], ref["alignment"]) < 1e-9, (name, rank)
            assert relative(mine["losses"], ref["losses"]) < 1e-6, (name, rank)
            stage_zero_scores = top is None or top > layers // 2
            assert mine["input_grad"] == (LAYOUTS[layout][1] > 1 and mine["stage"] == 1 and stage_zero_scores)
    # the references differ where the scored weights do: a top-L score that scored every layer would fail
    for tied, tops in ((True, [2]), (False, [1, 2, 3])):
        everything = reference[f"{'tied' if tied else 'untied'}-all"]["gram"]
        for top in tops:
            assert relative(reference[f"{'tied' if tied else 'untied'}-top{top}"]["gram"], everything) > 1e-2


def _below(top: int, layers: int) -> list:
    return [f"layer{i}" for i in range(layers - top)] + ["embedding", "embedding_output"]


def _present(run: dict, name: str, rank: int) -> set:
    """The labels of the modules that run forward on this rank (those a gradient reaches when every layer
    is scored)."""
    tied = run["cases"][name][0]
    return set(run["results"][f"{'tied' if tied else 'untied'}-all"][rank]["grads"])


@pytest.mark.parametrize("layout", ["1p", "pp2", "tp2-pp2-sp"])
def test_no_gradient_reaches_below_the_scored_layers(scoring_runs, layout):
    """Tensor hooks on the output of every module below the top L layers (lower transformer layers,
    embedding, embedding output) and on the input of the lowest scored layer never fire during
    ScoringPass.scores with top_layers=L, and that input never requires grad; they fire on the scored
    layers, and with every layer scored they fire on all of them (so the hooks can fire). At PP=2 a
    stage with nothing scored runs no backward at all: no gradient reaches any of its modules."""
    run = scoring_runs(layout)
    layers = run["layers"]
    for name, (tied, top, _, _, _) in run["cases"].items():
        for rank, mine in enumerate(run["results"][name]):
            present = _present(run, name, rank)
            if top is None:  # the control: every module and every layer's input gets its gradient
                assert set(mine["grads"]) == present and all(mine["grads"].values()), (name, rank)
                assert set(mine["input_grads"]) == {p for p in present if p.startswith("layer")}, (name, rank)
                continue
            below = set(_below(top, layers))
            assert not below & set(mine["grads"]), (name, rank, mine["grads"])
            lowest = f"layer{layers - top}"
            assert lowest not in mine["input_rg"] and lowest not in mine["input_grads"], (name, rank)
            assert not below & set(mine["input_grads"]), (name, rank)
            scored = present - below
            assert set(mine["grads"]) == scored, (name, rank, mine["grads"])
            if LAYOUTS[layout][1] > 1 and mine["stage"] == 0 and top <= layers // 2:
                assert not mine["grads"] and not mine["input_grads"] and present, (name, rank)


@pytest.mark.parametrize("layout", ["1p", "pp2", "tp2-pp2-sp"])
def test_no_autograd_state_below_the_scored_layers(scoring_runs, layout):
    """saved_tensors_hooks count the tensors autograd saves for backward while each module runs forward:
    none for the modules below the top L layers, some for each scored layer, and some for every layer
    when every layer is scored (the count can see them). A pipeline stage with nothing scored saves
    nothing at all during the pass."""
    run = scoring_runs(layout)
    layers = run["layers"]
    for name, (tied, top, _, _, _) in run["cases"].items():
        for rank, mine in enumerate(run["results"][name]):
            present_layers = {p for p in _present(run, name, rank) if p.startswith("layer")}
            if top is None:
                assert {k for k, v in mine["saved"].items() if v > 0 and k.startswith("layer")} == present_layers
                continue
            below = set(_below(top, layers))
            assert not {k for k, v in mine["saved"].items() if v > 0} & below, (name, rank, mine["saved"])
            assert {k for k, v in mine["saved"].items() if v > 0 and k.startswith("layer")} == present_layers - below
            if LAYOUTS[layout][1] > 1 and mine["stage"] == 0 and top <= layers // 2:
                assert mine["total_saved"] == 0, (name, rank, mine["total_saved"])


# ---- end to end: launch/pretrain.py on the tiny gpt2 -------------------------------------------------
EXCLUDE = "selection.score_exclude=['*word*','*positions*']"  # configs/tiny-cpu.yaml's: the embeddings
WINDOWED = ["model.tie_embeddings=false", "selection.score_window=16", "selection.score_window_at=random",
            "selection.score_layers=1"]
PREFILTER = "selection.prefilter=12"


def _greats_run(data_cache, run_dir, *extra) -> list:
    proc = run_pretrain(greats(data_cache, run_dir, *SGD, *extra), launcher="python")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_selections(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    return records


def _notes(proc) -> list:
    return [line for line in proc.stderr.splitlines() if line.startswith("megatron_greats: note:")]


def test_a_window_of_the_whole_sequence_and_every_layer_change_no_pick(data_cache, tmp_path):
    """score_window = model.seq_len (at the start), and score_layers = model.num_layers where the score
    already leaves out the embeddings (configs/tiny-cpu.yaml's score_exclude): 3 GREATS steps with the
    same picks and gains (relative 1e-6) as the run without them. The window is logged as [0, 32]."""
    base = _greats_run(data_cache, tmp_path / "base", EXCLUDE)
    for extra in ("selection.score_window=32", "selection.score_layers=2"):
        records = _greats_run(data_cache, tmp_path / extra.split("=")[0], EXCLUDE, extra)
        assert [r["selected"] for r in records] == [r["selected"] for r in base], extra
        np.testing.assert_allclose([g for r in records for g in r["gains"]], [g for r in base for g in r["gains"]],
                                   rtol=1e-6, atol=0, err_msg=extra)
        windows = [r["score_window"] for r in records]
        assert windows == ([[0, 32]] * 3 if "window" in extra else [None] * 3)
    assert all(r["score_window"] is None and r["prefiltered"] is None for r in base)


@pytest.fixture(scope="module")
def windowed_run(data_cache, tmp_path_factory):
    """gpt2, untied, scored on a random 16-token window and the top layer only, two_pass, plain SGD."""
    run_dir = tmp_path_factory.mktemp("windowed")
    records = _greats_run(data_cache, run_dir, *WINDOWED)
    return run_dir, records


def test_windowed_top_layer_selection_matches_the_reference(windowed_run, data_cache):
    """Each step's picks and gains (relative 1e-4) against tests/workers/reference.py on the window the
    step logged, cut there by hand from candidates and validation samples, with the gradients of the
    top layer, the final norm and the untied output only (by parameter name). The offsets lie in
    0..seq_len - 16 and are not all at the start."""
    run_dir, records = windowed_run
    offsets = [r["score_window"][0] for r in records]
    assert all(r["score_window"][1] == 16 and 0 <= r["score_window"][0] <= 16 for r in records)
    assert any(offsets), offsets
    assert_selections_match_reference(run_dir, data_cache, top_layers=1, model=["model.tie_embeddings=false"])


def test_single_pass_with_a_window_takes_two_pass_steps(windowed_run, data_cache, tmp_path):
    """selection.update=single_pass with score_window and score_layers: one note says the run takes
    two_pass steps (the memory line says two_pass too), and it does: its picks and its weights after
    every step equal the two_pass run's (relative 1e-6 of each step's update; an update formed from
    the window's operands of one layer would be far from it under plain SGD)."""
    two_pass_dir, two_pass = windowed_run
    run_dir = tmp_path / "single"
    proc = run_pretrain(greats(data_cache, run_dir, *SGD, *WINDOWED, "selection.update=single_pass"), launcher="python")
    assert proc.returncode == 0, proc.stderr[-3000:]
    fallback = [n for n in _notes(proc) if "selection.update=single_pass" in n]
    assert len(fallback) == 1, _notes(proc)
    assert "selection.score_window=16 and selection.score_layers=1" in fallback[0]
    assert "this run takes two_pass steps" in fallback[0]
    assert "selection.update=two_pass" in proc.stderr.split("megatron_greats: memory:")[1].splitlines()[0]
    assert [r["selected"] for r in read_selections(run_dir)] == [r["selected"] for r in two_pass]
    np.testing.assert_allclose([m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m],
                               [m["train/loss"] for m in read_metrics(two_pass_dir) if "train/loss" in m], rtol=1e-6)
    before = None
    for step in (1, 2, 3):
        theirs = full_weights(two_pass_dir / "checkpoints" / f"step_{step}")
        mine = full_weights(run_dir / "checkpoints" / f"step_{step}")
        if before is not None:
            update = {k: theirs[k] - before[k] for k in theirs}
            assert relative_gap(mine, theirs, update) < 1e-6, step
        else:
            assert all(torch.allclose(mine[k], theirs[k], rtol=0, atol=1e-7) for k in theirs)
        before = theirs


@pytest.fixture(scope="module")
def prefilter_run(data_cache, tmp_path_factory):
    """GREATS two_pass with N = 16 candidates, the prefilter keeping M = 12, k = 8, plain SGD."""
    run_dir = tmp_path_factory.mktemp("prefilter")
    return run_dir, _greats_run(data_cache, run_dir, PREFILTER)


def test_prefilter_picks_match_the_rule_applied_by_hand(prefilter_run, data_cache):
    """tests/workers/reference.py applies the rule itself at each step's weights: every candidate's loss
    by a plain forward, the 12 highest kept (ties to the lower position), GREATS over those and the
    validation samples, picks mapped back to positions among the 16. The kept positions equal the
    logged `prefiltered`, the picks and gains (1e-4) the logged ones; the 12th and 13th highest
    losses are apart by more than float32 rounding, so the kept set is not decided by it."""
    run_dir, records = prefilter_run
    for r in records:
        assert len(r["prefiltered"]) == 12 and r["prefiltered"] == sorted(set(r["prefiltered"]))
        kept = {r["candidates"][i] for i in r["prefiltered"]}
        assert set(r["selected"]) <= kept and len(r["selected"]) == 8
    reference = assert_selections_match_reference(run_dir, data_cache, prefilter=12)
    for ref in reference["select"]:
        ordered = np.sort(ref["losses"].numpy())[::-1]
        assert (ordered[11] - ordered[12]) / ordered[11] > 1e-5, ordered


def test_single_pass_with_a_prefilter_equals_two_pass_under_plain_sgd(prefilter_run, data_cache, tmp_path):
    """single_pass forms the update from the rows of the M scored candidates (picks mapped back by
    position): the same picks, losses, gradient norms and weights after every step (1e-5) as two_pass."""
    run_dir, _ = prefilter_run
    assert_single_pass_equals_two_pass(run_dir, data_cache, tmp_path / "single", 1, *SGD, PREFILTER)
