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

import pytest
import torch

from megatron_greats.ghost import GhostRecorder
from megatron_greats.ghost.preconditioning import Preconditioning
from test_ghost import capture_of, relative_error, token_losses, transformer_batch
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
