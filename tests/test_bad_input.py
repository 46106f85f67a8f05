"""The bad-input catalogue: each kind of bad config or data ends with one error line that names the
problem and what is allowed, exit status 2 before training starts, and no half-written outputs."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (PRETRAIN, REPO, child_env, error_lines, free_port, megatron_copy, run_pretrain,
                      tiny_overrides)

CONFIG = REPO / "configs" / "tiny-cpu.yaml"
GREATS = ["selection.method=greats", "selection.candidates=16", "selection.val_batch=3"]


def _corrupt_tokenizer(data_cache, tmp):
    bad = tmp / "broken.model"
    bad.write_bytes(b"\x00\x01 not a sentencepiece model")
    return [f"tokenizer.model={bad}"]


def _config_file(text):
    def setup(data_cache, tmp):
        path = tmp / "config.yaml"
        path.write_text(text)
        return ["--config", str(path)]
    return setup


_FINISHED_RUNS = {}  # data_cache -> a finished 1-step run, trained once and copied by each case that needs one


def _finished_run(data_cache, tmp) -> None:
    """A finished 1-step run (1 process, hidden size 32, a checkpoint at step 1) in tmp / "run"."""
    if data_cache not in _FINISHED_RUNS:
        first = tmp / "finished"
        proc = run_pretrain(tiny_overrides(data_cache, first, "train.steps=1", "train.save_interval=1"),
                            launcher="python")
        assert proc.returncode == 0, proc.stderr[-2000:]
        _FINISHED_RUNS[data_cache] = first
    shutil.copytree(_FINISHED_RUNS[data_cache], tmp / "run")


def _checkpoint_of_another_shape(data_cache, tmp):
    """A finished 1-step run at hidden size 32 in run_dir; the bad call asks for 64 there."""
    _finished_run(data_cache, tmp)
    return ["model.hidden_size=64", "train.steps=2"]


def _finished_run_without(name):
    """A finished 1-step run (1 process) in run_dir, with file `name` of its checkpoint deleted (None: none);
    the bad call resumes it for 2 steps."""
    def setup(data_cache, tmp):
        _finished_run(data_cache, tmp)
        if name is not None:
            (tmp / "run" / "checkpoints" / "step_1" / name).unlink()
        return ["train.steps=2"]
    return setup


def _finished_run_with_target_ema(beta: float, saved: float = 0.0):
    """A finished 1-step run in run_dir (Regular, which keeps no target; saved > 0: its step-1 folder holds
    a target file of selection.target_ema=saved, as a GREATS run at that value writes it); the bad call
    resumes it for 2 steps as GREATS with selection.target_ema=beta."""
    def setup(data_cache, tmp):
        import torch

        _finished_run(data_cache, tmp)
        if saved:
            torch.save({"beta": saved, "updates": 1, "vectors": {}},
                       tmp / "run" / "checkpoints" / "step_1" / "target_ema_tp0_pp0.pt")
        return [*GREATS, f"selection.target_ema={beta}", "train.steps=2"]
    return setup


def _reference_of_another_shape(data_cache, tmp):
    """A finished 1-step reference run with 2 layers (outside run_dir); the bad call scores with it at 3."""
    proc = run_pretrain(tiny_overrides(data_cache, tmp / "reference", "train.steps=1"), launcher="python")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return ["selection.method=rholoss", "selection.candidates=16", "model.num_layers=3",
            f"selection.reference_checkpoint={tmp / 'reference' / 'checkpoints' / 'step_1'}"]


def _checkpoint_on_other_data(data_cache, tmp):
    """A finished 1-step run in run_dir; the bad call asks for another selection split (other train data).
    Both use a cache of their own: the bad call must build its data before it can tell."""
    own = f"data.cache_dir={tmp / 'cache'}"
    proc = run_pretrain(tiny_overrides(data_cache, tmp / "run", own, "train.steps=1", "train.save_interval=1"),
                        launcher="python")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [own, "data.selection_fraction=0.2", "train.steps=2"]


# id: (setup(data_cache, tmp) -> extra args, or a list of overrides; words the one error line must hold;
#      processes)
CASES = {
    "unknown key": (["train.learning_rate=0.1"], ["unknown config key 'train.learning_rate'", "did you mean 'lr'"], 1),
    "misspelled key": (["model.hiden_size=64"], ["'model.hiden_size'", "did you mean 'hidden_size'"], 1),
    "wrong type": (["model.num_layers=two"], ["'model.num_layers'", "'two'", "allowed type: int"], 1),
    "value out of range": (["model.dropout=1.5"], ["'model.dropout'", "1.5", "allowed: [0, 1)"], 1),
    "N smaller than k": ([*GREATS, "selection.candidates=3"], ["selection.candidates=3", "allowed: >= 8"], 1),
    "k not divisible into micro-batches": (["train.micro_batch=3"], ["train.global_batch=8 is not divisible"], 1),
    "scoring micro-batch not dividing N + m": ([*GREATS, "selection.score_micro_batch=4"],
                                               ["selection.score_micro_batch=4", "allowed: a divisor of 19"], 1),
    "score_exclude leaving no parameter scored": ([*GREATS, "selection.score_exclude=['*']"],
                                                  ["selection.score_exclude=['*'] excludes every trainable parameter"],
                                                  1),
    "score_exclude pattern matching no parameter": ([*GREATS, "selection.score_exclude=['*word*', '*wrod*']"],
                                                    ["pattern '*wrod*' matches no parameter",
                                                     "closest parameter names: 'layers.0.word.weight'"], 1),
    "score window longer than the sequence": ([*GREATS, "selection.score_window=33"],
                                              ["selection.score_window=33 is longer than model.seq_len=32",
                                               "allowed: 1..32"], 1),
    # checked before the layout meets the world size: one process is enough to reach it
    "score window not divisible under sequence parallel": ([*GREATS, "parallel.tensor=2",
                                                            "parallel.sequence_parallel=true",
                                                            "selection.score_window=15"],
                                                           ["selection.score_window=15 is not divisible by "
                                                            "parallel.tensor=2", "allowed: a multiple of 2"], 1),
    "score_layers beyond the model's layers": ([*GREATS, "selection.score_layers=3"],
                                               ["selection.score_layers=3 exceeds model.num_layers=2",
                                                "allowed: 1..2"], 1),
    "prefilter keeping fewer than k": ([*GREATS, "selection.prefilter=7"],
                                       ["selection.prefilter=7 with k = 8 selected of N = 16 candidates",
                                        "allowed: 8..15"], 1),
    "prefilter keeping every candidate": ([*GREATS, "selection.prefilter=16"],
                                          ["selection.prefilter=16 with k = 8 selected of N = 16 candidates",
                                           "allowed: 8..15"], 1),
    "target EMA out of range": ([*GREATS, "selection.target_ema=1"],
                                ["'selection.target_ema' has value 1", "allowed: [0, 1)"], 1),
    "val_batch beyond the selection split": ([*GREATS, "selection.val_batch=5000"],
                                             ["selection.val_batch=5000 is more than the selection split holds",
                                              "allowed: <= "], 1),
    "candidates beyond the train split": ([*GREATS, "selection.candidates=100000"],
                                          ["selection.candidates=100000", "more than the train split holds"], 1),
    # a vocabulary padded to 2^20: N + m = 5960 samples' logits alone are far more than any machine has
    "scoring pass beyond the memory available": ([*GREATS, "model.vocab_pad_multiple=1048576",
                                                  "selection.candidates=5800", "selection.val_batch=160"],
                                                 ["the scoring pass would not fit in memory: estimated",
                                                  "N + m = 5960 samples of 32 tokens", "is available; allowed: ",
                                                  "selection.score_micro_batch", "selection.val_batch",
                                                  "selection.candidates"], 1),
    # phase gating: the early method's pass is the larger one here (maxloss's is a forward only)
    "scoring pass of the early method beyond the memory available": (
        [*GREATS, "selection.method=maxloss", "selection.early_method=greats", "selection.early_steps=1",
         "model.vocab_pad_multiple=1048576", "selection.candidates=5800", "selection.val_batch=160"],
        ["the scoring pass would not fit in memory: estimated", "the scoring pass of selection.early_method=greats",
         "N + m = 5960 samples of 32 tokens"], 1),
    "early method unknown": (["selection.early_method=maxlos", "selection.early_steps=1"],
                             ["'selection.early_method'", "'maxlos'", "allowed: greats, first_order", "or null"], 1),
    "early steps without an early method": (["selection.early_steps=2"],
                                            ["selection.early_steps=2 without selection.early_method",
                                             "allowed: selection.early_method set to one of greats"], 1),
    "early method equal to the method": ([*GREATS, "selection.early_method=greats", "selection.early_steps=2"],
                                         ["selection.early_method=greats is selection.method itself",
                                          "allowed: another method"], 1),
    "early steps leaving the method no step": ([*GREATS, "selection.early_method=maxloss", "selection.early_steps=5"],
                                               ["selection.early_steps=5 with train.steps=5",
                                                "allowed: selection.early_steps < 5"], 1),
    "early rholoss without a reference": ([*GREATS, "selection.early_method=rholoss", "selection.early_steps=2"],
                                          ["selection.early_method=rholoss needs selection.reference_checkpoint"], 1),
    "init checkpoint missing": (lambda d, t: [f"train.init_checkpoint={t / 'no_step'}"],
                                ["train.init_checkpoint", "no_step", "is not a folder"], 1),
    "rholoss without a reference": (["selection.method=rholoss", "selection.candidates=16"],
                                    ["selection.reference_checkpoint"], 1),
    "pipeline with ZeRO-2": (["parallel.pipeline=2", "zero.stage=2"], ["allowed with pipeline parallelism: 0 or 1"], 1),
    "layout not dividing the world size": (["parallel.tensor=2"], ["world size 3 is not divisible"], 3),
    "config file missing": (lambda d, t: ["--config", str(t / "nope.yaml")], ["nope.yaml", "does not exist"], 1),
    "config file not YAML": (_config_file("model: [unclosed\n"), ["is not valid YAML"], 1),
    "run_dir not writable": (lambda d, t: [f"run_dir={CONFIG}/run"], ["run_dir", "not writable"], 1),
    "data path missing": (lambda d, t: ["data.source=files", f"data.files=[{t / 'no_such.jsonl'}]",
                                        "data.target_domain=default"], ["no_such.jsonl"], 1),
    "target domain absent from the data": (["data.target_domain=klingon"], ["'klingon'", "domains present"], 1),
    "target domain absent from megatron prefixes of several domains": (
        lambda d, t: [*megatron_copy(d, t, domains=True), "data.target_domain=klingon"],
        ["target domain 'klingon' is not a domain of the val data", "domains present: bible, python_docs, shakespeare"],
        1),
    "megatron prefixes of several domains, no target domain": (
        lambda d, t: [*megatron_copy(d, t, domains=True), "data.target_domain=null"],
        ["data.target_domain is not set and the data has 3 domains (bible, python_docs, shakespeare); allowed: "
         "data.target_domain set to one of them"], 1),
    "empty held-out splits": (lambda d, t: [f"data.cache_dir={t / 'cache'}", "data.max_docs_per_domain=1"],
                              ["val/test/selection would be empty"], 1),
    "held-out fractions summing to 1": (["data.val_fraction=0.3", "data.selection_fraction=0.6"],
                                        ["data.val_fraction + data.test_fraction + data.selection_fraction = "
                                         "0.3 + 0.1 + 0.6 = 1", "allowed: fractions whose sum is < 1"], 1),
    "megatron prefixes without selection": (lambda d, t: megatron_copy(d, t, None),
                                            ["data.megatron_prefixes", "missing: selection",
                                             "allowed: exactly the keys train, val, test, selection"], 1),
    "tokenizer file missing": (lambda d, t: [f"tokenizer.model={t / 'missing.model'}"],
                               ["missing.model", "does not exist"], 1),
    "tokenizer file corrupt": (_corrupt_tokenizer, ["broken.model", "not a readable sentencepiece model"], 1),
    ".idx cut short": (lambda d, t: megatron_copy(d, t, ".idx"), ["train.idx"], 1),
    ".bin not matching its .idx": (lambda d, t: megatron_copy(d, t, ".bin"), ["train.bin", "bytes but index"], 1),
    "seq_len longer than the data": (["model.seq_len=60000"], ["seq_len 60000 is too long"], 1),
    "vocabulary too large for the text": (["tokenizer.vocab_size=60000"], ["60000"], 1),
    "checkpoint of another model shape": (_checkpoint_of_another_shape, ["another model shape", "hidden_size"], 1),
    "checkpoint trained on other data": (_checkpoint_on_other_data, ["was trained on other data", "indexed-"], 1),
    "rholoss reference of another model shape": (_reference_of_another_shape,
                                                 ["selection.reference_checkpoint", "model.num_layers=2",
                                                  "this run has model.num_layers=3", "any parallel.pipeline"], 1),
    "target EMA resumed from a run without one": (_finished_run_with_target_ema(0.9),
                                                  ["step_1'", "has no target_ema_tp0_pp0.pt",
                                                   "saved by a run with selection.target_ema=0",
                                                   "allowed: selection.target_ema=0 to resume it"], 1),
    "target EMA resumed from a run with another one": (_finished_run_with_target_ema(0.5, saved=0.9),
                                                       ["step_1'", "holds the target of selection.target_ema=0.9",
                                                        "this run has selection.target_ema=0.5",
                                                        "allowed: the same value"], 1),
    "checkpoint without shape.json": (_finished_run_without("shape.json"), ["step_1'", "has no shape.json"], 1),
    "checkpoint without a rank's state": (_finished_run_without("rank_state_0.pt"),
                                          ["step_1'", "has no rank_state_0.pt"], 1),
    "checkpoint of another world size": (_finished_run_without(None),
                                         ["step_1'", "rank states of 1 rank (rank_state_0.pt)", "this run has 2",
                                          "allowed: resuming with 1 process"], 2),
}

# Refused by the config's own checks (before launch/pretrain.py makes the run folder): no run folder at all.
BEFORE_THE_RUN_FOLDER = {"score window longer than the sequence", "score window not divisible under sequence parallel",
                         "score_layers beyond the model's layers", "prefilter keeping fewer than k",
                         "prefilter keeping every candidate", "target EMA out of range", "early method unknown",
                         "early steps without an early method", "early method equal to the method",
                         "early steps leaving the method no step", "early rholoss without a reference"}


def _snapshot(folder: Path) -> dict:
    """Every file under folder with its content's digest (config.yaml included)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _deepspeed_launch(args: list, nproc: int) -> subprocess.CompletedProcess:
    """nproc ranks under the deepspeed launcher, which exits with its ranks' status (torchrun always
    exits 1 when a rank fails, whatever the rank's own status)."""
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", str(nproc), "--master_port", str(free_port()), str(PRETRAIN), *args]
    env = child_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_catalogue(case, data_cache, tmp_path):
    setup, needles, nproc = CASES[case]
    extra = setup(data_cache, tmp_path) if callable(setup) else list(setup)
    run_dir = tmp_path / "run"
    config = ["--config", str(CONFIG)]
    if extra[:1] == ["--config"]:
        config, extra = extra[:2], extra[2:]
    cache_before, run_before = _snapshot(data_cache), _snapshot(run_dir) if run_dir.exists() else {}
    args = [*config, *tiny_overrides(data_cache, run_dir, *extra)]
    if nproc == 1:
        proc = subprocess.run([sys.executable, str(PRETRAIN), *args], cwd=REPO, env=child_env(), capture_output=True,
                              text=True, timeout=300)
    else:
        proc = _deepspeed_launch(args, nproc)
    lines = error_lines(proc)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(set(lines)) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert any(w in lines[0] for w in ("allowed", "did you mean", "domains present")), lines[0]  # what is allowed
    # no traceback of ours (a launcher may print its own when a rank exits non-zero)
    assert "megatron_greats/" not in proc.stderr and 'pretrain.py", line' not in proc.stderr
    # nothing half-written: the shared data cache and an earlier run's files (config.yaml too) are as they were
    assert _snapshot(data_cache) == cache_before
    after = _snapshot(run_dir) if run_dir.exists() else {}
    assert after == run_before
    if case in BEFORE_THE_RUN_FOLDER:  # refused by the config's checks: not even the run folder is made
        assert not run_dir.exists(), case
    leftovers = [p for p in tmp_path.rglob("*.tmp")]
    assert not leftovers, leftovers


