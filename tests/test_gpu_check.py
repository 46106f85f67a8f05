"""launch/gpu_check.sh where there is no GPU, its offline set-up (--wheels, launch/setup_env.sh with
MEGATRON_GREATS_WHEELS) and its summary builder (launch/gpu_check_summary.py).

Without an NVIDIA GPU the script must stop before installing or writing anything: exit status 2 and
exactly one stderr line naming the cause. The offline set-up is run for real on this machine's Python
up to torch's own GPU check. The summary builder is checked on committed CPU results standing in for
a GPU run's outputs, so that its table is known to work before a GPU is lent.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, child_env

SCRIPT = REPO / "launch" / "gpu_check.sh"
RESULTS = REPO / "docs" / "results"


def run_script(*args: str, env: dict | None = None) -> tuple:
    start = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env or child_env(),
                          capture_output=True, text=True, timeout=60)
    return proc, time.monotonic() - start


def gpu_check_folders() -> set:
    return set((REPO / "runs").glob("gpu-check-*")) if (REPO / "runs").exists() else set()


def test_the_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="nvidia-smi is here: the real path runs")
def test_without_nvidia_smi_it_stops_at_once_with_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    before = gpu_check_folders()
    for args in (["--out", str(out)], []):  # and the default folder, runs/gpu-check-<date>
        proc, seconds = run_script(*args)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.splitlines() == [
            "gpu_check: no CUDA GPU found (nvidia-smi not found); run it on a machine with an NVIDIA GPU"]
        assert proc.stdout == ""
        assert seconds < 10  # nothing installed or imported on the way
    assert not out.exists()
    assert gpu_check_folders() == before


def test_an_nvidia_smi_that_lists_no_gpu_is_no_gpu(tmp_path):
    """A driver tool that is there but fails (no device, driver not loaded): the same one line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the driver' >&2\n"
                    "exit 9\n")
    fake.chmod(0o755)
    env = child_env()
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    out = tmp_path / "out"
    proc, _ = run_script("--out", str(out), env=env)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "gpu_check: no CUDA GPU found (nvidia-smi lists no GPU); run it on a machine with an NVIDIA GPU"]
    assert proc.stdout == "" and not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--minutes", "0"], "--minutes must be a positive number, got '0'"),
    (["--minutes=soon"], "--minutes must be a positive number, got 'soon'"),
    (["--out"], "option --out needs a value"),
    (["--gpus", "2"], "unknown option '--gpus'; allowed: --out DIR, --minutes M, --wheels DIR"),
    (["--wheels", "/nonexistent/wheels"],
     "--wheels '/nonexistent/wheels' is no folder of .whl files; make one with launch/gpu_wheels.sh"),
])
def test_a_bad_option_is_one_line_before_the_gpu_probe(tmp_path, args, message):
    proc, _ = run_script(*args)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"gpu_check: {message}"]


WHEELS_SCRIPT = REPO / "launch" / "gpu_wheels.sh"


@pytest.mark.parametrize("args, message", [
    ([], "no folder given; usage: bash launch/gpu_wheels.sh DIR [--python-version V] [--have FILE]"),
    (["w", "--python-version", "312"], "--python-version must be major.minor (e.g. 3.12), got '312'"),
    (["w", "--have", "/nonexistent/have.txt"], "--have file '/nonexistent/have.txt' cannot be read"),
    (["w", "v"], "one folder only, got 'w' and 'v'"),
    (["w", "--platform", "x"], "unknown option '--platform'; allowed: DIR, --python-version V, --have FILE"),
])
def test_gpu_wheels_refuses_bad_arguments_in_one_line_before_any_work(tmp_path, args, message):
    """(Making a wheelhouse needs the package index, so it is checked by hand: docs/cluster.md.)"""
    proc = subprocess.run(["bash", str(WHEELS_SCRIPT), *args], cwd=tmp_path, env=child_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"gpu_wheels: {message}"]
    assert not (tmp_path / "w").exists()


@pytest.fixture(scope="module")
def probe_wheels(tmp_path_factory) -> Path:
    """A folder holding a real wheel of a one-module package, built by pip (a wheelhouse's smallest
    member); read-only for the tests."""
    tmp = tmp_path_factory.mktemp("probe")
    folder, source = tmp / "wheels", tmp / "probe-source"
    (source / "wheel_probe").mkdir(parents=True)
    (source / "wheel_probe" / "__init__.py").write_text("VALUE = 42\n")
    (source / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools>=68"]\n'
                                           'build-backend = "setuptools.build_meta"\n'
                                           '[project]\nname = "wheel_probe"\nversion = "1.0"\n')
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "-w", str(folder), str(source)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert len(list(folder.glob("wheel_probe-1.0-*.whl"))) == 1
    return folder


