"""GhostRecorder against per-sample gradients from torch.func (vmap of grad), single process.

Tolerances: float64 relative 1e-9, float32 relative 1e-4 (max abs error over max abs entry); a bf16
model against a float64 copy, 5e-2 (bf16 keeps 8 bits; 20 seeds on CPU stay under 1.4e-2).
The reference tests build their model and inputs on MEGATRON_GREATS_TEST_DEVICE (conftest.TEST_DEVICE:
cpu unless launch/gpu_check.sh sets cuda); inputs are drawn on the CPU first, so a seed gives the same
samples on every device.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from conftest import TEST_DEVICE
from megatron_greats.ghost import GhostRecorder

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 20), nn.Linear(20, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.relu(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, d, heads, batch_dim):
        super().__init__()
        self.heads, self.batch_dim = heads, batch_dim
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.RMSNorm(d, eps=1e-6)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h):
        x = self.norm1(h)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.batch_dim == 1:  # [T, B, d] -> [B, T, d] for attention only
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        b, t, d = q.shape
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        if self.batch_dim == 1:
            att = att.transpose(0, 1)
        h = h + self.proj(att)
        return h + self.down(F.gelu(self.up(self.norm2(h))))


class TinyTransformer(nn.Module):
    """nn.Linear attention + MLP blocks, LayerNorm/RMSNorm, learned positions, tied embeddings."""

    def __init__(self, vocab=40, d=16, layers=2, seq=6, batch_dim=0):
        super().__init__()
        self.batch_dim = batch_dim
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList([Block(d, 2, batch_dim) for _ in range(layers)])
        self.final = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):  # tokens [B, T]
        if self.batch_dim == 1:
            tokens = tokens.t()
        positions = torch.arange(tokens.shape[self.batch_dim ^ 1]).unsqueeze(self.batch_dim).expand_as(tokens)
        h = self.embed(tokens) + self.pos(positions)
        for block in self.blocks:
            h = block(h)
        logits = self.head(self.final(h))
        return logits if self.batch_dim == 0 else logits.transpose(0, 1)


def transformer_batch(seed: int, samples: int = 6):
    """(model, inputs, labels): a float64 TinyTransformer and `samples` token sequences, from `seed`."""
    torch.manual_seed(seed)
    model = TinyTransformer().double()
    tokens = torch.randint(0, 40, (samples, 7))
    return model, tokens[:, :-1], tokens[:, 1:]


def token_losses(logits, labels):  # [B, T, V], [B, T] -> [B]
    return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(dim=1)


def reference_gram(model, loss_fn, inputs, targets, params):
    """<g_i, g_j> over `params` from torch.func per-sample gradients."""
    names = {p: n for n, p in model.named_parameters()}
    detached = {n: p.detach() for n, p in model.named_parameters()}

    def one(p, x, y):
        return loss_fn(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))[0]

    per_sample = vmap(grad(one), in_dims=(None, 0, 0))(detached, inputs, targets)
    flat = torch.cat([per_sample[names[p]].reshape(inputs.shape[0], -1) for p in params], dim=1)
    return flat @ flat.T


def recorded_gram(model, loss_fn, inputs, targets, **options):
    rec = GhostRecorder(model, **options)
    with rec.capture() as cap:
        cap.backward(loss_fn(model(inputs), targets))
    return cap.gram(), rec.parameters()


def capture_of(rec, model, loss_fn, inputs, targets, micro_batches: int, **capture_options):
    """A capture of `rec` over `micro_batches` equal micro-batches (one: no begin_micro_batch)."""
    size = inputs.shape[0] // micro_batches
    with rec.capture(**capture_options) as cap:
        for index in range(micro_batches):
            if micro_batches > 1:
                cap.begin_micro_batch(index, size)
            part = slice(size * index, size * (index + 1))
            cap.backward(loss_fn(model(inputs[part]), targets[part]))
    return cap


def averaged_by_hand(full, a: int):
    """A full reference Gram with the samples from `a` on merged into one row: their mean gradient."""
    expected = torch.empty(a + 1, a + 1, dtype=full.dtype)
    expected[:a, :a] = full[:a, :a]
    expected[:a, a] = expected[a, :a] = full[:a, a:].mean(dim=1)
    expected[a, a] = full[a:, a:].mean()
    return expected


def relative_error(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("path", ["ghost", "materialise", "auto"])
def test_mlp_with_biases(dtype, path):
    torch.manual_seed(0)
    model = MLP().to(dtype).to(TEST_DEVICE)
    x, y = torch.randn(7, 12, dtype=dtype).to(TEST_DEVICE), torch.randint(0, 3, (7,)).to(TEST_DEVICE)

    def loss_fn(out, target):
        return F.cross_entropy(out, target, reduction="none")

    gram, params = recorded_gram(model, loss_fn, x, y, path=path)
    assert len(params) == 6
    ref = reference_gram(model, loss_fn, x, y, params)
    assert relative_error(gram, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("path", ["ghost", "materialise"])
@pytest.mark.parametrize("batch_dim", [0, 1])
def test_transformer_with_attention_norms_and_tied_embeddings(dtype, path, batch_dim):
    torch.manual_seed(1)
    model = TinyTransformer(batch_dim=batch_dim).to(dtype).to(TEST_DEVICE)
    tokens = torch.randint(0, 40, (5, 7)).to(TEST_DEVICE)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    gram, params = recorded_gram(model, token_losses, inputs, labels, path=path, batch_dim=batch_dim)
    assert {id(p) for p in params} == {id(p) for p in model.parameters()}  # all covered
    assert len(params) == len({id(p) for p in params})  # the tied weight listed once
    ref = reference_gram(model, token_losses, inputs, labels, params)
    assert relative_error(gram, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("path", ["ghost", "materialise"])
@pytest.mark.parametrize("batch_dim", [0, 1])
def test_bf16_transformer_gram_matches_a_float64_copy(path, batch_dim):
    """A bf16 model, as train.precision=bf16 scores it: the Gram comes back in float32 and equals the
    torch.func Gram of a float64 copy with the same (bf16) weights, to bf16 precision. On a GPU this is
    where the bf16 kernels (attention, GEMMs with their own accumulation order) meet the Gram."""
    torch.manual_seed(1)
    model = TinyTransformer(batch_dim=batch_dim).to(torch.bfloat16).to(TEST_DEVICE)
    exact = copy.deepcopy(model).double()  # the same weights, exactly (bf16 -> float64 is exact)
    tokens = torch.randint(0, 40, (5, 7)).to(TEST_DEVICE)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    gram, params = recorded_gram(model, token_losses, inputs, labels, path=path, batch_dim=batch_dim)
    assert gram.dtype == torch.float32
    names, twins = {p: n for n, p in model.named_parameters()}, dict(exact.named_parameters())
    ref = reference_gram(exact, token_losses, inputs, labels, [twins[names[p]] for p in params])
    assert relative_error(gram.double(), ref) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("update_from", ["operands", "blocks", "auto"])
@pytest.mark.parametrize("batch_dim", [0, 1])
def test_weighted_gradients_equal_a_backward_of_the_weighted_loss(batch_dim, update_from):
    """From what the capture keeps (operands, or the per-sample gradients the Gram was formed from):
    sum_i w_i g_i for every parameter (dense, biases, norms, token and position embeddings, the tied
    output layer through both uses), against an ordinary backward of sum_i w_i loss_i; an excluded
    parameter is still captured with keep_operands=True."""
    torch.manual_seed(2)
    model = TinyTransformer(batch_dim=batch_dim).double()
    tokens = torch.randint(0, 40, (6, 7))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    weights = torch.tensor([0.5, 0.0, 0.0, 0.25, 0.25, 0.0], dtype=torch.float64)  # 3 selected samples
    rec = GhostRecorder(model, exclude=["pos.*"], batch_dim=batch_dim, keep_operands=True,
                        path="materialise", update_from=update_from)
    with rec.capture() as cap:
        cap.backward(token_losses(model(inputs), labels))
    cap.gram()  # the Gram does not use the operands up
    sources = cap.update_sources()
    assert sources["pos.weight"] == "operands"  # not scored: no blocks
    expected = {"operands": {"operands"}, "blocks": {"blocks"}}.get(update_from, {"blocks", "operands"})
    assert {v for k, v in sources.items() if k != "pos.weight"} <= expected
    if update_from == "blocks":
        assert sources["blocks.0.qkv.weight"] == "blocks"
    if update_from == "auto":  # here T = 6 < d: a weight's blocks outweigh its operands, a bias's do not
        assert sources["blocks.0.qkv.weight"] == "operands" and sources["blocks.0.qkv.bias"] == "blocks"
    grads = cap.weighted_gradients(weights)
    model.zero_grad()
    (token_losses(model(inputs), labels) * weights).sum().backward()
    assert set(grads) == set(model.parameters())
    for name, p in model.named_parameters():
        assert relative_error(grads[p], p.grad) < 1e-12, name


@pytest.mark.parametrize("path", ["ghost", "materialise"])
@pytest.mark.parametrize("micro_batches", [1, 3])
def test_averaged_samples_are_one_row_and_blocks_stay_exact(path, micro_batches):
    """capture(averaged=last samples): the Gram holds their mean gradient as one row, against torch.func
    (the Gram of the candidates, each candidate with the mean, the mean with itself); the update from
    kept blocks is unchanged by it (the averaged rows are never read) and weights on them are refused."""
    model, inputs, labels = transformer_batch(6)
    rec = GhostRecorder(model, path=path, keep_operands=True, update_from="blocks")
    cap = capture_of(rec, model, token_losses, inputs, labels, micro_batches, averaged=slice(4, 6))
    gram = cap.gram()
    expected = averaged_by_hand(reference_gram(model, token_losses, inputs, labels, rec.parameters()), 4)
    assert gram.shape == (5, 5)
    assert relative_error(gram, expected) < 1e-9
    weights = torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0, 0.0], dtype=torch.float64)
    grads = cap.weighted_gradients(weights)
    model.zero_grad()
    (token_losses(model(inputs), labels) * weights).sum().backward()
    for name, p in model.named_parameters():
        assert relative_error(grads[p], p.grad) < 1e-12, name
    with pytest.raises(ValueError, match="weights on the averaged samples 4..5"):
        cap.weighted_gradients(torch.tensor([0.0, 0.5, 0.0, 0.0, 0.5, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("samples", [6, 30])
@pytest.mark.parametrize("averaged", [0, 4], ids=["all-rows", "averaged"])
@pytest.mark.parametrize("split", [True, False], ids=["split", "whole"])
def test_long_tiles_summed_in_either_form_match_the_reference(monkeypatch, samples, averaged, split):
    """Tiles of at least SPLITS x MIN_SPLIT_COLUMNS elements are summed in the form timed faster: SPLITS
    partial Grams (one batched GEMM; from SYMMETRIC_MIN_ROWS rows on without the block below the
    diagonal) or one GEMM; each form is forced here. One that does not divide evenly is always one GEMM.
    All against torch.func."""
    from megatron_greats.ghost import reduction
    from megatron_greats.ghost.reduction import GramSum

    timed, splits = [], []
    original = GramSum._add_split

    def spy(self, individual, upper, lower):
        splits.append(individual.shape[1])
        original(self, individual, upper, lower)

    monkeypatch.setattr(reduction, "_SPLIT_IS_FASTER", {})
    monkeypatch.setattr(GramSum, "split_is_faster", lambda self, individual: timed.append(individual.shape) or split)
    monkeypatch.setattr(GramSum, "_add_split", spy)
    torch.manual_seed(8)
    wide = GramSum.SPLITS * GramSum.MIN_SPLIT_COLUMNS // 64           # 64 x wide: exactly split-sized
    model = nn.Sequential(nn.Linear(64, wide), nn.Tanh(), nn.Linear(wide, 67), nn.Tanh(),
                          nn.Linear(67, 251), nn.Tanh(), nn.Linear(251, 5)).double()  # 251 x 67: too odd to split
    assert 251 * 67 % GramSum.SPLITS != 0 and 251 * 67 > GramSum.SPLITS * GramSum.MIN_SPLIT_COLUMNS
    assert (samples - averaged >= GramSum.SYMMETRIC_MIN_ROWS) == (samples == 30)
    x, y = torch.randn(samples, 3, 64, dtype=torch.float64), torch.randint(0, 5, (samples, 3))
    rec = GhostRecorder(model, path="materialise")
    gram = capture_of(rec, model, token_losses, x, y, 1,
                      averaged=slice(samples - averaged, samples) if averaged else None).gram()
    full = reference_gram(model, token_losses, x, y, rec.parameters())
    expected = averaged_by_hand(full, samples - averaged) if averaged else full
    assert relative_error(gram, expected) < 1e-9
    lengths = [shape[1] for shape in timed]
    assert sorted(lengths) == [64 * wide, 67 * wide]  # the two long weights' lengths, each timed once
    assert sorted(set(splits)) == (sorted(lengths) if split else [])


def test_split_is_faster_times_both_forms_without_touching_the_sums():
    from megatron_greats.ghost.reduction import GramSum

    gram = GramSum(30, False, torch.float64, "cpu")
    flat = torch.randn(30, GramSum.SPLITS * GramSum.MIN_SPLIT_COLUMNS, dtype=torch.float64)
    assert isinstance(gram.split_is_faster(flat), bool)
    assert gram.matrix().abs().max() == 0
    gram.add_rows(flat)
    assert relative_error(gram.matrix(), flat @ flat.T) < 1e-12


@pytest.mark.parametrize("form", ["whole", "split"])
def test_a_pinned_gram_form_is_used_without_timing(monkeypatch, form):
    """MEGATRON_GREATS_GRAM_FORM=whole|split: every long tile in that form, none timed, the same Gram."""
    from megatron_greats.ghost import reduction
    from megatron_greats.ghost.reduction import GramSum

    splits = []
    original = GramSum._add_split
    monkeypatch.setenv(reduction.GRAM_FORM_VARIABLE, form)
    monkeypatch.setattr(reduction, "_SPLIT_IS_FASTER", {})
    monkeypatch.setattr(GramSum, "split_is_faster", lambda self, individual: pytest.fail("timed a pinned form"))
    monkeypatch.setattr(GramSum, "_add_split", lambda self, *a: splits.append(1) or original(self, *a))
    gram = GramSum(30, False, torch.float64, "cpu")
    flat = torch.randn(30, GramSum.SPLITS * GramSum.MIN_SPLIT_COLUMNS, dtype=torch.float64)
    gram.add_rows(flat)
    gram.add_rows(flat[:, :-1])  # too odd to split: one GEMM whatever the form
    assert len(splits) == (1 if form == "split" else 0)
    expected = flat @ flat.T + flat[:, :-1] @ flat[:, :-1].T
    assert relative_error(gram.matrix(), expected) < 1e-12


def test_a_bad_gram_form_is_a_one_line_error(monkeypatch):
    from megatron_greats.errors import ConfigError
    from megatron_greats.ghost import reduction

    monkeypatch.setenv(reduction.GRAM_FORM_VARIABLE, "fastest")
    with pytest.raises(ConfigError, match=r"^MEGATRON_GREATS_GRAM_FORM='fastest'; allowed: timed, whole, split$"):
        reduction.GramSum(4, False, torch.float32, "cpu")


def test_operands_are_freed_once_used_and_kept_only_for_an_update():
    """Without an update to form, a single micro-batch frees each parameter's operands during backward,
    as soon as its Gram part is formed. For an update from kept blocks, the capture holds exactly the
    blocks (total x parameter size) and no operand until release()."""
    model, inputs, labels = transformer_batch(7)
    rec = GhostRecorder(model)
    with rec.capture() as cap:
        losses = token_losses(model(inputs), labels)
        assert cap.held_bytes() > 0  # the forward's layer inputs are held (held_bytes can see them)
        cap.backward(losses)
        assert cap.held_bytes() == 0
    cap.gram()
    rec = GhostRecorder(model, keep_operands=True, update_from="blocks", path="materialise")
    with rec.capture() as cap:
        cap.backward(token_losses(model(inputs), labels))
    cap.gram()
    assert set(cap.update_sources().values()) == {"blocks"}
    assert cap.held_bytes() == 6 * sum(p.numel() for p in model.parameters()) * 8
    cap.release()
    assert cap.held_bytes() == 0


def test_a_released_capture_cannot_be_read():
    """release() drops the operands, kept blocks and Gram: an update or Gram read afterwards is an error
    (not gradients of zero, nor a Gram formed from nothing). The recorder's next capture releases the
    one before it, so no two steps' operands are held at once."""
    model, inputs, labels = transformer_batch(7)
    rec = GhostRecorder(model, keep_operands=True)
    with rec.capture() as cap:
        cap.backward(token_losses(model(inputs), labels))
    cap.gram()
    cap.release()
    reads = {"weighted_gradients()": lambda: cap.weighted_gradients(torch.full((6,), 1 / 6, dtype=torch.float64)),
             "gram()": cap.gram, "num_samples": lambda: cap.num_samples}
    for name, read in reads.items():
        with pytest.raises(RuntimeError, match=rf"^GhostCapture: {re.escape(name)} after release\(\)"):
            read()
    assert cap.held_bytes() == 0 and cap.update_sources() == {}
    cap.release()  # again: nothing to do
    with rec.capture() as first:
        first.backward(token_losses(model(inputs), labels))
    assert first.held_bytes() > 0
    rec.capture()
    assert first.held_bytes() == 0
    with pytest.raises(RuntimeError, match="after release"):
        first.gram()


