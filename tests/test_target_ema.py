"""selection.target_ema: the candidates' alignment with a stored vector and the validation samples' mean
gradient, formed in the scoring pass, against torch.func per-sample gradients (float64, relative 1e-9);
the EMA over steps against one built by hand; the Gram's validation column and the new products agree
where the stored vector is that column's g_val (the same D on either side).

In process: GhostCapture with a target on the tiny transformer of test_ghost.py (dense weights and
biases, LayerNorm and RMSNorm, token and position embeddings, a tied output layer), on either path, in
one or several micro-batches, with and without a preconditioner (explicit D, its rank-1 fit on the ghost
path; Adam's D of the coming step on the materialised path). In workers under torchrun: megatron-core's
tensor-parallel layers at TP=2 with and without sequence parallelism (tests/workers/target_tensor_parallel.py),
and the scoring pass with a TargetEMA over 3 steps of the project's llama at 1 process, TP=2 with sequence
parallelism and PP=2 (tests/workers/target_ema.py). End to end: a resumed run selects as an
uninterrupted one (test_pretrain.py style).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from conftest import read_selections, run_pretrain, tiny_overrides
from megatron_greats.ghost import GhostRecorder
from megatron_greats.ghost.preconditioning import Preconditioning
from test_ghost import capture_of, relative_error, token_losses, transformer_batch
from test_ghost_parallel import runs_at_layouts, torchrun
from test_preconditioning import per_sample_gradients, random_diagonals

A, TOTAL = 4, 7  # candidates 0..3, validation samples 4..6


def random_vectors(params, seed):
    gen = torch.Generator().manual_seed(seed)
    return {p: torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params}


def scales_of(params, pre, grads, kind):
    """Per parameter, the elementwise D the Gram's candidate rows got (ones without a preconditioner)."""
    if kind == "none":
        return [torch.ones_like(g[0]) for g in grads]
    out = []
    for p, g in zip(params, grads):
        if p in pre.factors:  # the ghost path's rank-1 fit r c^T
            r, c, _ = pre.factors[p]
            out.append(torch.outer(r, c).reshape(p.shape))
        elif kind == "explicit":
            out.append(pre.diagonal[p])
        else:  # Adam's D of the coming step: v_t from the candidates' mean gradient
            predicted = pre.beta2 * pre.second_moment[p] + (1 - pre.beta2) * g[:A].mean(dim=0) ** 2
            out.append(1.0 / ((predicted / (1 - pre.beta2 ** pre.step)).sqrt() + pre.eps))
    return out


def preconditioning_of(kind, params, seed):
    rows = slice(0, A)
    if kind == "none":
        return None
    if kind == "explicit":
        return Preconditioning(rows, diagonal=random_diagonals(params, seed))
    gen = torch.Generator().manual_seed(seed)  # some coordinates the optimizer has not seen yet (v = 0)
    second = {p: v * 1e-4 * (torch.rand(p.shape, generator=gen, dtype=p.dtype) > 0.2)
              for p, v in random_diagonals(params, seed).items()}
    return Preconditioning(rows, second_moment=second, beta2=0.95, step=3, eps=1e-8)


CASES = [("ghost", "none"), ("ghost", "explicit"), ("materialise", "none"), ("materialise", "explicit"),
         ("materialise", "adam"), ("auto", "none")]


@pytest.mark.parametrize("micro_batches", [1, 7], ids=["streamed", "micro-batches"])
@pytest.mark.parametrize("path, pre_kind", CASES)
def test_alignment_with_a_stored_vector_and_the_mean_match_torch_func(path, pre_kind, micro_batches):
    """<D g_i, V> summed over every parameter for the candidates, and g_val per parameter, against
    torch.func; the Gram is the same tensor as without a target (bit for bit)."""
    model, inputs, labels = transformer_batch(11, samples=TOTAL)
    params = GhostRecorder(model).parameters()
    vectors = random_vectors(params, 12)
    del vectors[params[1]]  # a parameter without a stored vector adds nothing to the alignment
    rec = GhostRecorder(model, path=path)
    pre = preconditioning_of(pre_kind, params, 13)
    cap = capture_of(rec, model, token_losses, inputs, labels, micro_batches, preconditioning=pre,
                     averaged=slice(A, TOTAL), target=vectors)
    gram, alignment, means = cap.gram(), cap.target_alignment(), cap.averaged_gradients()
    grads = per_sample_gradients(model, token_losses, inputs, labels, params)
    scales = scales_of(params, pre, grads, pre_kind)
    expected = sum(((g[:A] * s) * vectors[p]).reshape(A, -1).sum(dim=1)
                   for p, g, s in zip(params, grads, scales) if p in vectors)
    assert alignment.shape == (A,)
    assert relative_error(alignment, expected) < 1e-9
    assert set(means) == set(params)
    for p, g in zip(params, grads):
        assert means[p].shape == p.shape
        assert relative_error(means[p], g[A:].mean(dim=0)) < 1e-9
    plain_pre = preconditioning_of(pre_kind, params, 13)
    plain = capture_of(GhostRecorder(model, path=path), model, token_losses, inputs, labels, micro_batches,
                       preconditioning=plain_pre, averaged=slice(A, TOTAL)).gram()
    assert torch.equal(gram, plain)
    # the stored vector matters: this test can fail
    assert relative_error(alignment, gram[:A, A]) > 1e-2


