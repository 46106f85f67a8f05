"""Shared test fixtures: one small built dataset per session, and a runner for real multi-process runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from megatron_greats.bench import EXACT_SCORING
from megatron_greats.data.splits import SPLITS

warnings.filterwarnings("ignore", module="megatron")  # optional-dependency notices (apex, TE) at import

REPO = Path(__file__).resolve().parent.parent
PRETRAIN = REPO / "launch" / "pretrain.py"

# Opt-in, for launch/gpu_check.sh: the in-process reference tests that take it (test_ghost.py's Gram
# against torch.func) build their model and inputs on this device. Unset: "cpu", as always.
TEST_DEVICE = os.environ.get("MEGATRON_GREATS_TEST_DEVICE", "cpu")

# A model and corpus small enough for 4 processes on 2 cores.
TINY_DATA = ["data.max_docs_per_domain=30", "tokenizer.vocab_size=512"]
TINY_MODEL = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.seq_len=32"]
TINY_TRAIN = ["train.global_batch=8", "train.micro_batch=2", "train.steps=5", "train.eval_interval=0",
              "train.eval_batches=1", "train.save_interval=0", "train.progress=false", "train.warmup_steps=1",
              "selection.method=regular", "selection.candidates=null",
              # plain GREATS unless a test asks for a variant (the config's default is a tuned one)
              "selection.preconditioner=none", "selection.eta=null", "selection.score_exclude=[]",
              # exact scoring (the default's window and top layer are cheap-scoring settings)
              *EXACT_SCORING, "selection.update=single_pass"]


def free_port() -> int:
    """A port for a launcher's rendezvous (drawn below the ephemeral range: parallel/state.py)."""
    from megatron_greats.parallel.state import free_port as draw

    return draw()


def child_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """The embedded corpus, tokenizer and indexed data at the tiny settings, built once per session."""
    cache = tmp_path_factory.mktemp("data_cache")
    from megatron_greats.data import prepare_data

    prepare_data(cache_dir=str(cache), seq_len=32, max_docs_per_domain=30, vocab_size=512, show_progress=False)
    return cache


def tiny_overrides(data_cache: Path, run_dir: Path, *extra: str) -> list:
    return [f"data.cache_dir={data_cache}", f"run_dir={run_dir}",
            *TINY_DATA, *TINY_MODEL, *TINY_TRAIN, *extra]


def megatron_copy(data_cache: Path, tmp: Path, cut: str = "", domains: bool = False) -> list:
    """The indexed data given by prefix (Megatron style), with one file of train cut in half (cut=None: none
    cut, and no selection prefix given; "": none cut). Without its domain side files (domains=False), as
    Megatron's own tools write it: one domain, "default", which is then the target (no data.target_domain)."""
    indexed = next(p for p in data_cache.iterdir() if p.name.startswith("indexed-"))
    tokenizer = next(p for p in data_cache.iterdir() if p.name.startswith("tokenizer-"))
    for split in SPLITS:
        for suffix in (".bin", ".idx", *((".domains.json", ".domains.npy") if domains else ())):
            shutil.copy(indexed / f"{split}{suffix}", tmp / f"{split}{suffix}")
    given = SPLITS
    if cut is None:
        given = [s for s in SPLITS if s != "selection"]
    elif cut:
        victim = tmp / f"train{cut}"
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    prefixes = ", ".join(f"{s}: {tmp / s}" for s in given)
    return ["data.source=megatron", f"tokenizer.model={next(tokenizer.glob('*.model'))}",
            f"data.megatron_prefixes={{{prefixes}}}"]


def read_metrics(run_dir: Path) -> list:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def train_losses(run_dir: Path) -> list:
    return [m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m]


def read_selections(run_dir: Path) -> list:
    lines = (Path(run_dir) / "selection.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def run_reference(spec: dict, overrides: list, work_dir: Path) -> dict:
    """tests/workers/reference.py: plain-autograd SGD steps and GREATS selections outside the trainer."""
    import torch

    work_dir.mkdir(parents=True, exist_ok=True)
    spec_file, out = work_dir / "reference_spec.json", work_dir / "reference_out.pt"
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "workers" / "reference.py"), str(spec_file), str(out),
                           *overrides], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def user_env() -> dict:
    """child_env with Python's warnings shown, as a user's shell has them (child_env hides them)."""
    env = child_env()
    env.pop("PYTHONWARNINGS")
    return env


def run_pretrain(overrides: list, nproc: int = 1, launcher: str = "torchrun", timeout: int = 600,
                 config: str = "configs/tiny-cpu.yaml", env: dict | None = None) -> subprocess.CompletedProcess:
    """launch/pretrain.py as a user runs it: plain python (nproc=1) or torchrun with nproc processes
    (env: child_env(), or e.g. user_env())."""
    script = [str(PRETRAIN), "--config", str(REPO / config), *overrides]
    if launcher == "python":
        cmd = [sys.executable, *script]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", *script]
    else:
        raise ValueError(launcher)
    return subprocess.run(cmd, cwd=REPO, env=child_env() if env is None else env, capture_output=True, text=True,
                          timeout=timeout)


# What DeepSpeed and torch printed in a run before megatron_greats/quiet.py and the LR scheduler's fix.
SILENCED = ("Setting accelerator to CPU", "has been overridden after learning rate scheduler",
            "`torch.distributed.all_gather_into_tensor` is deprecated")


def assert_only_our_output(proc: subprocess.CompletedProcess) -> None:
    """A run without a progress bar writes nothing but its own lines: on stderr each starts with
    "megatron_greats: " (notes, the memory estimate), on stdout the run summary."""
    for text in (proc.stdout, proc.stderr):
        for line in SILENCED:
            assert line not in text, text[-3000:]
    foreign = [line for line in proc.stderr.splitlines() if line and not line.startswith("megatron_greats: ")]
    assert not foreign, proc.stderr[-3000:]
    assert proc.stdout.lstrip("\n").startswith("=== megatron_greats run summary ==="), proc.stdout[-3000:]


def error_lines(proc: subprocess.CompletedProcess) -> list:
    """The error lines; several ranks writing at once may run their lines together, so split at the marker."""
    text = proc.stderr.replace("megatron_greats: error:", "\nmegatron_greats: error:")
    return [line for line in text.splitlines() if line.startswith("megatron_greats: error:")]
