"""A diagonal preconditioner on the candidates' side of the Gram, against torch.func per-sample gradients.

Exact path (materialise): an explicit elementwise D, fp64 relative 1e-9. Ghost path: exact for the
rank-1 r c^T it uses, checked against an explicit r c^T built from the same factors, which must be the
leading singular pair of the given D (torch.linalg.svd).
"""

from __future__ import annotations

import pytest
import torch

from megatron_greats.ghost import GhostRecorder
from megatron_greats.ghost.preconditioning import Preconditioning, rank_one
from test_ghost import MLP, capture_of, relative_error, token_losses, transformer_batch
from torch.func import functional_call, grad, vmap


def per_sample_gradients(model, loss_fn, inputs, targets, params) -> list:
    """[n, *param.shape] per parameter, from torch.func (vmap of grad)."""
    names = {p: n for n, p in model.named_parameters()}
    detached = {n: p.detach() for n, p in model.named_parameters()}

    def one(p, x, y):
        return loss_fn(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))[0]

    per_sample = vmap(grad(one), in_dims=(None, 0, 0))(detached, inputs, targets)
    return [per_sample[names[p]] for p in params]


def scaled_reference(grads: list, scales: list, rows: slice):
    """Gram of the per-sample gradients with samples `rows` multiplied elementwise by each scale."""
    n = grads[0].shape[0]
    flat = []
    for g, s in zip(grads, scales):
        g = g.clone()
        g[rows] *= s
        flat.append(g.reshape(n, -1))
    flat = torch.cat(flat, dim=1)
    return flat @ flat.T


def random_diagonals(params, seed):
    gen = torch.Generator().manual_seed(seed)
    # Adam-like: positive, spread over two orders of magnitude
    return {p: torch.exp(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1.5) for p in params}


def capture(model, loss_fn, inputs, targets, preconditioning, **options):
    rec = GhostRecorder(model, **options)
    with rec.capture(preconditioning=preconditioning) as cap:
        cap.backward(loss_fn(model(inputs), targets))
    return cap.gram(), rec.parameters()


def _transformer(seed):
    model, inputs, labels = transformer_batch(seed)
    return model, token_losses, inputs, labels


def _mlp(seed):
    torch.manual_seed(seed)
    model = MLP().double()
    x, y = torch.randn(7, 12, dtype=torch.float64), torch.randint(0, 3, (7,))
    return model, lambda out, t: torch.nn.functional.cross_entropy(out, t, reduction="none"), x, y


# 6 x 64 elements: the transformer's weights are cut into column tiles (products.tile_shape)
CHUNKS = pytest.mark.parametrize("chunk_elements", [1 << 22, 6 * 64], ids=["whole", "tiles"])


@CHUNKS
@pytest.mark.parametrize("case", [_transformer, _mlp], ids=["transformer", "mlp"])
def test_exact_path_matches_torch_func_with_an_explicit_diagonal(case, chunk_elements):
    """Dense weights and biases, norms, token/position embeddings and the tied output layer."""
    model, loss_fn, inputs, targets = case(0)
    params = GhostRecorder(model).parameters()
    diagonals = random_diagonals(params, seed=1)
    rows = slice(0, 4)  # the "candidates"; the rest play the validation samples
    gram, params = capture(model, loss_fn, inputs, targets, Preconditioning(rows, diagonal=diagonals), path="materialise",
                           chunk_elements=chunk_elements)
    ref = scaled_reference(per_sample_gradients(model, loss_fn, inputs, targets, params),
                           [diagonals[p] for p in params], rows)
    assert relative_error(gram, ref) < 1e-9
    plain = scaled_reference(per_sample_gradients(model, loss_fn, inputs, targets, params),
                             [torch.ones_like(diagonals[p]) for p in params], rows)
    assert relative_error(gram, plain) > 1e-2  # the diagonal matters: this test can fail


@pytest.mark.parametrize("case", [_transformer, _mlp], ids=["transformer", "mlp"])
def test_ghost_path_is_exact_for_its_own_rank_one_factors(case):
    model, loss_fn, inputs, targets = case(2)
    params = GhostRecorder(model).parameters()
    diagonals = random_diagonals(params, seed=3)
    rows = slice(1, 5)
    pre = Preconditioning(rows, diagonal=diagonals)
    gram, params = capture(model, loss_fn, inputs, targets, pre, path="ghost")
    factored = pre.rank_one_errors()
    assert factored, "some dense parameter must take the ghost path"
    # the factors fit this parameter's own D: its leading singular pair (to 1e-3 after the power
    # iteration; the rank-1 fit of a misread D is off by about 1)
    for p in factored:
        u, s, vh = torch.linalg.svd(diagonals[p].reshape(p.shape[0], -1))
        r, c, _ = pre.factors[p]
        assert relative_error(torch.outer(r, c), s[0] * torch.outer(u[:, 0], vh[0])) < 1e-3
    scales = []
    for p in params:
        if p in factored:  # dense: the explicit r c^T of the factors the ghost path used
            r, c, _ = pre.factors[p]
            scales.append(torch.outer(r, c).reshape(p.shape))
        else:  # sparse, bias, norm uses take the exact path
            scales.append(diagonals[p])
    ref = scaled_reference(per_sample_gradients(model, loss_fn, inputs, targets, params), scales, rows)
    assert relative_error(gram, ref) < 1e-9
    assert all(0 < e < 1 for e in factored.values())  # random D is far from rank 1: errors are reported