@pytest.mark.parametrize("path, pre_kind", CASES)
def test_stored_g_val_gives_the_grams_own_validation_column(path, pre_kind):
    """With V = g_val of a first capture of the same batch, <D g_i, V> from the stored-vector products
    equals the Gram's validation column <D g_i, g_val> (relative 1e-12): the two sides use the same D,
    so a target EMA with beta = 0 computed this way would select as today's alignment does."""
    model, inputs, labels = transformer_batch(14, samples=TOTAL)
    params = GhostRecorder(model).parameters()
    rec = GhostRecorder(model, path=path)
    first = capture_of(rec, model, token_losses, inputs, labels, 1, averaged=slice(A, TOTAL), target={})
    stored = {p: m.clone() for p, m in first.averaged_gradients().items()}
    assert not first.target_alignment().any()  # no stored vector: nothing aligned
    pre = preconditioning_of(pre_kind, params, 15)
    cap = capture_of(rec, model, token_losses, inputs, labels, 1, preconditioning=pre, averaged=slice(A, TOTAL),
                     target=stored)
    assert relative_error(cap.target_alignment(), cap.gram()[:A, A]) < 1e-12


def test_a_target_needs_averaged_samples():
    model, inputs, labels = transformer_batch(1, samples=TOTAL)
    rec = GhostRecorder(model)
    with pytest.raises(ValueError, match="a target needs averaged samples"):
        rec.capture(target={})
    cap = capture_of(rec, model, token_losses, inputs, labels, 1, averaged=slice(A, TOTAL))
    with pytest.raises(RuntimeError, match="needs a capture with a target"):
        cap.target_alignment()


# ---- tensor parallel: megatron-core's layers ---------------------------------------------------------------
def test_tensor_parallel_layers_against_torch_func():
    """TP=2 (tests/workers/target_tensor_parallel.py), 16 variants: every rank holds the same alignment,
    relative 1e-9 to torch.func's over the full V; each rank's mean gradient is its shard of torch.func's
    (1e-9), for every parameter but the replicated row-parallel bias, which tensor rank 0 alone counts."""
    lines = [line.split() for line in torchrun(2, "target_tensor_parallel.py").splitlines()
             if line.startswith("RESULT")]
    assert len(lines) == 16  # biases or not x sequence parallel or not x tied or not x 2 paths
    for _, name, error, mean_error, spread, counts, params in lines:
        assert float(error) < 1e-9, name
        assert float(mean_error) < 1e-9, name
        assert float(spread) == 0.0, f"{name}: ranks disagree"
        replicated = int("bias1" in name)
        assert [int(c) for c in counts.split(",")] == [int(params), int(params) - replicated], name


# ---- the scoring pass over steps, at layouts -------------------------------------------------------------
LAYOUTS = {"1p": (1, 1, 0), "tp2-sp": (2, 1, 1), "pp2": (1, 2, 0)}


@pytest.fixture(scope="module")
def ema_runs(tmp_path_factory):
    """layout -> tests/workers/target_ema.py's output at that layout (run once per layout and module)."""
    return runs_at_layouts(tmp_path_factory, "target_ema.py", LAYOUTS)


