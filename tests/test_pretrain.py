"""End-to-end pretraining through launch/pretrain.py: layouts agree, outputs exist, checkpoints resume."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import read_metrics, run_pretrain, tiny_overrides, train_losses

# Clipping must be active (a wrong global norm under TP/PP changes the update) and the learning rate
# large enough that a wrong update shows in the next losses.
STRICT = ["train.grad_clip=0.05", "train.lr=0.01", "train.warmup_steps=0", "model.dropout=0.0"]

LAYOUTS = {
    "dp2-zero1": (2, ["zero.stage=1"]),
    "dp2-zero2": (2, ["zero.stage=2"]),
    "tp2": (2, ["parallel.tensor=2"]),
    "tp2-sequence-parallel": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pipeline=2"]),
    "tp2-pp2": (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
}


@pytest.fixture(scope="module")
def reference_losses(data_cache, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    proc = run_pretrain(tiny_overrides(data_cache, run_dir, *STRICT), launcher="python")
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = train_losses(run_dir)
    assert len(losses) == 5
    assert np.std(losses) > 1e-3  # the model trains: a layout that skipped updates would show
    return losses


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_gives_the_same_losses(name, reference_losses, data_cache, tmp_path):
    nproc, layout = LAYOUTS[name]
    proc = run_pretrain(tiny_overrides(data_cache, tmp_path, *STRICT, *layout), nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = train_losses(tmp_path)
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-4, err_msg=name)


def test_llama_untied_pipeline_matches_single_process(data_cache, tmp_path):
    llama = ["model.arch=llama", "model.tie_embeddings=false", *STRICT]
    single, piped = tmp_path / "single", tmp_path / "piped"
    proc = run_pretrain(tiny_overrides(data_cache, single, *llama), launcher="python")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_pretrain(tiny_overrides(data_cache, piped, *llama, "parallel.tensor=2", "parallel.pipeline=2",
                                       "parallel.sequence_parallel=true"), nproc=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(train_losses(piped), train_losses(single), rtol=1e-4)


def test_outputs_tensorboard_and_resume(data_cache, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    overrides = tiny_overrides(data_cache, run_dir, "train.steps=6", "train.eval_interval=2", "train.save_interval=2")
    proc = run_pretrain(overrides, launcher="python")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "=== megatron_greats run summary ===" in proc.stdout

    # TensorBoard event files hold every scalar the run promises, at the logged steps.
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss", "val/loss", "test/loss", "train/lr", "train/tokens_per_sec", "train/samples_seen"}
    assert expected <= tags, tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in events.Scalars("val/loss")] == [2, 4, 6]
    assert [e.value for e in events.Scalars("train/samples_seen")] == [8 * s for s in range(1, 7)]
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(m["train/loss"]) for m in metrics)
    assert (run_dir / "config.yaml").exists()
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} >= {"step_2", "step_4", "step_6", "latest"}

    # Resume: roll the run back to its step-4 checkpoint, rerun the same command, get the same steps 5, 6.
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_6")
    (resumed / "checkpoints" / "latest").write_text("step_4")
    proc = run_pretrain([*overrides, f"run_dir={resumed}"], launcher="python")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "this run started at step 4" in proc.stdout
    assert [m["step"] for m in read_metrics(resumed)] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(train_losses(resumed), train_losses(run_dir), rtol=1e-6)


def test_finished_run_is_not_overwritten(data_cache, tmp_path):
    proc = run_pretrain(tiny_overrides(data_cache, tmp_path, "train.steps=1"), launcher="python")
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = (tmp_path / "metrics.jsonl").read_text()
    proc = run_pretrain(tiny_overrides(data_cache, tmp_path, "train.steps=1", "train.resume=false"),
                        launcher="python")
    assert proc.returncode == 2
    assert "holds an earlier run and train.resume=false" in proc.stderr
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_bf16_trains_with_fp32_master_weights(data_cache, tmp_path):
    """bf16 (ZeRO-1 in one process, and PP=2) keeps fp32 master weights: both layouts agree to bf16 noise."""
    bf16 = ["train.precision=bf16", *STRICT]
    proc = run_pretrain(tiny_overrides(data_cache, tmp_path / "z1", *bf16, "zero.stage=1"), launcher="python")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_pretrain(tiny_overrides(data_cache, tmp_path / "pp2", *bf16, "parallel.pipeline=2"), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, piped = train_losses(tmp_path / "z1"), train_losses(tmp_path / "pp2")
    assert np.std(single) > 1e-3
    np.testing.assert_allclose(piped, single, rtol=1e-3)
