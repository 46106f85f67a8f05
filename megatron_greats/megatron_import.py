"""How megatron-core is imported: its torch.compile decorators are applied at a function's first call.

megatron-core's package import decorates its fused kernels (bias-GELU, SwiGLU, ...) with
megatron.core.jit.jit_fuser, which is torch.compile on torch >= 2.2. Each decoration imports
torch._dynamo and inductor: about 2 s of every process's start on CPU, out of about 8. Our model
calls none of those kernels, and torch.compile compiles at the first call anyway, so applying the
decorator at the first call instead changes when the import happens, never what runs.

install() adds an import hook that wraps jit_fuser when megatron.core.jit is first imported. It must
run before megatron.core is imported (the package __init__ calls it); if megatron-core was imported
first, nothing changes.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys

JIT_MODULE = "megatron.core.jit"


def applied_at_first_call(decorator):
    """A decorator that applies `decorator` to a function when the function is first called."""
    def decorate(fn=None, /, **options):
        if fn is None or options:  # called for a configured decorator (jit_fuser(mode=...)): as it was
            return decorator(**options) if fn is None else decorator(fn, **options)
        decorated = None

        @functools.wraps(fn)
        def call(*args, **kwargs):
            nonlocal decorated
            if decorated is None:
                decorated = decorator(fn)
            return decorated(*args, **kwargs)
        call.deferred_decorator = decorator
        return call
    return decorate


class _DeferJitFuser(importlib.abc.MetaPathFinder):
    """Finds megatron.core.jit as the path finder would, and wraps jit_fuser once the module has run."""

    def find_spec(self, name, path, target=None):
        if name != JIT_MODULE:
            return None
        _remove_hook()
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return None  # an unusual install: let the other finders import it unchanged
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            if callable(getattr(module, "jit_fuser", None)):
                module.jit_fuser = applied_at_first_call(module.jit_fuser)
        spec.loader.exec_module = exec_module
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _DeferJitFuser)]


def install() -> None:
    if JIT_MODULE in sys.modules or any(isinstance(f, _DeferJitFuser) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _DeferJitFuser())