def test_an_update_read_before_the_gram_forms_the_gram_first():
    """The Gram's reduction decides what each parameter keeps for the update (its per-sample gradients or
    its operands): weighted_gradients() before gram() runs it first, and both equal the usual order's,
    against torch.func and an ordinary backward."""
    model, inputs, labels = transformer_batch(7)
    weights = torch.tensor([0.5, 0.0, 0.0, 0.25, 0.25, 0.0], dtype=torch.float64)
    rec = GhostRecorder(model, keep_operands=True, path="materialise")
    with rec.capture() as cap:
        cap.backward(token_losses(model(inputs), labels))
    grads = cap.weighted_gradients(weights)
    assert {"blocks", "operands"} == set(cap.update_sources().values())
    assert relative_error(cap.gram(), reference_gram(model, token_losses, inputs, labels, rec.parameters())) < 1e-9
    model.zero_grad()
    (token_losses(model(inputs), labels) * weights).sum().backward()
    for name, p in model.named_parameters():
        assert relative_error(grads[p], p.grad) < 1e-12, name


def test_blocks_are_kept_where_they_take_no_more_bytes_than_the_operands():
    from megatron_greats.ghost.products import Kind, Use, blocks_fit

    def dense(n, tokens, dtype):
        return [Use(Kind.DENSE, 8, 8, slice(0, n), torch.zeros(n, tokens, 8, dtype=dtype),
                    torch.zeros(n, tokens, 8, dtype=dtype))]
    # 4 samples x 64 block elements against 4 x T x (8 + 8) operand elements
    assert blocks_fit(dense(4, 4, torch.float32), 4, torch.float32)        # 1024 bytes each
    assert not blocks_fit(dense(4, 4, torch.bfloat16), 4, torch.float32)   # fp32 blocks, bf16 operands
    assert blocks_fit(dense(4, 8, torch.bfloat16), 4, torch.float32)
    assert not blocks_fit(dense(4, 2, torch.float32), 4, torch.float32)    # T < d / 2: operands are smaller