def ema_by_hand(flats: list, n: int, beta: float) -> list:
    """Per step, the candidates' alignment with the bias-corrected EMA of the steps' mean validation
    gradients: G_t = beta G_(t-1) + (1 - beta) g_val,t, <g_i, G_t / (1 - beta^t)>."""
    g, out = torch.zeros_like(flats[0][0]), []
    for t, flat in enumerate(flats, start=1):
        g = beta * g + (1 - beta) * flat[n:].mean(dim=0)
        out.append(flat[:n] @ (g / (1 - beta ** t)))
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_ema_over_three_steps_matches_one_by_hand(ema_runs, layout):
    """tests/workers/target_ema.py: 3 steps of the scoring pass with selection.target_ema=0.6 (tied, every
    layer; untied, top 2 layers, two micro-batches): every rank's alignment equals the EMA formed by hand
    from torch.func's per-sample gradients of each step (relative 1e-9), and the Gram the plain one of
    torch.func; the first step's Gram and alignment are the same tensors as without a target; later steps
    differ from the plain alignment (the EMA matters)."""
    run, reference = ema_runs(layout), ema_runs("1p")["reference"]
    for name in run["cases"]:
        flats = reference[name]
        expected = ema_by_hand(flats, run["n"], run["beta"])
        plain = [flat[:run["n"]] @ flat[run["n"]:].mean(dim=0) for flat in flats]
        for rank, steps in enumerate(run["results"][name]):
            assert [s["updates"] for s in steps] == [0, 1, 2], (name, rank)
            assert torch.equal(steps[0]["gram"], steps[0]["plain_gram"].double()), (name, rank)
            assert torch.equal(steps[0]["alignment"], steps[0]["plain_alignment"].double()), (name, rank)
            for t, (mine, want, flat) in enumerate(zip(steps, expected, flats)):
                assert relative_error(mine["alignment"], want) < 1e-9, (name, rank, t)
                gram = flat[:run["n"]] @ flat[:run["n"]].T
                assert relative_error(mine["gram"], gram) < 1e-9, (name, rank, t)
            for t in (1, 2):
                assert relative_error(expected[t], plain[t]) > 1e-2, (name, t)


# ---- end to end: a resumed run selects as an uninterrupted one ---------------------------------------------
def test_a_resumed_run_makes_the_same_selections(data_cache, tmp_path):
    """launch/pretrain.py, GREATS with selection.target_ema=0.9 and the adam preconditioner, 6 steps with
    checkpoints at 2, 4, 6 (one target file each, tensor/pipeline rank 0, written beside rank_state_0.pt).
    Rolled back to step 4 and rerun: steps 5 and 6 pick the same candidates with the same gains (relative
    1e-6, and 1e-6 of the largest gain) as the uninterrupted run. The control resumes from step 4 with the target file replaced by an
    empty target (no steps folded in): its step-5 gains differ, so the saved target is what the resumed
    run reads."""
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(data_cache, run_dir, "selection.method=greats", "selection.candidates=16",
                               "selection.target_ema=0.9", "selection.preconditioner=adam", "train.steps=6",
                               "train.save_interval=2", "train.lr=0.01", "train.warmup_steps=0")
    proc = run_pretrain(overrides, launcher="python")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the target EMA" in proc.stderr.split("megatron_greats: memory:")[1].splitlines()[0]
    whole = {r["step"]: r for r in read_selections(run_dir)}
    saved = torch.load(run_dir / "checkpoints" / "step_4" / "target_ema_tp0_pp0.pt", weights_only=True)
    assert saved["beta"] == 0.9 and saved["updates"] == 4 and saved["vectors"]
    gains_at = {}
    for name, emptied in (("resumed", False), ("emptied", True)):
        again = tmp_path / name
        shutil.copytree(run_dir, again)
        shutil.rmtree(again / "checkpoints" / "step_6")
        (again / "checkpoints" / "latest").write_text("step_4")
        if emptied:
            torch.save({"beta": 0.9, "updates": 0, "vectors": {}},
                       again / "checkpoints" / "step_4" / "target_ema_tp0_pp0.pt")
        proc = run_pretrain([*overrides, f"run_dir={again}"], launcher="python")
        assert proc.returncode == 0, proc.stderr[-3000:]
        records = {r["step"]: r for r in read_selections(again)}
        assert sorted(records) == [1, 2, 3, 4, 5, 6]
        gains_at[name] = records[5]["gains"]
        if not emptied:
            for step in (5, 6):
                assert records[step]["selected"] == whole[step]["selected"], step
                # float32 rounding is relative to the largest gain, not to each (a gain near zero
                # moved by 1e-9 under a loaded CI machine); the control below differs by 1e-3 of it
                scale = np.max(np.abs(whole[step]["gains"]))
                np.testing.assert_allclose(records[step]["gains"], whole[step]["gains"], rtol=1e-6, atol=1e-6 * scale)
    assert np.max(np.abs(np.array(gains_at["emptied"]) - np.array(whole[5]["gains"]))) > \
        1e-3 * np.max(np.abs(whole[5]["gains"]))
