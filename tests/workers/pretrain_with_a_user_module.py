"""Worker: launch/pretrain.py on a model that a user extended with a layer no capture rule covers (tests only).

    python pretrain_with_a_user_module.py --config FILE [dotted.key=value ...]

The model is the configured one, plus `Gain` (a learned per-feature scale, a bare nn.Parameter) on the
first transformer layer's output. Everything else is the real command.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "launch"))

import pretrain  # noqa: E402  launch/pretrain.py
import torch  # noqa: E402

from megatron_greats.model.gpt import TransformerLayer  # noqa: E402
from megatron_greats.training import trainer  # noqa: E402


class Gain(torch.nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(features))

    def forward(self, h):
        return h * self.scale


def with_gain(build):
    def build_model(cfg, vocab_size, layout):
        model = build(cfg, vocab_size, layout)
        layer = next(m for m in model.modules() if isinstance(m, TransformerLayer))
        layer.gain = Gain(cfg.model.hidden_size)
        layer.register_forward_hook(lambda module, args, output: module.gain(output))
        return model
    return build_model


trainer.build_model = with_gain(trainer.build_model)

if __name__ == "__main__":
    sys.exit(pretrain.main(sys.argv[1:]))
