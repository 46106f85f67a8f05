"""End-to-end pretraining through launch/pretrain.py: layouts agree, outputs exist, checkpoints resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import (assert_only_our_output, megatron_copy, read_metrics, read_selections, run_pretrain, run_reference,
                      tiny_overrides, train_losses, user_env)
from full_weights import full_weights, relative_gap

# Plain SGD: its step is lr x gradient, so an error in the gradient's scale (a 1/k slip, a data-parallel
# sum instead of a mean, a tied weight counted twice) shows in the weights; AdamW would divide it out.
# Clipping at 0.7 is active in step 1 only (the norms are about 0.86, 0.63, 0.59; checked below): a
# wrong global norm changes step 1's coefficient, a wrong scale shows unclipped in steps 2 and 3.
CLIP = 0.7
STRICT = ["train.optimizer=sgd", "train.lr=0.5", "train.weight_decay=0", f"train.grad_clip={CLIP}",
          "train.warmup_steps=0", "model.dropout=0.0", "train.steps=3", "train.save_interval=1"]
# bf16 keeps AdamW (its fp32 master weights are what that test is about).
ADAMW_STRICT = ["train.grad_clip=0.05", "train.lr=0.01", "train.warmup_steps=0", "model.dropout=0.0"]
RTOL = 1e-5

LAYOUTS = {
    "dp2-zero0": (2, ["zero.stage=0"]),  # the project's own norm, clipping and skip (optimizer_step.py)
    "dp2-zero1": (2, ["zero.stage=1"]),
    "dp2-zero2": (2, ["zero.stage=2"]),
    "tp2": (2, ["parallel.tensor=2"]),
    "tp2-sequence-parallel": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pipeline=2"]),
    "tp2-pp2": (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
}


def step_weights(run_dir: Path, steps: int) -> list:
    return [full_weights(run_dir / "checkpoints" / f"step_{s}") for s in range(1, steps + 1)]


def grad_norms(run_dir: Path) -> list:
    return [m["train/grad_norm"] for m in read_metrics(run_dir) if "train/loss" in m]


def assert_same_steps(run_dir: Path, reference: dict, name: str) -> None:
    """Per step: the global gradient norm and the weights after the step (relative to that step's
    update) agree with the reference to RTOL."""
    np.testing.assert_allclose(grad_norms(run_dir), reference["grad_norms"], rtol=RTOL, err_msg=name)
    previous = [reference["initial"], *reference["weights"][:-1]]
    for step, (mine, theirs, before) in enumerate(zip(step_weights(run_dir, 3), reference["weights"], previous), 1):
        update = {k: theirs[k] - before[k] for k in theirs}
        gap = relative_gap(mine, theirs, update)
        assert gap < RTOL, f"{name}: weights after step {step} differ by {gap:.2e} of the step's update"


def checked_against_plain_sgd(data_cache, run_dir: Path, *extra: str) -> dict:
    """A 1-process STRICT run (model options in `extra`), checked step by step against plain autograd +
    SGD outside the trainer (tests/workers/reference.py): gradient norms, and the weights after each step
    from the run's own previous weights, to RTOL. Returns what layouts are compared with."""
    proc = run_pretrain(tiny_overrides(data_cache, run_dir, *STRICT, *extra), launcher="python")
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights, metrics = step_weights(run_dir, 3), [m for m in read_metrics(run_dir) if "train/loss" in m]
    records = read_selections(run_dir)
    # regular: the stream itself, no candidates beyond the k trained on
    assert all(r["candidates"] == r["selected"] and r["gains"] == [] and len(r["selected_domains"]) == 8
               for r in records)
    ids = [r["selected"] for r in records]  # the stream's samples of each step
    saved = []
    for step, state in enumerate(weights[:-1], 1):
        saved.append(run_dir / f"weights_{step}.pt")
        torch.save(state, saved[-1])
    spec = {"steps": [{"weights": None if s == 0 else str(saved[s - 1]), "ids": ids[s], "lr": metrics[s]["train/lr"],
                       "clip": CLIP} for s in range(3)]}
    reference = run_reference(spec, tiny_overrides(data_cache, run_dir / "reference", *STRICT, *extra), run_dir)
    norms = [r["grad_norm"] for r in reference["steps"]]
    result = {"initial": {k: v.float() for k, v in reference["initial"].items()}, "weights": weights,
              "grad_norms": grad_norms(run_dir), "losses": [m["train/loss"] for m in metrics],
              "reference_norms": norms}
    np.testing.assert_allclose(result["grad_norms"], norms, rtol=RTOL)
    previous = [result["initial"], *weights[:-1]]
    for step, (mine, ref, before) in enumerate(zip(weights, reference["steps"], previous), 1):
        ref_weights = {k: v.float() for k, v in ref["weights"].items()}
        gap = relative_gap(mine, ref_weights, {k: ref_weights[k] - before[k] for k in ref_weights})
        assert gap < RTOL, f"1 process: weights after step {step} differ from plain SGD by {gap:.2e} of the update"
    assert np.std(result["losses"]) > 1e-3  # it trains: a layout that skipped updates would show
    return result


