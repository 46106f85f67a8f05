"""Worker (one process): the peak resident-memory increase of the process's first scoring pass, and
its estimate (training/memory.py), at one shape, as a run's first step meets it.

    python scoring_memory.py OUT SHAPE_JSON

SHAPE_JSON: {"vocab": int, "overrides": [dotted.key=value, ...]}; the shape's model is built on CPU
(the config's scored candidates (N, or the prefilter's M) + selection.val_batch samples of its score
window, its update mode and scored layers), then one
ScoredBatch goes through ScoringPass.scores. The increase is the peak resident set during the
pass (bench/step.py's PeakMemory: Linux's high-water mark, reset on entry, and samples every
millisecond) less the resident set before it; the heap the model's construction freed is
returned to the system first (malloc_trim), so that the pass cannot reuse it unseen. Writes
{"measured": bytes, "estimate": bytes} to OUT (JSON).
"""

import ctypes
import ctypes.util
import gc
import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from megatron_greats.bench import rss_bytes  # noqa: E402
from megatron_greats.bench.step import PeakMemory  # noqa: E402
from megatron_greats.config import load_config  # noqa: E402
from megatron_greats.model import ModelSpec, build_model  # noqa: E402
from megatron_greats.parallel.state import distributed_session, init_model_parallel  # noqa: E402
from megatron_greats.training.executors import PlainExecutor  # noqa: E402
from megatron_greats.training.memory import estimate_scoring_memory, scoring_tokens  # noqa: E402
from megatron_greats.training.scoring import ScoredBatch, ScoringPass  # noqa: E402


def trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(shape: dict, layout) -> dict:
    cfg = load_config(None, shape["overrides"], world_size=1)
    vocab = ModelSpec.from_config(cfg, shape["vocab"]).vocab_size
    model = build_model(cfg, shape["vocab"], layout)
    executor = PlainExecutor(type("Engine", (), {"module": model})(), layout)
    single = cfg.update_mode() == "single_pass"
    scoring = ScoringPass(model, layout, executor, exclude=cfg.selection.score_exclude,
                          micro_batch=cfg.selection.score_micro_batch, keep_operands=single,
                          top_layers=cfg.selection.score_layers)
    n, m = cfg.num_scored(1), cfg.selection.val_batch
    tokens = torch.randint(0, shape["vocab"], (n + m, scoring_tokens(cfg) + 1), generator=torch.Generator().manual_seed(0))
    batch = ScoredBatch.of(tokens[:n], tokens[n:])
    estimate = estimate_scoring_memory(cfg, scoring, vocab, n + m, gram=True)
    trim()
    before = rss_bytes()
    with PeakMemory(interval=0.001) as peak:
        scoring.scores(batch)
    scoring.release()
    measured = peak.peak - before
    return {"measured": measured, "estimate": estimate.scoring_pass}


def main():
    out, shape = sys.argv[1], json.loads(sys.argv[2])
    Path(out).write_text(json.dumps(measure(shape, init_model_parallel(1, 1))))


if __name__ == "__main__":
    with distributed_session():  # ends the process group, also on failure
        main()
