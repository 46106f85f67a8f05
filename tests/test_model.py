"""The model's per-sample losses: exact token cross entropy, and no information flow between samples."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_greats.config import load_config
from megatron_greats.model import build_model, per_sample_losses


@pytest.fixture(scope="module")
def layout():
    from megatron_greats.parallel.state import distributed_session, init_model_parallel

    with distributed_session():  # the group ends with this module: no test after it inherits one
        yield init_model_parallel(1, 1)


@pytest.mark.parametrize("arch, tied", [("gpt2", True), ("llama", False)])
def test_per_sample_losses(layout, arch, tied):
    cfg = load_config(None, [f"model.arch={arch}", f"model.tie_embeddings={str(tied).lower()}", "model.num_layers=2",
                             "model.hidden_size=32", "model.num_heads=4", "model.seq_len=16"])
    model = build_model(cfg, vocab_size=300, layout=layout).double()
    tokens = torch.randint(0, 300, (5, 17), generator=torch.Generator().manual_seed(0))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    logits = model(inputs)                                    # [seq, batch, vocab]
    assert logits.shape == (16, 5, 384)                       # vocab padded to a multiple of 128
    losses = per_sample_losses(logits, labels)
    # megatron-core's vocab-parallel cross entropy works in float32: compare at float32 precision
    reference = F.cross_entropy(logits.float().permute(1, 2, 0), labels, reduction="none").mean(dim=1)
    torch.testing.assert_close(losses, reference, rtol=1e-6, atol=0)
    # Each sample's loss depends on that sample alone (batch dim handled right through attention).
    for i in range(5):
        alone = per_sample_losses(model(inputs[i:i + 1]), labels[i:i + 1])
        torch.testing.assert_close(alone[0], losses[i], rtol=1e-6, atol=0)
    # Causality: changing the last input token changes only the last position's logits.
    changed = inputs.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 300
    torch.testing.assert_close(model(changed)[:-1], logits[:-1], rtol=1e-12, atol=0)