def test_include_exclude_patterns_cover_exactly_the_named_parameters():
    torch.manual_seed(2)
    model = TinyTransformer().double()
    tokens = torch.randint(0, 40, (4, 7))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    gram, params = recorded_gram(model, token_losses, inputs, labels, exclude=["embed.*", "pos.*"])
    names = {n for n, p in model.named_parameters() if any(p is q for q in params)}
    assert not any(n.startswith(("embed", "pos")) for n in names) and "blocks.0.qkv.weight" in names
    assert relative_error(gram, reference_gram(model, token_losses, inputs, labels, params)) < 1e-9
    gram, params = recorded_gram(model, token_losses, inputs, labels, include=["blocks.1.*"])
    assert all(any(p is q for q in model.blocks[1].parameters()) for p in params)
    assert relative_error(gram, reference_gram(model, token_losses, inputs, labels, params)) < 1e-9


def test_backward_touches_no_parameter_gradient():
    torch.manual_seed(3)
    model = TinyTransformer().double()
    tokens = torch.randint(0, 40, (4, 7))
    existing = {}
    for i, p in enumerate(model.parameters()):
        if i % 2:  # some parameters already hold a gradient, the others none
            p.grad = torch.full_like(p, 0.5)
            existing[p] = p.grad.clone()
    rec = GhostRecorder(model)
    with rec.capture() as cap:
        cap.backward(token_losses(model(tokens[:, :-1]), tokens[:, 1:]))
    cap.gram()
    for p in model.parameters():
        if p in existing:
            assert torch.equal(p.grad, existing[p])
        else:
            assert p.grad is None
        assert p.requires_grad  # restored after the capture


