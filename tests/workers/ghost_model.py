"""Worker: the Gram of the project's GPT (float32) at a parallel layout, written to a file.

    torchrun --nproc_per_node N ghost_model.py OUT TP PP SP PATH [reference]

With `reference` (one process) it also writes per-sample gradients computed the plain way: one
ordinary backward per sample, all parameters, then G = g g^T. PP > 1 runs the PipelineModule's stages
by hand: stage 0 sends its activations on, the last stage sends the gradient back.
"""

import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_greats.config import load_config  # noqa: E402
from megatron_greats.ghost import GhostRecorder  # noqa: E402
from megatron_greats.model import build_model, per_sample_losses  # noqa: E402
from megatron_greats.parallel.state import distributed_session, init_model_parallel  # noqa: E402

VOCAB, B, T = 200, 4, 16


def main():
    out, tp, pp, sp, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
    want_reference = len(sys.argv) > 6
    layout = init_model_parallel(tp, pp)
    cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=16", "model.num_heads=4", f"model.seq_len={T}",
                             "model.vocab_pad_multiple=8", f"parallel.tensor={tp}", f"parallel.pipeline={pp}",
                             f"parallel.sequence_parallel={str(sp).lower()}", "model.init_std=0.2"])
    model = build_model(cfg, VOCAB, layout)
    tokens = torch.randint(0, VOCAB, (B, T + 1), generator=torch.Generator().manual_seed(3))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    rec = GhostRecorder(model, batch_dim=1, path=path)
    with rec.capture() as cap:
        if pp == 1:
            cap.backward(per_sample_losses(model(inputs), labels))
        else:
            run_stages(model, cap, inputs, labels, layout, seq=T // tp if sp else T)
    gram = cap.gram()
    # every rank must hold the whole Gram, and every rank's parameters must be covered
    everyone = [torch.empty_like(gram) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, gram.contiguous())
    counts = torch.tensor([sum(p.numel() for p in rec.parameters()), sum(p.numel() for p in model.parameters())])
    dist.all_reduce(counts)
    if dist.get_rank() == 0:
        result = {"gram": gram, "covered": int(counts[0]), "total": int(counts[1]),
                  "spread": max(float((g - gram).abs().max()) for g in everyone)}
        if want_reference:
            result["reference"] = reference_gram(model, inputs, labels)
        torch.save(result, out)


def run_stages(model, cap, inputs, labels, layout, seq):
    nxt, prev = dist.get_rank() + layout.tensor, dist.get_rank() - layout.tensor
    if layout.is_first_stage:
        h = model(inputs)
        dist.send(h.detach().contiguous(), nxt)
        grad_h = torch.empty_like(h)
        dist.recv(grad_h, nxt)
        cap.backward_from([h], [grad_h])
    else:
        h = torch.empty(seq, inputs.shape[0], 16)  # [seq (shard), batch, hidden]
        dist.recv(h, prev)
        h.requires_grad_(True)
        losses = per_sample_losses(model(h), labels)
        (grad_h,) = cap.backward_from([losses.sum()], [None], inputs=[h])
        dist.send(grad_h.contiguous(), prev)


def reference_gram(model, inputs, labels):
    rows = []
    for i in range(inputs.shape[0]):
        model.zero_grad(set_to_none=True)
        per_sample_losses(model(inputs[i:i + 1]), labels[i:i + 1]).sum().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    g = torch.stack(rows).double()
    return g @ g.T


if __name__ == "__main__":
    with distributed_session():  # ends the process group, also on failure
        main()
