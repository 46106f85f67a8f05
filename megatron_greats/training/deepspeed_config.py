"""The DeepSpeed config and optimizer parameter groups derived from the run config."""

from __future__ import annotations

import torch

from megatron_greats.choices import BF16, SGD


def deepspeed_config(cfg, data_parallel: int) -> dict:
    t = cfg.train
    grad_accum = t.global_batch // (t.micro_batch * data_parallel)
    return {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "optimizer": _optimizer(t),
        # ZeRO lists only its own optimizers as tested; plain SGD keeps no state to partition
        "zero_allow_untested_optimizer": t.optimizer == SGD,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.zero.stage},
        "bf16": {"enabled": t.precision == BF16},
        # DeepSpeed splits stage-to-stage activations over tensor-parallel ranks, assuming they are
        # replicated there; sequence-parallel activations are per-rank shards, so send them whole.
        "pipeline": {"pipe_partitioned": not cfg.parallel.sequence_parallel,
                     "grad_partitioned": not cfg.parallel.sequence_parallel},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }


def _optimizer(t) -> dict:
    if t.optimizer == SGD:  # DeepSpeed builds any torch.optim class by name
        return {"type": "SGD", "params": {"lr": t.lr, "momentum": 0.0, "weight_decay": t.weight_decay}}
    # torch_adam: DeepSpeed would otherwise build its fused CPU Adam op (minutes of compiling)
    return {"type": "AdamW", "params": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.adam_eps,
                                        "weight_decay": t.weight_decay, "torch_adam": True}}


def _decays(name: str, param: torch.nn.Parameter) -> bool:
    # As Megatron: no weight decay on biases, norm weights and learned positions (1-D tensors).
    return param.dim() > 1 and ".positions." not in f".{name}"


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if _decays(name, param) else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