def test_micro_batches_give_the_whole_gram():
    torch.manual_seed(4)
    model = TinyTransformer().double()
    tokens = torch.randint(0, 40, (6, 7))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    rec = GhostRecorder(model)
    with rec.capture() as cap:
        for index in range(3):
            cap.begin_micro_batch(index, 2)
            part = slice(2 * index, 2 * index + 2)
            cap.backward(token_losses(model(inputs[part]), labels[part]))
    ref = reference_gram(model, token_losses, inputs, labels, rec.parameters())
    assert relative_error(cap.gram(), ref) < 1e-9


def test_small_chunks_change_nothing(monkeypatch):
    """chunk_elements=50: the ghost path in row tiles of one sample, the materialised path in row tiles;
    each Gram against torch.func (not against the recorder at the default chunk, which shares every
    error outside the tiling)."""
    from megatron_greats.ghost import products

    tiles = []
    original = products.materialised_blocks
    monkeypatch.setattr(products, "materialised_blocks",
                        lambda *a, **k: (tiles.append(t) or t for t in original(*a, **k)))
    torch.manual_seed(5)
    model = TinyTransformer().double()
    tokens = torch.randint(0, 40, (5, 7))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    for path in ("ghost", "materialise"):
        tiles.clear()
        small, params = recorded_gram(model, token_losses, inputs, labels, path=path, chunk_elements=50)
        assert relative_error(small, reference_gram(model, token_losses, inputs, labels, params)) < 1e-9, path
        if path == "materialise":  # the chunk does cut the weights into row tiles
            assert any(t.rows.start > 0 for t in tiles)


