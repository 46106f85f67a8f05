"""DeepSpeed's private API sits behind megatron_greats/deepspeed_internals.py: another DeepSpeed release,
or one without a name the adapter uses, ends the run at start-up with one line (version found, range
supported), and nothing else in the package touches those names."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import types

import pytest

from conftest import PRETRAIN, REPO, child_env, error_lines, tiny_overrides
from megatron_greats import deepspeed_internals as ds
from megatron_greats.errors import DependencyError


def _one_line(error: DependencyError) -> str:
    text = str(error)
    assert "\n" not in text and error.exit_code == 2
    return text


def test_the_installed_deepspeed_passes():
    ds.check_deepspeed()
    assert ds.missing(ds.deepspeed_targets()) == []


@pytest.mark.parametrize("version", ["0.99.0", "0.19.7", "0.20.0rc1", "not-a-version"])
def test_another_release_is_refused_naming_version_and_range(version):
    with pytest.raises(DependencyError) as e:
        ds.check_deepspeed(version=version)
    text = _one_line(e.value)
    assert text.startswith(f"DeepSpeed {version} is installed; ")
    assert f"supports deepspeed{ds.SUPPORTED}" in text and f"pip install 'deepspeed{ds.SUPPORTED}'" in text


class _Engine:  # stands in for PipelineEngine: the instruction map but no _exec_schedule
    _INSTRUCTION_MAP = {}

    def backward(self, loss, retain_graph=False):  # no scale_wrt_gas
        pass


@pytest.mark.parametrize("targets, named", [
    ([("PipelineEngine", _Engine, ("_INSTRUCTION_MAP", "_exec_schedule"))], "PipelineEngine._exec_schedule"),
    ([("DeepSpeedEngine", _Engine, ("backward(scale_wrt_gas)",))], "DeepSpeedEngine.backward(scale_wrt_gas)"),
    ([("deepspeed.comm.torch", types.SimpleNamespace(), ("build_shm_op",))], "deepspeed.comm.torch.build_shm_op"),
    ([("BF16_Optimizer", None, ("clear_lp_grads",))], "BF16_Optimizer"),  # module or class gone
])
def test_a_missing_name_is_refused_even_in_range(targets, named):
    version = ds.installed_version()
    with pytest.raises(DependencyError) as e:
        ds.check_deepspeed(version=version, targets=targets)
    text = _one_line(e.value)
    assert text.startswith(f"DeepSpeed {version} is installed (missing: {named}); ")
    assert f"deepspeed{ds.SUPPORTED}" in text


def test_a_built_object_without_an_attribute_is_refused():
    engine = types.SimpleNamespace(**{name: None for name in ds.PIPELINE_ENGINE_STATE if name != "meta_buffer"})
    ds.require(engine, "PipelineEngine", ds.PIPELINE_ENGINE_STATE[:3])
    with pytest.raises(DependencyError) as e:
        ds.require(engine, "PipelineEngine", ds.PIPELINE_ENGINE_STATE)
    assert "(missing: PipelineEngine.meta_buffer)" in _one_line(e.value)


def test_requirements_pin_the_supported_range():
    pins = [line.split("#")[0].replace(" ", "") for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert [p for p in pins if re.match(r"deepspeed\b", p)] == [f"deepspeed{ds.SUPPORTED}"]


# Names of DeepSpeed's private API: only the adapter may use them (as attributes, in getattr & co., as keywords).
_PRIVATE = {"_INSTRUCTION_MAP", "_exec_schedule", "pipe_buffers", "grad_layer", "_grad_layer_buf", "meta_buffer",
            "pipe_recv_buf", "first_output_send", "dynamic_shape", "is_pipe_partitioned", "is_grad_partitioned",
            "using_bf16_optimizer", "clear_lp_grads", "update_hp_grads", "clip_fp32_gradients", "overflow",
            "_global_grad_norm", "set_gradient_accumulation_boundary", "ds_pipe_replicated", "_hp_mapping", "_dp_group",
            "lp_fragment_address", "get_hp_fragment", "lazy_init_hp_params_optimizer_state", "bit16_groups",
            "bf16_groups", "single_partition_of_fp32_groups", "fp32_groups_flat_partition", "tied_comms",
            "tied_modules", "forward_funcs", "_local_start", "_local_stop", "micro_offset", "seed_layers",
            "activation_checkpoint_interval", "build_shm_op", "num_stages", "stage_id"}
_PRIVATE_KEYWORDS = {"scale_wrt_gas", "clear_lp_grads"}
_ADAPTER = {"ds", "deepspeed_internals"}  # what the package calls the adapter module
# deepspeed.runtime.pipe.schedule (the documented instructions) and .topology are public
_PUBLIC_MODULES = {"deepspeed.runtime.pipe", "deepspeed.runtime.pipe.schedule", "deepspeed.runtime.pipe.topology"}


def _private_uses(tree) -> list:
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in _PRIVATE and not (
                isinstance(node.value, ast.Name) and node.value.id in _ADAPTER):
            uses.append((node.lineno, node.attr))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) > 1 and \
                node.func.id in ("getattr", "hasattr", "setattr", "delattr") and \
                isinstance(node.args[1], ast.Constant) and node.args[1].value in _PRIVATE:
            uses.append((node.lineno, node.args[1].value))
        elif isinstance(node, ast.keyword) and node.arg in _PRIVATE_KEYWORDS:
            uses.append((node.lineno, node.arg))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            uses += [(node.lineno, f"import {m}") for m in modules
                     if m.startswith(("deepspeed.runtime", "deepspeed.utils", "deepspeed.comm"))
                     and m not in _PUBLIC_MODULES]
    return uses


def test_only_the_adapter_uses_deepspeeds_private_names():
    found = [f"{path.relative_to(REPO)}:{line}: {name}" for path in sorted((REPO / "megatron_greats").rglob("*.py"))
             if path.name != "deepspeed_internals.py" for line, name in _private_uses(ast.parse(path.read_text()))]
    assert found == []
    adapter = ast.parse((REPO / "megatron_greats" / "deepspeed_internals.py").read_text())
    assert {name for _, name in _private_uses(adapter)} >= {"_INSTRUCTION_MAP", "_exec_schedule", "pipe_buffers",
                                                             "clip_fp32_gradients", "clear_lp_grads"}


def test_the_command_line_refuses_another_release_before_any_output(tmp_path):
    """launch/pretrain.py with DeepSpeed's version faked in the process: exit 2, one line, no run folder."""
    run_dir = tmp_path / "run"
    argv = [str(PRETRAIN), "--config", str(REPO / "configs" / "tiny-cpu.yaml"),
            *tiny_overrides(tmp_path / "cache", run_dir)]
    code = ("import runpy, sys, deepspeed; deepspeed.__version__ = '0.99.0'; "
            f"sys.argv = {argv!r}; runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("megatron_greats: error: DeepSpeed 0.99.0 is installed; ")
    assert f"supports deepspeed{ds.SUPPORTED}" in lines[0]
    assert not run_dir.exists() and not (tmp_path / "cache").exists()
