"""megatron_import.py: megatron-core's torch.compile decorators are applied at a function's first call."""

import subprocess
import sys

from conftest import REPO, child_env

from megatron_greats.megatron_import import applied_at_first_call


def _run(script: str) -> None:
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_importing_megatron_core_loads_neither_dynamo_nor_inductor():
    """With the package imported first, megatron-core's fused kernels hold torch.compile for their first
    call, and the import loads no compiler stack (it does when jit_fuser runs torch.compile at import)."""
    _run("import sys, torch\n"
         "import megatron_greats\n"
         "import megatron.core.tensor_parallel\n"
         "from megatron.core.fusions.fused_bias_gelu import bias_gelu\n"
         "assert bias_gelu.deferred_decorator is torch.compile, bias_gelu\n"
         "loaded = [m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules]\n"
         "assert not loaded, loaded\n")


def test_megatron_core_imported_first_is_left_as_it_is():
    _run("import torch\n"
         "import megatron.core.jit\n"
         "import megatron_greats\n"
         "from megatron.core.jit import jit_fuser\n"
         "assert jit_fuser is torch.compile, jit_fuser\n")


def test_the_decorator_is_applied_once_at_the_first_call():
    applied = []

    def doubling(fn):  # a decorator that changes the result, so a call without it would show
        applied.append(fn)
        return lambda *args, **kwargs: 2 * fn(*args, **kwargs)

    @applied_at_first_call(doubling)
    def add(a, b=1):
        """add's doc"""
        return a + b

    assert applied == [] and add.__name__ == "add" and add.__doc__ == "add's doc"
    assert add(3) == 8 and add(1, b=2) == 6
    assert len(applied) == 1
    # a configured decorator (jit_fuser(mode=...)) is passed through unchanged
    assert applied_at_first_call(lambda **options: options)(mode="x") == {"mode": "x"}