@pytest.mark.parametrize("averaged", [0, 2], ids=["all-rows", "averaged"])
def test_deferred_vector_grams_summed_in_batches_match_the_reference(monkeypatch, averaged):
    """Bias and norm vectors wait for one GEMM; a small DEFERRED_ELEMENTS makes several batches of
    several vectors (a part dropped or counted twice at a flush shows in the Gram)."""
    from megatron_greats.ghost.reduction import GramSum

    flushed = []
    original = GramSum._add_deferred

    def spy(self):
        flushed.append(len(self.deferred))
        original(self)

    monkeypatch.setattr(GramSum, "DEFERRED_ELEMENTS", 300)
    monkeypatch.setattr(GramSum, "_add_deferred", spy)
    model, inputs, labels = transformer_batch(seed=8)
    rec = GhostRecorder(model, path="materialise")
    options = {"averaged": slice(6 - averaged, 6)} if averaged else {}
    gram = capture_of(rec, model, token_losses, inputs, labels, micro_batches=1, **options).gram()
    full = reference_gram(model, token_losses, inputs, labels, rec.parameters())
    expected = averaged_by_hand(full, 6 - averaged) if averaged else full
    assert relative_error(gram, expected) < 1e-9
    assert max(flushed) > 1 and len([n for n in flushed if n]) > 1  # several batches, of several vectors


def test_bad_arguments():
    with pytest.raises(ValueError, match="path='fast'; allowed: auto, ghost, materialise"):
        GhostRecorder(MLP(), path="fast")
    with pytest.raises(ValueError, match="batch_dim=2"):
        GhostRecorder(MLP(), batch_dim=2)
    with pytest.raises(ValueError, match="update_from='grads'; allowed: auto, blocks, operands"):
        GhostRecorder(MLP(), update_from="grads")