def source_setup_env(env: dict, command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"source launch/setup_env.sh && {command}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_offline_setup_installs_the_wheels_over_the_pythons_own_packages_and_keeps_them(tmp_path, probe_wheels):
    """MEGATRON_GREATS_WHEELS: the folder's wheels land in MEGATRON_GREATS_VENV/site, on PYTHONPATH
    before PYTHON's own packages (whose torch stays); `python` there is PYTHON itself; nothing is
    fetched (PIP_NO_INDEX); a second set-up with the same wheels installs nothing."""
    wheels = probe_wheels
    prefix = tmp_path / "prefix"
    env = child_env(MEGATRON_GREATS_WHEELS=str(wheels), MEGATRON_GREATS_VENV=str(prefix), PYTHON=sys.executable,
                    PIP_NO_INDEX="1")
    show = "python -c 'import sys, torch, wheel_probe; print(sys.executable, wheel_probe.VALUE, wheel_probe.__file__)'"
    first = source_setup_env(env, show)
    assert first.returncode == 0, first.stderr
    assert "[setup] installing the wheels of" in first.stdout
    executable, value, location = first.stdout.splitlines()[-1].split()
    assert executable == sys.executable and value == "42"
    assert Path(location).is_relative_to(prefix / "site")
    again = source_setup_env(env, show)
    assert again.returncode == 0 and "[setup] installing" not in again.stdout
    assert again.stdout.splitlines()[-1] == first.stdout.splitlines()[-1]


def test_offline_setup_refuses_a_folder_without_wheels_in_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = child_env(MEGATRON_GREATS_WHEELS=str(empty), MEGATRON_GREATS_VENV=str(tmp_path / "prefix"))
    proc = source_setup_env(env, "true")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"[setup] error: MEGATRON_GREATS_WHEELS='{empty}' is no folder of .whl "
                                        "files; make one with launch/gpu_wheels.sh"]
    assert not (tmp_path / "prefix").exists()


def test_offline_setup_never_rewrites_a_virtual_environment(tmp_path, probe_wheels):
    wheels = probe_wheels
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (venv / "bin" / "python").write_text("kept")
    proc = source_setup_env(child_env(MEGATRON_GREATS_WHEELS=str(wheels), MEGATRON_GREATS_VENV=str(venv)), "true")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"[setup] error: MEGATRON_GREATS_VENV='{venv}' is a virtual environment; with "
                                        "MEGATRON_GREATS_WHEELS name a folder of its own (default .venv-wheels)"]
    assert (venv / "bin" / "python").read_text() == "kept"