@CHUNKS
def test_adam_diagonal_of_the_coming_step(chunk_elements):
    """From Adam's v: D = 1 / (sqrt((beta2 v + (1 - beta2) gbar^2) / (1 - beta2^t)) + eps), gbar the mean
    gradient of the preconditioned samples; coordinates with v = 0 included."""
    model, loss_fn, inputs, targets = _transformer(6)
    params = GhostRecorder(model).parameters()
    second = {p: v * (torch.rand(p.shape, dtype=p.dtype) > 0.2) for p, v in random_diagonals(params, 7).items()}
    second = {p: v * 1e-4 for p, v in second.items()}
    rows, beta2, t, eps = slice(0, 4), 0.95, 3, 1e-8
    gram, params = capture(model, loss_fn, inputs, targets,
                           Preconditioning(rows, second_moment=second, beta2=beta2, step=t, eps=eps),
                           path="materialise", chunk_elements=chunk_elements)
    grads = per_sample_gradients(model, loss_fn, inputs, targets, params)
    scales = []
    for p, g in zip(params, grads):
        predicted = beta2 * second[p] + (1 - beta2) * g[rows].mean(dim=0) ** 2
        scales.append(1.0 / ((predicted / (1 - beta2 ** t)).sqrt() + eps))
    assert relative_error(gram, scaled_reference(grads, scales, rows)) < 1e-9


def test_rank_one_fit_is_the_leading_singular_pair():
    gen = torch.Generator().manual_seed(0)
    r, c = torch.rand(9, generator=gen, dtype=torch.float64) + 0.1, torch.rand(5, generator=gen, dtype=torch.float64)
    fr, fc, error = rank_one(torch.outer(r, c))
    assert error < 1e-12 and torch.allclose(torch.outer(fr, fc), torch.outer(r, c), rtol=1e-12)
    d = torch.exp(torch.randn(9, 5, generator=gen, dtype=torch.float64))
    _, _, error = rank_one(d)
    s = torch.linalg.svdvals(d)
    assert error == pytest.approx(float((1 - s[0] ** 2 / (s ** 2).sum()).sqrt()), rel=1e-9)


def test_preconditioning_leaves_unscaled_rows_alone():
    """Rows outside `samples` and their products with each other are the plain Gram's, against torch.func
    (the default path: scaled rows there are only as exact as the ghost path's rank-1 fit)."""
    model, loss_fn, inputs, targets = _transformer(4)
    params = GhostRecorder(model).parameters()
    rows = slice(0, 3)
    gram, params = capture(model, loss_fn, inputs, targets,
                           Preconditioning(rows, diagonal=random_diagonals(params, 5)))
    grads = per_sample_gradients(model, loss_fn, inputs, targets, params)
    plain = scaled_reference(grads, [torch.ones_like(g[0]) for g in grads], rows)
    assert relative_error(gram[3:, 3:], plain[3:, 3:]) < 1e-9


@CHUNKS
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_kept_blocks_are_the_unscaled_gradients(micro_batches, chunk_elements):
    """With the update kept as per-sample gradients (single_pass), the Gram rows of the candidates are
    D g_i while the update is formed from the plain g_i; the validation samples are one averaged row."""
    model, loss_fn, inputs, targets = _transformer(8)
    params = GhostRecorder(model).parameters()
    diagonals = random_diagonals(params, seed=9)
    rows = slice(0, 4)
    rec = GhostRecorder(model, path="materialise", keep_operands=True, update_from="blocks",
                        chunk_elements=chunk_elements)
    cap = capture_of(rec, model, loss_fn, inputs, targets, micro_batches,
                     preconditioning=Preconditioning(rows, diagonal=diagonals), averaged=slice(4, 6))
    gram = cap.gram()
    full = scaled_reference(per_sample_gradients(model, loss_fn, inputs, targets, params),
                            [diagonals[p] for p in params], rows)
    assert relative_error(gram[:4, :4], full[:4, :4]) < 1e-9
    assert relative_error(gram[:4, 4], full[:4, 4:].mean(dim=1)) < 1e-9
    assert set(cap.update_sources().values()) == {"blocks"}
    weights = torch.tensor([0.25, 0.0, 0.75, 0.0, 0.0, 0.0], dtype=torch.float64)
    grads = cap.weighted_gradients(weights)
    model.zero_grad()
    (loss_fn(model(inputs), targets) * weights).sum().backward()
    for p in params:
        assert relative_error(grads[p], p.grad) < 1e-12