# ---- coverage: parameters no rule records are named, never silently left out ----------------------
class WithUnsupportedLayers(nn.Module):
    """A supported Linear, an unsupported Conv1d, and a bare parameter used in forward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.conv = nn.Conv1d(6, 6, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(6))

    def forward(self, x):  # [B, T, 6]
        return self.fc(self.conv(x.transpose(1, 2)).transpose(1, 2)) * self.scale


def _layout():
    from megatron_greats.parallel.state import Layout

    return Layout(rank=0, world_size=1, local_rank=0, tensor=1, pipeline=1, data=1, tensor_rank=0, pipeline_rank=0,
                  data_rank=0)


def test_uncovered_parameters_are_named_and_refused_by_the_scoring_pass():
    from megatron_greats.errors import ConfigError
    from megatron_greats.training.scoring import ScoringPass

    model = WithUnsupportedLayers()
    assert GhostRecorder(model).uncovered() == ["scale", "conv.weight", "conv.bias"]
    with pytest.raises(ConfigError) as error:
        ScoringPass(model, _layout())
    message = str(error.value)
    assert "\n" not in message
    assert "parameter 'scale', 'conv.weight', 'conv.bias' is in no supported layer" in message
    assert "torch.nn.Linear" in message and "selection.score_exclude" in message
    # excluded, or not trainable: nothing is missing from the score
    ScoringPass(model, _layout(), exclude=["conv.*", "scale"])
    # single_pass forms every trainable parameter's gradient: excluding it from the score does not help
    with pytest.raises(ConfigError, match="'scale', 'conv.weight', 'conv.bias'.*selection.update=two_pass"):
        ScoringPass(model, _layout(), exclude=["conv.*", "scale"], keep_operands=True)
    assert GhostRecorder(model, include=["fc.*"]).uncovered() == []
    model.conv.requires_grad_(False)
    model.scale.requires_grad_(False)
    ScoringPass(model, _layout())


def test_score_exclude_patterns_that_match_nothing_or_leave_nothing_scored_are_refused():
    """A pattern that matches no parameter is almost always a typo: refused, naming the closest names.
    Patterns that together exclude every trainable parameter would make every gain 0: refused. A scoring
    pass without the Gram (losses only) does not read the patterns."""
    from megatron_greats.errors import ConfigError
    from megatron_greats.training.scoring import ScoringPass

    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3))  # names 0.weight, 1.bias, ...
    with pytest.raises(ConfigError) as error:
        ScoringPass(model, _layout(), exclude=["0.*", "1.wieght"])
    message = str(error.value)
    assert "\n" not in message
    assert "pattern '1.wieght' matches no parameter" in message, message
    assert "closest parameter names: '1.weight'," in message, message
    for patterns in (["*"], ["0.*", "1.*", "2.*"]):
        with pytest.raises(ConfigError, match="excludes every trainable parameter from the score .all 6.") as error:
            ScoringPass(model, _layout(), exclude=patterns)
        assert "\n" not in str(error.value) and "allowed: " in str(error.value)
    ScoringPass(model, _layout(), exclude=["0.*", "1.*"])          # 2.weight, 2.bias still scored
    ScoringPass(model, _layout(), exclude=["*", "1.wieght"], gram=False)


@pytest.fixture(scope="module")
def layout():
    from megatron_greats.parallel.state import distributed_session, init_model_parallel

    with distributed_session():  # the group ends with this module: no test after it inherits one
        yield init_model_parallel(1, 1)


@pytest.mark.parametrize("arch, tied", [("gpt2", True), ("gpt2", False), ("llama", True), ("llama", False)])
def test_project_gpt_has_nothing_uncovered(layout, arch, tied):
    from megatron_greats.config import load_config
    from megatron_greats.model import build_model
    from megatron_greats.training.scoring import ScoringPass

    cfg = load_config(None, [f"model.arch={arch}", f"model.tie_embeddings={str(tied).lower()}", "model.num_layers=2",
                             "model.hidden_size=16", "model.num_heads=2", "model.seq_len=8"])
    model = build_model(cfg, vocab_size=64, layout=layout)
    rec = ScoringPass(model, layout).recorder  # would raise ConfigError otherwise
    assert rec.uncovered() == []
    assert sum(p.numel() for p in rec.parameters()) == sum(p.numel() for p in model.parameters())


# ---- norm kinds come from the layer type, not from whether it has a bias ---------------------------
class NormBetweenLinears(nn.Module):
    """x [B, T, d] -> Linear -> norm -> Linear, run in the Megatron layout [T, B, d] (batch_dim=1)."""

    def __init__(self, norm, d=8):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(d, d), norm, nn.Linear(d, 5)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x.transpose(0, 1)))).transpose(0, 1)


def _project_norm(kind: str, bias: bool):
    from megatron_greats.model.gpt import LayerNorm, ModelSpec, RMSNorm

    spec = ModelSpec(arch="gpt2" if kind == "layer" else "llama", num_layers=1, hidden_size=8, num_heads=1,
                     ffn_hidden_size=8, seq_len=6, vocab_size=8, tie_embeddings=False, dropout=0.0, init_std=0.02,
                     norm_eps=1e-5, rope_base=10000.0, tensor_parallel=1, sequence_parallel=False)
    norm = (LayerNorm if kind == "layer" else RMSNorm)(spec)
    if not bias:
        norm.bias = None  # a LayerNorm without shift is still a LayerNorm
    return norm


@pytest.mark.parametrize("norm", ["torch LayerNorm(bias=False)", "torch LayerNorm", "torch RMSNorm",
                                  "project LayerNorm without bias", "project LayerNorm", "project RMSNorm"])
def test_norm_kind_comes_from_the_type(norm):
    torch.manual_seed(6)
    layer = {"torch LayerNorm(bias=False)": lambda: nn.LayerNorm(8, bias=False),
             "torch LayerNorm": lambda: nn.LayerNorm(8), "torch RMSNorm": lambda: nn.RMSNorm(8, eps=1e-5),
             "project LayerNorm without bias": lambda: _project_norm("layer", bias=False),
             "project LayerNorm": lambda: _project_norm("layer", bias=True),
             "project RMSNorm": lambda: _project_norm("rms", bias=False)}[norm]()
    model = NormBetweenLinears(layer).double()
    with torch.no_grad():  # not the identity: a wrong normalisation shows in every entry
        model.norm.weight.normal_(1.0, 0.5)
        if getattr(model.norm, "bias", None) is not None:
            model.norm.bias.normal_(0.0, 0.5)
    x, y = torch.randn(4, 6, 8, dtype=torch.float64), torch.randint(0, 5, (4, 6))
    gram, params = recorded_gram(model, token_losses, x, y, batch_dim=1)
    assert {id(p) for p in params} == {id(p) for p in model.parameters()}
    assert relative_error(gram, reference_gram(model, token_losses, x, y, params)) < 1e-9


@pytest.mark.parametrize("rows,chunk_elements,tiles", [(5, 1 << 22, 1), (5, 8 * 7, 3), (200, 8 * 3 * 150, 2),
                                                        (200, 8 * 3 * 50, 6)],
                         ids=["whole", "column-tiles", "row-tiles", "row-and-column-tiles"])
@pytest.mark.parametrize("fresh", [False, True], ids=["shared-buffer", "kept"])
@pytest.mark.parametrize("packed", [False, True], ids=["views", "packed"])
def test_materialised_blocks_sum_uses_whatever_samples_they_share(monkeypatch, rows, chunk_elements, tiles, fresh,
                                                                  packed):
    """Uses covering overlapping, disjoint and missing sample ranges: each row is the sum of the uses that
    cover it, 0 where none does (the reused block buffer must never leak an earlier block), and the tiles
    cover every element of the parameter exactly once, whatever the chunk; kept tiles (fresh=True) each
    in storage of their own. packed: every operand slice copied first, as where its stride aliases."""
    from megatron_greats.ghost import products
    from megatron_greats.ghost.products import Kind, Use, materialised_blocks

    if packed:
        monkeypatch.setattr(products, "ALIASING_STRIDE", 1)

    gen = torch.Generator().manual_seed(0)
    cols, tokens, total = 3, 4, 8  # samples 6 and 7: no use

    def dense(samples):
        n = samples.stop - samples.start
        return Use(Kind.DENSE, rows, cols, samples, torch.randn(n, tokens, cols, generator=gen, dtype=torch.float64),
                   torch.randn(n, tokens, rows, generator=gen, dtype=torch.float64))

    # the last use overlaps an earlier one: a kept tile must not switch the next tile to a shared buffer
    uses = [dense(slice(0, 3)), dense(slice(5, 6)), dense(slice(1, 5))]
    expected = torch.zeros(total, rows, cols, dtype=torch.float64)
    for u in uses:
        expected[u.samples] += torch.einsum("ntr,ntc->nrc", u.grads, u.inputs)
    got = torch.full_like(expected, float("nan"))
    covered = torch.zeros(rows, cols, dtype=torch.int64)
    blocks = []
    for tile in materialised_blocks(uses, total, torch.float64, chunk_elements=chunk_elements, fresh=fresh):
        assert tile.block.numel() <= chunk_elements
        got[:, tile.rows, tile.cols] = tile.block  # a copy: without fresh the next tile reuses the buffer
        covered[tile.rows, tile.cols] += 1
        blocks.append(tile.block)  # alive to the end: distinct storages are distinct addresses
    storages = {b.untyped_storage().data_ptr() for b in blocks}
    assert len(blocks) == tiles and len(storages) == (tiles if fresh else 1) and bool((covered == 1).all())
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_operand_slices_are_packed_only_where_their_stride_aliases():
    """A tile's output-gradient rows (at most MIN_TILE_ROWS of them) or input columns whose rows lie
    ALIASING_STRIDE or more elements apart are copied to packed operands; others stay views."""
    from megatron_greats.ghost.products import (ALIASING_STRIDE, MIN_TILE_ROWS, Kind, Use, _tile_grads_t,
                                                _tile_inputs)

    def use(rows, cols):
        return Use(Kind.DENSE, rows, cols, slice(0, 2), torch.randn(2, 3, cols), torch.randn(2, 3, rows))

    def packed(t, source):
        return t.untyped_storage().data_ptr() != source.untyped_storage().data_ptr()

    wide, narrow = use(ALIASING_STRIDE, ALIASING_STRIDE), use(ALIASING_STRIDE // 4, ALIASING_STRIDE // 4)
    thin, tall = slice(0, MIN_TILE_ROWS), slice(0, 2 * MIN_TILE_ROWS)
    grads_t = _tile_grads_t(wide, thin, torch.float32)
    assert packed(grads_t, wide.grads) and grads_t.is_contiguous()
    assert torch.equal(grads_t, wide.grads[:, :, thin].transpose(1, 2))
    assert not packed(_tile_grads_t(wide, tall, torch.float32), wide.grads)   # tall tiles: the copy was slower
    assert not packed(_tile_grads_t(narrow, thin, torch.float32), narrow.grads)
    inputs = _tile_inputs(wide, thin, torch.float32)
    assert packed(inputs, wide.inputs) and torch.equal(inputs, wide.inputs[:, :, thin])
    assert not packed(_tile_inputs(narrow, thin, torch.float32), narrow.inputs)
    assert not packed(_tile_inputs(wide, None, torch.float32), wide.inputs)     # whole rows: contiguous already


def test_tiles_keep_enough_rows_for_a_fast_per_sample_gemm():
    """Row tiles as tall as the chunk allows; a wide parameter is cut into columns before its tiles get
    thinner than MIN_TILE_ROWS rows."""
    from megatron_greats.ghost.products import MIN_TILE_ROWS, tile_shape

    assert tile_shape(1024, 1024, 32, 1 << 22) == (128, 1024)    # 128 rows of full width fit
    assert tile_shape(1024, 4096, 32, 1 << 22) == (MIN_TILE_ROWS, 1024)  # 32 full rows would: columns instead
    assert tile_shape(64, 4096, 32, 1 << 20) == (64, 512)        # fewer rows than the minimum: all of them
    assert tile_shape(300, 7, 8, 1 << 22) == (300, 7)           # one tile
    assert tile_shape(4096, 1, 32, 1 << 10) == (32, 1)          # a vector: rows only
    assert tile_shape(4096, 128, 40, 1 << 22) == (683, 128)     # 819 rows fit: 6 even tiles, not a last one of 1
    assert tile_shape(128, 1000, 64, 1 << 20) == (128, 125)     # 128 columns fit: 8 even tiles of 125


def test_megatron_rules_wait_until_megatron_core_is_loaded():
    """Recording a plain torch model does not import megatron-core (4 s of a benchmark process's start);
    once it is loaded, its layers have their rules."""
    import subprocess
    import sys

    from conftest import REPO, child_env

    script = (
        "import sys, torch\n"
        "from megatron_greats.ghost import GhostRecorder, layers\n"
        "model = torch.nn.Sequential(torch.nn.Linear(3, 2))\n"
        "rec = GhostRecorder(model)\n"
        "with rec.capture() as cap:\n"
        "    cap.backward(model(torch.randn(4, 1, 3)).sum(dim=(1, 2)))\n"
        "assert cap.gram().shape == (4, 4)\n"
        "assert 'megatron.core' not in sys.modules, 'imported megatron-core'\n"
        "from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear\n"
        "from megatron_greats.model.gpt import RMSNorm\n"
        "layers.rule_for(model[0])\n"
        "assert all(t in layers.RULES for t in (ColumnParallelLinear, RowParallelLinear, RMSNorm))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


class PositionModel(nn.Module):
    """Token and position embeddings (positions given per token, padding row 7), a norm and an output layer:
    inputs [B, T, 2] hold (token, position)."""

    def __init__(self, d=6):
        super().__init__()
        self.embed, self.pos = nn.Embedding(11, d), nn.Embedding(8, d, padding_idx=7)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 11)

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.embed(x[..., 0]) + self.pos(x[..., 1]))))


POSITIONS = {  # positions of 6 tokens per sample; aligned: every sample the same rows, none twice
    "aligned": ([0, 1, 2, 3, 4, 5], None, True),
    "aligned-with-padding": ([7, 1, 2, 7, 4, 5], None, True),  # row 7 (padding) has no gradient
    "one-sample-differs": ([0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], False),
    "a-row-twice": ([0, 1, 1, 2, 3, 4], None, False),
}


@pytest.mark.parametrize("positions", list(POSITIONS))
@pytest.mark.parametrize("averaged", [0, 2], ids=["all-rows", "averaged"])
def test_aligned_position_rows_skip_the_per_sample_blocks(monkeypatch, positions, averaged):
    """A position embedding whose samples use the same rows, none twice, has its Gram formed from its output
    gradients (no per-sample block), and the update reads its operands; any other sparse use goes the usual
    way. Gram and update against torch.func and an ordinary backward."""
    from megatron_greats.ghost import products

    flats = []
    original = products.aligned_rows_flat
    monkeypatch.setattr(products, "aligned_rows_flat", lambda u, dtype: flats.append(u.rows) or original(u, dtype))
    row, other, aligned = POSITIONS[positions]
    torch.manual_seed(9)
    model = PositionModel().double()
    samples = 5
    pos = torch.tensor([row] * samples)
    if other is not None:
        pos[2] = torch.tensor(other)
    inputs = torch.stack([torch.randint(0, 11, (samples, 6)), pos], dim=-1)
    labels = torch.randint(0, 11, (samples, 6))
    rec = GhostRecorder(model, path="materialise", keep_operands=True)
    cap = capture_of(rec, model, token_losses, inputs, labels, 1,
                     averaged=slice(samples - averaged, samples) if averaged else None)
    gram = cap.gram()
    full = reference_gram(model, token_losses, inputs, labels, rec.parameters())
    expected = averaged_by_hand(full, samples - averaged) if averaged else full
    assert relative_error(gram, expected) < 1e-9
    assert flats == ([8] if aligned else [])  # the position embedding only (8 rows); the tokens differ
    if aligned:  # no blocks to keep (elsewhere blocks_fit decides)
        assert cap.update_sources()["pos.weight"] == "operands"
    weights = torch.tensor([0.5, 0.0, 0.5, 0.0, 0.0], dtype=torch.float64)[:samples]
    grads = cap.weighted_gradients(weights)
    model.zero_grad()
    (token_losses(model(inputs), labels) * weights).sum().backward()
    for name, p in model.named_parameters():
        assert relative_error(grads[p], p.grad) < 1e-12, name