def test_bad_gram_form_variable_stops_the_launch(data_cache, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(PRETRAIN), "--config", str(CONFIG),
                           *tiny_overrides(data_cache, run_dir)], cwd=REPO,
                          env=child_env(MEGATRON_GREATS_GRAM_FORM="fastest"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert error_lines(proc) == ["megatron_greats: error: MEGATRON_GREATS_GRAM_FORM='fastest'; "
                                 "allowed: timed, whole, split"]
    assert not run_dir.exists()


def test_a_parameter_no_capture_rule_covers_stops_the_launch(data_cache, tmp_path):
    """A user's layer that no capture rule covers (tests/workers/pretrain_with_a_user_module.py adds a
    learned scale to the model): the single-pass update could not form its gradient, so GREATS refuses
    with one line that names it and what is allowed, exit status 2, and writes nothing. (Under two_pass
    the Gram would leave it out of every score: the same refusal, tests/test_ghost.py.)"""
    run_dir = tmp_path / "run"
    cache_before = _snapshot(data_cache)
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "workers" / "pretrain_with_a_user_module.py"),
                           "--config", str(CONFIG),
                           *tiny_overrides(data_cache, run_dir, *GREATS, "selection.update=single_pass")],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = set(error_lines(proc))
    assert "parameter 'layers.2.gain.scale' is in no supported layer" in line, line
    assert "allowed: " in line and "selection.update=two_pass" in line, line
    assert "megatron_greats/" not in proc.stderr  # no traceback of ours
    assert _snapshot(data_cache) == cache_before
    assert not (run_dir.exists() and _snapshot(run_dir)), _snapshot(run_dir)


