"""bench proxy (megatron_greats/bench/proxy.py): a finished run's picks replayed at its checkpoints, their
gains on the step's validation samples, the selection split and val, against a per-sample reference
(tests/workers/reference.py: one backward per sample, torch's cross entropy, no DeepSpeed) and against
the selector's own logged alignment terms."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, child_env, read_selections, run_pretrain, run_reference, tiny_overrides
from full_weights import full_weights

# plain GREATS (TINY_TRAIN: no preconditioner) scoring a window of 8 tokens on the top layer, a checkpoint
# every 2 steps: step_2, step_4 and step_5 (the last), selections logged at steps 1..5
RUN = ("selection.method=greats", "selection.update=two_pass", "selection.score_window=8", "selection.score_layers=1",
       "selection.eta=auto", "train.save_interval=2")
SAMPLES = 6  # --sel-samples and --val-samples


def _probe(*args):
    return subprocess.run([sys.executable, "-m", "megatron_greats.bench", "proxy", *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=300)


def _close(a, b, scale):
    return abs(a - b) <= 1e-4 * scale + 1e-12


def test_probe_gains_match_a_per_sample_reference_and_the_logged_selection(data_cache, tmp_path):
    run = tmp_path / "run"
    overrides = tiny_overrides(data_cache, run, *RUN)
    proc = run_pretrain(overrides, launcher="python")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "probe" / "proxy.json"
    proc = _probe("--run", str(run), "--sel-samples", str(SAMPLES), "--val-samples", str(SAMPLES), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    # step_5 is the last checkpoint: no selection follows it
    assert report["measured_steps"] == [2, 4] and [s["selection_step"] for s in report["steps"]] == [3, 5]
    assert report["views"] == ["all", "scored", "all+adam", "scored+adam", "window"]
    assert report["S_samples"] == SAMPLES and report["V_samples"] == SAMPLES
    assert (tmp_path / "probe" / "proxy.md").read_text() in proc.stdout
    logged = {r["step"]: r for r in read_selections(run)}
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    beta2, eps, num_layers = cfg["train"]["beta2"], cfg["train"]["adam_eps"], cfg["model"]["num_layers"]

    spec = {"gradients": []}
    for entry in report["steps"]:
        s, record = entry["step"], logged[entry["step"] + 1]
        assert entry["k"] == len(record["selected"]) and entry["N"] == len(record["candidates"])
        control, target_control = entry["random_control"], entry["random_target_control"]
        assert len(set(control)) == entry["k"] and set(control) <= set(record["candidates"])
        assert len(set(target_control)) == entry["target_selected"] <= entry["target_candidates"]
        assert set(target_control) <= set(record["candidates"])
        weights = tmp_path / f"weights_{s}.pt"
        torch.save(full_weights(run / "checkpoints" / f"step_{s}"), weights)
        window = record["score_window"]
        groups = {"P": ["train", record["selected"], None], "R": ["train", control, None],
                  "C": ["train", record["candidates"], None], "V_step": ["selection", record["validation"], None],
                  "S": ["selection", list(range(SAMPLES)), None], "V": ["val", list(range(SAMPLES)), None],
                  "wP": ["train", record["selected"], window], "wR": ["train", control, window],
                  "wV_step": ["selection", record["validation"], window], "wV": ["val", list(range(SAMPLES)), window],
                  **({"R_tgt": ["train", target_control, None]} if target_control else {})}
        spec["gradients"].append({"weights": str(weights), "groups": groups})
    reference = run_reference(spec, overrides, tmp_path / "reference")

    for entry, ref in zip(report["steps"], reference["gradients"]):
        s, record = entry["step"], logged[entry["step"] + 1]
        names, sizes = ref["names"], ref["sizes"]
        owner = np.repeat(np.arange(len(names)), sizes)
        # the scored parameters, stated here by layer index: the top transformer layer (index num_layers + 1 of
        # [embedding, positions, blocks..., final norm]) and the final norm; the tied embedding is below them
        top = [i for i, n in enumerate(names) if int(n.split(".")[1]) >= num_layers + 1]
        scored = torch.from_numpy(np.isin(owner, top))
        # Adam's D of the coming step from the checkpoint's AdamW state (its order: decayed names, then the rest)
        saved = torch.load(run / "checkpoints" / f"step_{s}" / "mp_rank_00_model_states.pt", map_location="cpu",
                           weights_only=False)["optimizer"]["state"]
        position = {n: i for i, n in enumerate(ref["optimizer_order"])}
        v = torch.cat([saved[position[n]]["exp_avg_sq"].reshape(-1).double() for n in names])
        t = max(int(x["step"]) for x in saved.values())
        d = 1.0 / (((beta2 * v + (1 - beta2) * ref["C"] ** 2) / (1 - beta2 ** (t + 1))).sqrt() + eps)
        for view, mask, diag in (("all", None, None), ("scored", scored, None), ("all+adam", None, d),
                                 ("scored+adam", scored, d)):
            got = entry["views"][view]

            def vec(name):
                x = ref[name] * (diag if diag is not None and name in ("P", "R", "C", "R_tgt") else 1.0)
                return x if mask is None else x[mask]
            for y in ("P", "R", "C", *(("R_tgt",) if "R_tgt" in ref else ())):
                for x in ("V_step", "S", "V"):
                    a, b = vec(y), vec(x)
                    scale = float(a.norm() * b.norm())
                    assert _close(got["gain"][y][x], float(a @ b), scale), (s, view, y, x, got["gain"][y][x])
                    assert got["cos"][y][x] == pytest.approx(float(a @ b) / scale, abs=1e-4), (s, view, y, x)
                assert got["norm"][y] == pytest.approx(float(vec(y).norm()), rel=1e-4)
            for x in ("V_step", "S", "V"):
                assert got["lift"][x] == pytest.approx(got["cos"]["P"][x] - got["cos"]["R"][x], abs=1e-12)
                assert got["ratio_P_R"][x] == pytest.approx(got["gain"]["P"][x] / got["gain"]["R"][x], rel=1e-9)
                if got["cos"]["P_tgt"] is not None:
                    assert got["lift_tgt"][x] == pytest.approx(got["cos"]["P_tgt"][x] - got["cos"]["R_tgt"][x],
                                                               abs=1e-12)
        # the selector's own view: its window, its parameters, no preconditioner (TINY_TRAIN)
        window = entry["views"]["window"]
        for y, x in (("P", "V_step"), ("R", "V_step"), ("P", "V")):
            a, b = ref[f"w{y}"][scored], ref[f"w{x}"][scored]
            assert _close(window["gain"][y][x], float(a @ b), float(a.norm() * b.norm())), (s, y, x)
        # ... where the gain of the picks is what the selector logged for step s + 1: its alignment terms are
        # eta <g_j, mean validation gradient> per pick (checkpoint step_s is the weights that selection used)
        k, eta = len(record["selected"]), record["eta"]
        from_log = sum(record["alignment_terms"]) / (eta * k)
        assert from_log == pytest.approx(window["gain"]["P"]["V_step"], rel=1e-3), (s, from_log, window["gain"])


def _fake_run(folder, steps=(2,), selections=(3,), validation=True, checkpoints=True, selection_file=True):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("seed: 1\n")
    for step in steps if checkpoints else ():
        (folder / "checkpoints" / f"step_{step}").mkdir(parents=True)
        (folder / "checkpoints" / f"step_{step}" / "shape.json").write_text("{}\n")
    if selection_file:
        (folder / "selection.jsonl").write_text("".join(
            json.dumps({"step": s, "replica": 0, "candidates": [0, 1], "selected": [0],
                        "validation": [0] if validation else None}) + "\n" for s in selections))
    return folder


def test_probe_refuses_what_it_cannot_measure_with_one_line_before_heavy_work(tmp_path):
    out = tmp_path / "out.json"
    cases = (
        (_fake_run(tmp_path / "a", checkpoints=False), (), "has no checkpoints"),
        (_fake_run(tmp_path / "b", selection_file=False), (), "has no selection.jsonl"),
        (_fake_run(tmp_path / "c", steps=(2, 4), selections=(3, 5)), ("--steps", "3"),
         "--steps 3: '{run}' has no checkpoint step_3; allowed: checkpoint steps with a logged selection after "
         "them: 2, 4"),
        (_fake_run(tmp_path / "d", steps=(2, 4), selections=(3,)), ("--steps", "4"),
         "logged no selection at step 5 (made from step_4's weights); allowed: 2"),
        (_fake_run(tmp_path / "e", validation=False), (), "logged no validation samples"),
        (_fake_run(tmp_path / "f", steps=(5,), selections=(3,)), (), "no checkpoint to measure"),
        (tmp_path / "missing", (), "is not a folder"),
    )
    for run, args, expected in cases:
        proc = _probe("--run", str(run), "--out", str(out), *args)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("megatron_greats: error:")]
        assert proc.returncode == 2 and len(errors) == 1, (run, proc.stderr[-2000:])
        assert expected.format(run=run) in errors[0], (expected, errors[0])
        assert not out.exists() and "proxy:" not in proc.stderr  # nothing measured, nothing written
