"""Bad input ends with one error line and a non-zero exit before any training starts, and writes nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import error_lines, run_pretrain, tiny_overrides


def assert_refused(proc, run_dir: Path, *needles: str) -> None:
    lines = error_lines(proc)
    assert proc.returncode != 0
    assert len(set(lines)) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    # (torchrun prints its own traceback when a child exits non-zero; ours must not)
    assert "megatron_greats/" not in proc.stderr and 'pretrain.py", line' not in proc.stderr
    assert not (run_dir / "metrics.jsonl").exists()
    assert not (run_dir / "checkpoints" / "latest").exists()


def test_unknown_key_names_it_and_suggests(data_cache, tmp_path):
    proc = run_pretrain(tiny_overrides(data_cache, tmp_path, "train.learning_rate=0.1"), launcher="python")
    assert_refused(proc, tmp_path, "unknown config key 'train.learning_rate'", "did you mean 'lr'")
    proc = run_pretrain(tiny_overrides(data_cache, tmp_path, "model.hiden_size=64"), launcher="python")
    assert_refused(proc, tmp_path, "unknown config key 'model.hiden_size'", "did you mean 'hidden_size'")


def test_wrong_type(data_cache, tmp_path):
    proc = run_pretrain(tiny_overrides(data_cache, tmp_path, "model.num_layers=two"), launcher="python")
    assert_refused(proc, tmp_path, "'model.num_layers'", "'two'", "allowed type: int")


def test_layout_not_dividing_world_size(data_cache, tmp_path):
    proc = run_pretrain(tiny_overrides(data_cache, tmp_path, "parallel.tensor=2"), nproc=3)
    assert_refused(proc, tmp_path, "world size 3 is not divisible by parallel.tensor x parallel.pipeline")


def test_missing_data_path(data_cache, tmp_path):
    missing = tmp_path / "no_such_corpus.jsonl"
    proc = run_pretrain(tiny_overrides(data_cache, tmp_path / "run", "data.source=files", f"data.files=[{missing}]",
                                       "data.target_domain=default"), launcher="python")
    assert_refused(proc, tmp_path / "run", str(missing))


def test_corrupted_idx(data_cache, tmp_path):
    """Megatron-format data given by prefix, with its .idx cut short."""
    indexed = next(p for p in data_cache.iterdir() if p.name.startswith("indexed-"))
    tokenizer = next(p for p in data_cache.iterdir() if p.name.startswith("tokenizer-"))
    prefixes = {}
    for split in ("train", "val", "test"):
        for suffix in (".bin", ".idx"):
            shutil.copy(indexed / f"{split}{suffix}", tmp_path / f"{split}{suffix}")
        prefixes[split] = str(tmp_path / split)
    idx = tmp_path / "train.idx"
    idx.write_bytes(idx.read_bytes()[: idx.stat().st_size // 2])
    model = next(tokenizer.glob("*.model"))
    overrides = tiny_overrides(data_cache, tmp_path / "run", "data.source=megatron", f"tokenizer.model={model}",
                               "data.target_domain=default",
                               "data.megatron_prefixes={train: %s, val: %s, test: %s}" % (
                                   prefixes["train"], prefixes["val"], prefixes["test"]))
    proc = run_pretrain(overrides, launcher="python")
    assert_refused(proc, tmp_path / "run", str(idx))


def test_vocab_too_large_for_the_text(data_cache, tmp_path):
    proc = run_pretrain(tiny_overrides(data_cache, tmp_path, "tokenizer.vocab_size=60000"), launcher="python")
    assert_refused(proc, tmp_path, "60000")


@pytest.mark.parametrize("overrides, needle", [
    (["parallel.pipeline=2", "zero.stage=2"], "allowed with pipeline parallelism: 0 or 1"),
    (["train.micro_batch=3"], "train.global_batch=8 is not divisible"),
])
def test_pipeline_and_batch_constraints(data_cache, tmp_path, overrides, needle):
    proc = run_pretrain(tiny_overrides(data_cache, tmp_path, *overrides), launcher="python")
    assert_refused(proc, tmp_path, needle)
