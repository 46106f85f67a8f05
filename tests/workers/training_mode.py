"""Worker (one process): do evaluation and the scoring pass give the module its training mode back when
its forward fails? Plain executor (SequentialGPT) and pipeline executor (a real 1-stage DeepSpeed
PipelineEngine, which runs every pass as a DeepSpeed schedule).

    python training_mode.py OUT [dotted.key=value ...]

Writes {case: {"raised": bool, "training": bool, "clean": bool}} to OUT (JSON); "clean": the pipeline
engine holds none of the pass's state afterwards.
"""

import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from megatron_greats.config import load_config  # noqa: E402
from megatron_greats.model import ModelSpec, SequentialGPT, layer_specs, mean_loss  # noqa: E402
from megatron_greats.model.gpt import TransformerLayer  # noqa: E402
from megatron_greats.parallel.state import distributed_session, init_model_parallel  # noqa: E402
from megatron_greats.training.candidates import micro_batches  # noqa: E402
from megatron_greats.training.deepspeed_config import deepspeed_config, parameter_groups  # noqa: E402
from megatron_greats.training.executors import PipelineExecutor, PlainExecutor  # noqa: E402
from megatron_greats.training.scoring import ScoredBatch, ScoringPass  # noqa: E402

VOCAB = 64


def failing(module):
    """Make the module's first transformer layer raise in its forward."""
    layer = next(m for m in module.modules() if isinstance(m, TransformerLayer))

    def forward(*args, **kwargs):
        raise RuntimeError("forward failed")
    layer.forward = forward


def passes(executor, module, tokens):
    """Each pass, by name, as a function that runs it."""
    scoring = ScoringPass(module, executor.layout, executor)
    return {"evaluate": lambda: executor.evaluate(micro_batches(tokens, None)),
            "scores": lambda: scoring.scores(ScoredBatch.of(tokens[:3], tokens[3:])),
            "losses": lambda: scoring.losses(tokens)}


def run(name, executor, module, tokens, engine=None):
    out = {}
    for case, call in passes(executor, module, tokens).items():
        module.train()
        try:
            call()
            raised = False
        except RuntimeError as e:
            raised = "forward failed" in str(e)
        clean = engine is None or not (hasattr(engine, "greats_run") or "_INSTRUCTION_MAP" in vars(engine))
        out[f"{name}-{case}"] = {"raised": raised, "training": module.training, "clean": clean}
    return out


def main():
    out = sys.argv[1]
    cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu.yaml"), sys.argv[2:],
                      world_size=1)
    layout = init_model_parallel(1, 1)
    specs = layer_specs(ModelSpec.from_config(cfg, VOCAB))
    tokens = torch.randint(0, VOCAB, (4, cfg.model.seq_len + 1), generator=torch.Generator().manual_seed(0))
    result = {}

    plain = SequentialGPT(specs, seed=cfg.seed)
    failing(plain)
    result.update(run("plain", PlainExecutor(type("Engine", (), {"module": plain})(), layout), plain, tokens))

    import deepspeed
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    module = PipelineModule(layers=specs, loss_fn=mean_loss, seed_layers=True, seed_fn=torch.manual_seed,
                            base_seed=cfg.seed, topology=PipeModelDataParallelTopology(num_pp=1, num_mp=1, num_dp=1))
    config = deepspeed_config(cfg, 1)
    config.update(train_batch_size=4, train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1)
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=parameter_groups(module, 0.0),
                                           config=config)
    assert type(engine).__name__ == "PipelineEngine", type(engine)
    failing(module)
    result.update(run("pipeline", PipelineExecutor(engine, layout), module, tokens, engine))
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    with distributed_session():  # ends the process group, also on failure
        main()
