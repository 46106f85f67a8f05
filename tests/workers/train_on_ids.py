"""Worker (one process): the reference for a selection run: ordinary steps on exactly the given ids.

    python train_on_ids.py IDS_JSON OUT [dotted.key=value ...]

IDS_JSON holds one list of sample ids per step (all replicas' selections, replica 0 first). Writes the
model's state dict before and after those steps to OUT.
"""

import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from megatron_greats.config import load_config  # noqa: E402
from megatron_greats.parallel.state import distributed_session, init_model_parallel  # noqa: E402
from megatron_greats.training.trainer import Trainer, build_engine, load_data, prepare_run_dir  # noqa: E402


def main():
    steps, out = json.loads(Path(sys.argv[1]).read_text()), sys.argv[2]
    cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu.yaml"), sys.argv[3:],
                      world_size=1)
    run_dir = prepare_run_dir(cfg)
    data = load_data(cfg, show_progress=False)
    layout = init_model_parallel(1, 1)
    engine = build_engine(cfg, data.vocab_size, layout)
    trainer = Trainer(cfg, engine, data, layout, run_dir)

    def state():
        return {k: v.detach().clone() for k, v in engine.module.state_dict().items() if v is not None}

    initial = state()
    for ids in steps:
        trainer.strategy.train(np.asarray(ids))
    torch.save({"initial": initial, "final": state()}, out)


if __name__ == "__main__":
    with distributed_session():  # ends the process group, also on failure
        main()