@pytest.fixture(scope="module")
def single_process(data_cache, tmp_path_factory):
    """The 1-process gpt2 run, checked against plain autograd + SGD outside the trainer."""
    result = checked_against_plain_sgd(data_cache, tmp_path_factory.mktemp("single"))
    norms = result["reference_norms"]
    assert norms[0] > CLIP > max(norms[1:]), norms  # clipping active in step 1 only
    return result


def test_single_process_step_is_plain_sgd_on_the_mean_gradient(single_process):
    assert len(single_process["weights"]) == 3  # the fixture compared every step with plain autograd + SGD


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_gives_the_same_norms_and_weights(name, single_process, data_cache, tmp_path):
    nproc, layout = LAYOUTS[name]
    proc = run_pretrain(tiny_overrides(data_cache, tmp_path, *STRICT, *layout), nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(train_losses(tmp_path), single_process["losses"], rtol=RTOL, err_msg=name)
    assert_same_steps(tmp_path, single_process, name)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_llama_matches_plain_autograd_and_the_pipeline_matches_it(data_cache, tmp_path, tied):
    """llama (RMSNorm, SwiGLU, RoPE, no biases) in one process against plain autograd + SGD; untied, also
    TP=2 x PP=2 with sequence parallelism against that run."""
    llama = ["model.arch=llama", f"model.tie_embeddings={str(tied).lower()}"]
    single = checked_against_plain_sgd(data_cache, tmp_path / "single", *llama)
    if tied:
        return
    piped = tmp_path / "piped"
    proc = run_pretrain(tiny_overrides(data_cache, piped, *STRICT, *llama, "parallel.tensor=2", "parallel.pipeline=2",
                                       "parallel.sequence_parallel=true"), nproc=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(train_losses(piped), single["losses"], rtol=RTOL)
    assert_same_steps(piped, single, "llama tp2-pp2-sp")


# AdamW with weight decay, clipping active in step 1; adam_eps=1e-3: an element whose gradient is 0 in
# exact arithmetic (e.g. the attention key bias) holds only reduction-order noise, which eps=1e-8 would
# blow up to a full step. weight_decay=0.5: decay moves each weight by lr x 0.5 x itself per step, so a
# bias, norm weight or position row put in the wrong group moves the weights by 1e-4 .. 1e-2 of a step.
ADAMW_DECAY = ["train.optimizer=adamw", "train.lr=0.01", "train.weight_decay=0.5", "train.adam_eps=1e-3",
               "train.grad_clip=0.8", "train.warmup_steps=0", "model.dropout=0.0", "train.steps=3",
               "train.save_interval=1"]


@pytest.mark.parametrize("nproc, layout", [(1, []), (2, ["parallel.pipeline=2", "zero.stage=1"])],
                         ids=["1p", "pp2-zero1"])
def test_adamw_weight_decay_groups_match_torch_adamw(data_cache, tmp_path, nproc, layout):
    """Three AdamW steps with weight decay against tests/workers/reference.py, which builds its own
    parameter groups from Megatron's rule (stated on module types) and runs torch's AdamW from the
    initial weights: the gradient norms, and the weights after every step, to RTOL of the step's update."""
    import yaml

    run_dir = tmp_path / "run"
    proc = run_pretrain(tiny_overrides(data_cache, run_dir, *ADAMW_DECAY, *layout), nproc=nproc,
                        launcher="python" if nproc == 1 else "torchrun")
    assert proc.returncode == 0, proc.stderr[-3000:]
    t = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]
    metrics = [m for m in read_metrics(run_dir) if "train/loss" in m]
    spec = {"adamw": {"ids": [r["selected"] for r in read_selections(run_dir)], "lrs": [m["train/lr"] for m in metrics],
                      "clip": t["grad_clip"], "betas": [t["beta1"], t["beta2"]], "eps": t["adam_eps"],
                      "weight_decay": t["weight_decay"]}}
    reference = run_reference(spec, tiny_overrides(data_cache, tmp_path / "reference", *ADAMW_DECAY), tmp_path)
    adamw = reference["adamw"]
    assert adamw["grad_norms"][0] > t["grad_clip"] > max(adamw["grad_norms"][1:])  # clipping in step 1 only
    assert 0 < len(adamw["decayed"]) < len(reference["initial"])  # both groups are in play
    np.testing.assert_allclose(grad_norms(run_dir), adamw["grad_norms"], rtol=RTOL)
    before = {k: v.float() for k, v in reference["initial"].items()}
    for step, (mine, theirs) in enumerate(zip(step_weights(run_dir, 3), adamw["weights"]), 1):
        theirs = {k: v.float() for k, v in theirs.items()}
        gap = relative_gap(mine, theirs, {k: theirs[k] - before[k] for k in theirs})
        assert gap < RTOL, f"weights after step {step} differ from torch's AdamW by {gap:.2e} of the update"
        before = theirs


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

    # The quickstart's side-by-side table: test loss first, at every evaluation, as metrics.jsonl has it
    # (one column here; which run's values land in which column: tests/test_compare.py).
    from megatron_greats.report import side_by_side
    rows = side_by_side([run_dir]).splitlines()
    evals = [m for m in metrics if "test/loss" in m]
    assert [r.split()[1:5] for r in rows[1:4]] == [["test", "loss", "at", "step"]] * 3  # after the domain
    assert [float(r.split()[-1]) for r in rows[1:4]] == pytest.approx([m["test/loss"] for m in evals], abs=1e-4)
    # a Regular run (the tiny settings' method) is its own clock: at its wall time, its final test loss
    assert rows[4].split()[1:7] == ["test", "loss", "at", "Regular's", "wall", "time"]
    assert float(rows[4].split()[-1]) == pytest.approx(evals[-1]["test/loss"], abs=1e-4)
    assert rows[6].split()[1:3] == ["val", "loss"]
    assert float(rows[6].split()[-1]) == pytest.approx(evals[-1]["val/loss"], abs=1e-4)

    # Resume: roll the run back to its step-4 checkpoint, rerun the same command, get the same steps 5, 6.
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_6")
    (resumed / "checkpoints" / "latest").write_text("step_4")
    # the lines a run killed in step 6 left after its checkpoint, with losses no run computed: the resumed
    # run must drop them and write its own (the copies would otherwise pass for its output)
    lines = read_metrics(resumed)
    for line in lines:
        if line["step"] > 4:
            line["train/loss"] = -1.0
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    proc = run_pretrain([*overrides, f"run_dir={resumed}"], launcher="python")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "this run started at step 4" in proc.stdout
    assert [m["step"] for m in read_metrics(resumed)] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(train_losses(resumed), train_losses(run_dir), rtol=1e-6)
    ours, theirs = (full_weights(d / "checkpoints" / "step_6") for d in (resumed, run_dir))
    before = full_weights(run_dir / "checkpoints" / "step_4")
    assert relative_gap(ours, theirs, {k: theirs[k] - before[k] for k in theirs}) < 1e-6  # steps 5 and 6 alike

    # A run killed before its first checkpoint: the rerun starts afresh, and the killed run's lines (and
    # TensorBoard events) are dropped, not kept beside the new ones.
    early = tmp_path / "killed_early"
    shutil.copytree(run_dir, early)
    shutil.rmtree(early / "checkpoints")
    (early / "metrics.jsonl").write_text("".join(json.dumps({**line, "train/loss": -1.0}) + "\n"
                                                 for line in read_metrics(run_dir) if line["step"] <= 3))
    proc = run_pretrain([*overrides, f"run_dir={early}"], launcher="python")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [m["step"] for m in read_metrics(early)] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(train_losses(early), train_losses(run_dir), rtol=1e-6)
    events = EventAccumulator(str(early / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


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
    bf16 = ["train.precision=bf16", *ADAMW_STRICT]
    proc = run_pretrain(tiny_overrides(data_cache, tmp_path / "z1", *bf16, "zero.stage=1"), launcher="python")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_pretrain(tiny_overrides(data_cache, tmp_path / "pp2", *bf16, "parallel.pipeline=2"), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, piped = train_losses(tmp_path / "z1"), train_losses(tmp_path / "pp2")
    assert np.std(single) > 1e-3
    np.testing.assert_allclose(piped, single, rtol=1e-3)


def test_passes_restore_the_training_mode_when_the_forward_fails(tmp_path):
    """Evaluation and the scoring pass (Gram and forward-only) switch the module to eval mode; an error
    inside must not leave it there (dropout would silently stay off for the rest of training). Plain
    executor, and a real DeepSpeed PipelineEngine, whose eval_batch itself never restores the mode
    (tests/workers/training_mode.py)."""
    import subprocess
    import sys

    from conftest import REPO, TINY_MODEL, child_env

    out = tmp_path / "modes.json"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "workers" / "training_mode.py"), str(out), *TINY_MODEL],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert sorted(result) == sorted(f"{executor}-{case}" for executor in ("plain", "pipeline")
                                    for case in ("evaluate", "scores", "losses"))
    for case, seen in result.items():
        assert seen == {"raised": True, "training": True, "clean": True}, case


def test_init_checkpoint_starts_from_its_weights_with_a_fresh_optimizer(data_cache, tmp_path):
    """Continued pretraining: a Regular base run, then a GREATS run (Adam preconditioner) that starts from
    the base's weights. At a learning rate of 1e-9 its first step leaves them in place, while its own
    initialisation is far from them; the optimizer is new: the selector reports no second moment at its
    step 1."""
    base = tmp_path / "base"
    proc = run_pretrain(tiny_overrides(data_cache, base, "train.steps=2", "train.save_interval=2",
                                       "selection.method=regular"), launcher="python")
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = base / "checkpoints" / "step_2"
    tiny_lr = ["train.steps=1", "train.save_interval=1", "train.lr=1e-9", "train.min_lr=1e-10",
               "train.warmup_steps=0", "selection.method=greats", "selection.candidates=16",
               "selection.preconditioner=adam", "selection.eta=auto"]
    runs = {}
    for name, extra in (("continued", [f"train.init_checkpoint={start}"]), ("fresh", [])):
        proc = run_pretrain(tiny_overrides(data_cache, tmp_path / name, *tiny_lr, *extra), launcher="python")
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = full_weights(tmp_path / name / "checkpoints" / "step_1")
    base_weights = full_weights(start)
    assert relative_gap(runs["continued"], base_weights, base_weights) < 1e-6
    assert relative_gap(runs["fresh"], base_weights, base_weights) > 1e-3
    assert read_selections(tmp_path / "continued")[0]["preconditioner"].startswith("none (step 0")


def test_a_key_the_method_does_not_read_is_noted_at_start(data_cache, tmp_path):
    """The quickstart's Regular run on a config tuned for GREATS: it runs, and says which keys it does not use.
    With Python's warnings shown, as a user sees them: nothing but its own lines (no DeepSpeed or torch noise)."""
    proc = run_pretrain(tiny_overrides(data_cache, tmp_path, "train.steps=1", "selection.preconditioner=adam"),
                        launcher="python", env=user_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    notes = [line for line in proc.stderr.splitlines() if line.startswith("megatron_greats: note:")]
    assert notes == ["megatron_greats: note: selection.preconditioner='adam' is not read by selection.method=regular "
                     "(it applies to greats, first_order, gradnorm); this run does not use it"]
    assert_only_our_output(proc)


def test_a_single_domain_corpus_trains_without_a_target_domain(data_cache, tmp_path):
    """Megatron prefixes of one domain (no domain side files: "default") and a config that sets no
    data.target_domain: that domain is the target, a note says so, and config.yaml records it."""
    config = tmp_path / "no-target.yaml"
    text = (Path(__file__).resolve().parent.parent / "configs" / "tiny-cpu.yaml").read_text()
    config.write_text("".join(line for line in text.splitlines(keepends=True) if "target_domain" not in line))
    run_dir = tmp_path / "run"
    proc = run_pretrain(tiny_overrides(data_cache, run_dir, "train.steps=1", *megatron_copy(data_cache, tmp_path)),
                        launcher="python", config=str(config), env=user_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    notes = [line for line in proc.stderr.splitlines() if line.startswith("megatron_greats: note:")]
    assert notes == ["megatron_greats: note: data.target_domain is not set: the data has one domain, 'default', "
                     "and it is the target"]
    assert "(held-out default)" in proc.stdout
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["target_domain"] == "default"
    assert_only_our_output(proc)


def test_nothing_to_select_and_more_eval_batches_than_a_split_holds_are_noted_at_start(data_cache, tmp_path):
    """N = k (GREATS takes every candidate) and train.eval_batches beyond the held-out splits: the run goes
    on, and says so once each at start; so does the scoring pass's memory estimate."""
    proc = run_pretrain(tiny_overrides(data_cache, tmp_path, "train.steps=1", "selection.method=greats",
                                       "selection.candidates=8", "train.eval_batches=100000"), launcher="python")
    assert proc.returncode == 0, proc.stderr[-3000:]
    notes = [line for line in proc.stderr.splitlines() if line.startswith("megatron_greats: note:")]
    assert len(notes) == 2, proc.stderr[-3000:]
    assert notes[0].startswith("megatron_greats: note: selection.candidates=8 equals k = 8 (selected per step and "
                               "replica): selection.method=greats takes every candidate"), notes
    assert notes[1].startswith("megatron_greats: note: train.eval_batches=100000 is more than a held-out split holds: "
                               "each evaluation uses "), notes
    val, test = (len(samples) for samples in _held_out(data_cache))
    assert f"uses {-(-val // 8)} batches on val ({val} samples) and {-(-test // 8)} batches on test ({test} samples)" \
        in notes[1], notes
    (memory,) = [line for line in proc.stderr.splitlines() if line.startswith("megatron_greats: memory:")]
    assert "estimated peak " in memory and "N + m = 16 samples of 32 tokens at once" in memory, memory
    assert "is available" in memory, memory


def _held_out(data_cache):
    from megatron_greats.data import prepare_data

    data = prepare_data(cache_dir=str(data_cache), seq_len=32, max_docs_per_domain=30, vocab_size=512,
                        show_progress=False)
    return data.val, data.test