def test_with_wheels_and_a_gpu_listed_but_no_cuda_torch_it_sets_up_offline_then_stops_in_one_line(tmp_path, probe_wheels):
    """The whole --wheels path up to torch's own GPU check: an nvidia-smi that lists a GPU (this
    machine has none), the offline set-up for real, then torch.cuda.is_available() False: exit 2 and
    one line, torch.json and the env step's log kept."""
    wheels = probe_wheels
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559 MiB'\n")
    fake.chmod(0o755)
    out, prefix = tmp_path / "out", tmp_path / "prefix"
    env = child_env(MEGATRON_GREATS_VENV=str(prefix), PYTHON=sys.executable, PIP_NO_INDEX="1")
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    proc = subprocess.run(["bash", str(SCRIPT), "--out", str(out), "--wheels", str(wheels)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [
        f"gpu_check: no CUDA GPU found (torch.cuda.is_available() is False; see {out}/logs/env.log); "
        "run it on a machine with an NVIDIA GPU"]
    torch_info = json.loads((out / "torch.json").read_text())
    assert torch_info["cuda_available"] is False and torch_info["executable"] == sys.executable
    assert f"wheels={wheels}" in (out / "machine.txt").read_text().splitlines()
    assert "[setup] installing the wheels of" in (out / "logs" / "env.log").read_text()
    assert (prefix / "site" / "wheel_probe" / "__init__.py").exists()


def load_summary():
    spec = importlib.util.spec_from_file_location("gpu_check_summary", REPO / "launch" / "gpu_check_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_check_folder(out: Path) -> None:
    """A gpu_check.sh folder whose steps' outputs are committed CPU results: a GREATS and a Regular run
    of a screen, the cheap-scoring bench step, bench ghost; a junit.xml with one failure; one step
    failed without outputs, one not run, one skipped for time."""
    (out / "logs").mkdir(parents=True)
    (out / "nvidia-smi.csv").write_text("name, memory.total [MiB]\nNVIDIA H100 80GB HBM3, 81559 MiB\n")
    (out / "machine.txt").write_text("driver=550.54\ncommit=abc123\nstarted=2030-01-01T00:00:00Z\nminutes=8\n")
    (out / "torch.json").write_text(json.dumps({
        "torch": "2.13.0+cu128", "cuda": "12.8", "nccl": "2.27.3", "cuda_available": True, "device_count": 1,
        "devices": ["NVIDIA H100 80GB HBM3"], "deepspeed": "0.19.8", "megatron_core": "0.16.1"}))
    (out / "tests").mkdir()
    (out / "tests" / "junit.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="3" failures="1" errors="0" skipped="0">'
        '<testcase classname="tests.test_ghost" name="test_mlp_with_biases[ghost-dtype0]"/>'
        '<testcase classname="tests.test_ghost" name="test_bf16_transformer_gram_matches_a_float64_copy[0-ghost]">'
        '<failure message="assert">x</failure></testcase>'
        '<testcase classname="tests.test_selection_training" name="test_single_pass_equals_two_pass"/>'
        '</testsuite></testsuites>')
    raw = RESULTS / "screen-cheap-crawl" / "raw"
    for name, source in (("greats", "greats-w16t1"), ("regular", "regular")):
        shutil.copytree(raw / source / "seed1234", out / "quickstart-bf16" / name)
    (out / "bench-step-fp32").mkdir()
    shutil.copy(RESULTS / "cheap-scoring" / "bench-step" / "bench_step.json", out / "bench-step-fp32")
    (out / "bench-ghost").mkdir()
    shutil.copy(RESULTS / "bench_ghost.json", out / "bench-ghost")
    rows = [("env", "ok", "0", "95.2", ""), ("tests", "failed", "1", "130.0", ""),
            ("quickstart-bf16", "ok", "0", "80.5", ""), ("bench-step-bf16", "failed", "1", "12.0", ""),
            ("bench-step-fp32", "ok", "0", "60.0", ""), ("bench-ghost", "ok", "0", "90.0", ""),
            ("dp2-bf16", "not run", "", "0", "1 GPU"), ("tp2-bf16", "skipped", "", "0", "out of time (--minutes 8)")]
    (out / "steps.tsv").write_text("step\tstatus\texit\tseconds\tnote\n" + "".join("\t".join(r) + "\n" for r in rows))


def test_the_summary_reads_each_steps_outputs_into_one_table(tmp_path):
    from megatron_greats.report import read_run, test_within

    out = tmp_path / "check"
    fake_check_folder(out)
    summary = load_summary()
    assert summary.main([str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    steps = {s["step"]: s for s in results["steps"]}
    assert list(steps) == ["env", "tests", "quickstart-bf16", "bench-step-bf16", "bench-step-fp32", "bench-ghost",
                           "dp2-bf16", "tp2-bf16"]
    assert results["passed"] is False  # a failure and a skip
    assert results["machine"]["gpus"] == ["NVIDIA H100 80GB HBM3, 81559 MiB"]
    assert steps["tests"]["data"]["failed"] == 1 and steps["tests"]["result"].startswith("2 passed, 1 failed")
    assert "test_bf16_transformer_gram_matches_a_float64_copy[0-ghost]" in steps["tests"]["result"]
    # the pair's numbers are megatron_greats.report's reading of the same runs
    pair = steps["quickstart-bf16"]["data"]
    greats, regular = read_run(out / "quickstart-bf16" / "greats"), read_run(out / "quickstart-bf16" / "regular")
    assert pair["step"] == 600 and pair["test_loss_at_step"]["regular"] == regular["test"][-1]
    assert pair["greats_test_loss_at_regular_wall_time"] == test_within(greats, regular["eval_seconds"][-1])
    assert pair["trained_tokens_per_s"]["greats"] > 0
    committed = json.loads((RESULTS / "cheap-scoring" / "bench-step" / "bench_step.json").read_text())["ratios"]
    assert steps["bench-step-fp32"]["data"]["ratios"]["single_over_regular_k_time"] == \
        committed["single_over_regular_k_time"]
    assert "single_pass 2.83" in steps["bench-step-fp32"]["result"]
    assert steps["bench-step-bf16"]["data"] is None and "see logs/bench-step-bf16.log" in steps["bench-step-bf16"]["result"]
    assert [r["B"] for r in steps["bench-ghost"]["data"]] == [8, 32, 16, 32]
    assert steps["dp2-bf16"]["result"] == "1 GPU" and steps["dp2-bf16"]["exit"] is None
    table = (out / "summary.md").read_text()
    assert "NVIDIA H100 80GB HBM3" in table and "torch 2.13.0+cu128, CUDA 12.8" in table
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 1 + len(steps)