def test_split_sizes_refuse_what_one_step_cannot_draw_and_note_what_evaluation_uses():
    """In-process, on split sizes alone (trainer.split_size_notes): a step's validation samples or
    candidates beyond their split are refused (they would repeat within the step), for the methods that
    draw them; evaluation beyond a held-out split is noted with the batches it uses."""
    from types import SimpleNamespace

    from megatron_greats.config import load_config
    from megatron_greats.errors import ConfigError
    from megatron_greats.training.trainer import split_size_notes

    data = SimpleNamespace(train=range(100), val=range(20), test=range(9), selection=range(10))

    def notes(*overrides, world_size=1):
        return split_size_notes(load_config(None, ["train.global_batch=8", "train.micro_batch=4", "train.eval_batches=2",
                                                   *overrides]),
                                data, world_size)

    assert notes("selection.val_batch=10", "selection.candidates=100") == []
    with pytest.raises(ConfigError, match=r"selection.val_batch=11 is more than the selection split holds "
                                          r"\(10 samples\).*allowed: <= 10"):
        notes("selection.val_batch=11")
    assert notes("selection.val_batch=11", "selection.method=maxloss") == []  # draws no validation samples
    with pytest.raises(ConfigError, match=r"selection.candidates=101 asks each step for 101 candidates, more than "
                                          r"the train split holds \(100 samples\).*allowed: <= 100"):
        notes("selection.candidates=101")
    with pytest.raises(ConfigError, match=r"asks each step for 60 x data-parallel size 2 = 120 .*allowed: <= 50"):
        notes("selection.candidates=60", world_size=2)
    assert notes("selection.candidates=101", "selection.method=regular") == []  # Regular draws k
    (note,) = notes("train.eval_batches=3")
    assert note == ("train.eval_batches=3 is more than a held-out split holds: each evaluation uses 3 batches on val "
                    "(20 samples) and 2 batches on test (9 samples), of train.global_batch=8 samples each")
