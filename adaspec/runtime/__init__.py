"""Runtimes: how a model's forward runs. The engine and drafters see only a runner.

- ``eager``: Hugging Face modules with a ``DynamicCache`` (any model, any device, any dtype).
- ``compiled``: a lean Llama-family forward over packed weights with a static KV cache,
  compiled once per machine (see :mod:`adaspec.runtime.compiled`); fp32 on CPU.
- ``auto``: ``compiled`` where it is supported, ``eager`` elsewhere (:func:`resolve_runtime`
  says which and why in one line).
"""

from __future__ import annotations

import importlib.util

from torch import nn

from ..errors import InvalidArgumentError
from ..kv import ModelRunner, RunnerBase

RUNTIMES = ("auto", "eager", "compiled")


def compiled_unsupported(model: nn.Module) -> str | None:
    """Why the compiled runtime cannot run ``model`` (None when it can)."""
    if importlib.util.find_spec("numba") is None:
        return "numba is not installed (pip install numba)"
    from .compiled import unsupported_reason

    return unsupported_reason(model)


def check_runtime(name: str) -> None:
    """Raise InvalidArgumentError unless ``name`` is one of :data:`RUNTIMES`."""
    if name not in RUNTIMES:
        raise InvalidArgumentError(f"unknown runtime {name!r}; choose one of {', '.join(RUNTIMES)}")


def resolve_runtime(name: str, model: nn.Module) -> tuple[str, str]:
    """Resolve a runtime name for ``model`` to ``eager`` or ``compiled``.

    Returns (runtime, one-line explanation).

    Raises:
        InvalidArgumentError: an unknown name, or ``compiled`` for a model it cannot run.
    """
    check_runtime(name)
    if name == "eager":
        return "eager", "eager (Hugging Face modules)"
    reason = compiled_unsupported(model)
    if name == "compiled" and reason:
        raise InvalidArgumentError(f"--runtime compiled does not support {reason}")
    if reason:
        return "eager", f"eager (the compiled runtime does not support {reason})"
    return "compiled", "compiled (lean CPU forward, packed fp32 weights, static KV cache)"


def make_runner(model: nn.Module, runtime: str = "eager", release: bool = False) -> RunnerBase:
    """A runner of ``model`` under a resolved runtime (``eager`` or ``compiled``).

    ``release`` (compiled only, for modules adaspec loaded itself): keep one copy of the
    weights, the packed one; an eager forward of the module rebuilds its own tensors first.
    """
    if runtime == "compiled":
        from .compiled import CompiledRunner

        return CompiledRunner(model, release)
    if runtime != "eager":
        raise InvalidArgumentError(f"runtime {runtime!r} must be resolved first (eager or compiled)")
    return ModelRunner(model)


def set_threads(n: int) -> None:
    """Use ``n`` CPU threads for torch and for the compiled runtime's kernels (numba)."""
    import torch

    torch.set_num_threads(n)
    if importlib.util.find_spec("numba") is not None:
        from .kernels import numba

        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))


__all__ = ["RUNTIMES", "check_runtime", "compiled_unsupported", "make_runner", "resolve_runtime",
           "set_threads"]
