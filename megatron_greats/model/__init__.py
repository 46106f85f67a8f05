"""Model construction: the same layer specs as a PipelineModule or as one sequential module."""

from __future__ import annotations

import torch

from megatron_greats.model.gpt import (
    ModelSpec,
    SequentialGPT,
    TransformerLayer,
    layer_specs,
    mean_loss,
    per_sample_losses,
)

__all__ = ["ModelSpec", "SequentialGPT", "build_model", "layer_specs", "mean_loss", "per_sample_losses"]


def build_model(cfg, vocab_size: int, layout) -> torch.nn.Module:
    """A PipelineModule when parallel.pipeline > 1, else SequentialGPT (which any ZeRO stage can wrap)."""
    spec = ModelSpec.from_config(cfg, vocab_size)
    specs = layer_specs(spec)
    if layout.pipeline == 1:
        model = SequentialGPT(specs, seed=cfg.seed)
        model.checkpoint_activations = cfg.model.activation_checkpointing
        return model

    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topology = PipeModelDataParallelTopology(num_pp=layout.pipeline, num_mp=layout.tensor, num_dp=layout.data)
    return PipelineModule(
        layers=specs, loss_fn=mean_loss, topology=topology,
        partition_method=cfg.parallel.pipeline_partition,
        seed_layers=True, seed_fn=torch.manual_seed, base_seed=cfg.seed,
        activation_checkpoint_interval=1 if cfg.model.activation_checkpointing else 0,
        checkpointable_layers=[TransformerLayer.__name__],
    )
