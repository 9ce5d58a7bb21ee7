"""Runtimes: how a model's forward runs. The engine and drafters see only a runner.

- ``eager``: Hugging Face modules with a ``DynamicCache`` (any model, any device, any dtype).
- ``compiled``: a lean Llama-family forward with a static KV cache, compiled once per
  machine, over the checkpoint's own encoding (GGUF Q4_0 / Q4_1 / Q8_0 / F16 / BF16 / F32,
  fp32 / fp16 / bf16 safetensors) decoded in registers (:mod:`adaspec.runtime.native`);
  fp32 arithmetic on CPU, logits bit-identical to ``compiled-fp32``.
- ``compiled-fp32``: the same forward over weights widened to packed fp32 panels
  (:mod:`adaspec.runtime.compiled`): 2-8x the memory traffic, same numbers.
- ``auto``: ``compiled`` where it is supported, ``compiled-fp32`` when a tensor's encoding
  is not decoded natively, ``eager`` elsewhere (:func:`resolve_runtime` says which and why
  in one line).
"""

from __future__ import annotations

import importlib.util

from torch import nn

from ..errors import InvalidArgumentError
from .eager import ModelRunner, RunnerBase
from .paths import cache_dir

RUNTIMES = ("auto", "eager", "compiled", "compiled-fp32")
COMPILED = ("compiled", "compiled-fp32")  # resolved runtimes that use the compiled kernels


def compiled_unsupported(model: nn.Module, native: bool = False) -> str | None:
    """Why the compiled runtime cannot run ``model`` (None when it can; ``native``: the
    native path, which also runs fp16 / bf16 modules)."""
    if importlib.util.find_spec("numba") is None:
        return "numba is not installed (pip install numba)"
    from .compiled import unsupported_reason

    return unsupported_reason(model, native)


def restore_eager_weights(model: nn.Module) -> None:
    """Give ``model`` back the big weights a compiled runtime released (decoded from its
    panels; the same numbers), so that code reading ``module.weight`` directly sees them.
    A no-op for a module whose weights were never released."""
    import sys

    native = sys.modules.get(f"{__name__}.native")  # imported only once a runtime was built
    compiled = sys.modules.get(f"{__name__}.compiled")
    for weights in (native.NativeWeights.existing(model) if native else None,
                    compiled.LeanWeights._by_model.get(model) if compiled else None):
        if weights is not None:
            weights.restore_eager_weights()


def check_runtime(name: str) -> None:
    """Raise InvalidArgumentError unless ``name`` is one of :data:`RUNTIMES`."""
    if name not in RUNTIMES:
        raise InvalidArgumentError(f"unknown runtime {name!r}; choose one of {', '.join(RUNTIMES)}")


def resolve_runtime(name: str, model: nn.Module) -> tuple[str, str]:
    """Resolve a runtime name for ``model`` to ``eager``, ``compiled`` or ``compiled-fp32``.

    Returns (runtime, one-line explanation).

    Raises:
        InvalidArgumentError: an unknown name, or a compiled runtime for a model it cannot run
            (``compiled``: also a tensor encoding its kernels do not decode).
    """
    check_runtime(name)
    if name == "eager":
        return "eager", "eager (Hugging Face modules)"
    fp32 = "compiled-fp32 (lean CPU forward, packed fp32 weights, static KV cache)"
    if name == "compiled-fp32":
        reason = compiled_unsupported(model)
        if reason:
            raise InvalidArgumentError(f"--runtime compiled-fp32 does not support {reason}")
        return "compiled-fp32", fp32
    reason = compiled_unsupported(model, native=True)
    if reason and name == "compiled":
        raise InvalidArgumentError(f"--runtime compiled does not support {reason}")
    if reason:
        return "eager", f"eager (the compiled runtime does not support {reason})"
    from .native import native_unsupported

    why = native_unsupported(model)
    if why and name == "compiled":
        raise InvalidArgumentError(f"--runtime compiled does not support {why}; use --runtime compiled-fp32")
    if why:
        other = compiled_unsupported(model)
        if other:
            return "eager", f"eager (the compiled runtime does not support {why}; compiled-fp32: {other})"
        return "compiled-fp32", f"{fp32}; not native: {why}"
    return "compiled", ("compiled (lean CPU forward over the checkpoint's own encoding, decoded in "
                        "registers, static KV cache)")


def make_runner(model: nn.Module, runtime: str = "eager", release: bool = False,
                encoding: str | None = None) -> RunnerBase:
    """A runner of ``model`` under a resolved runtime (``eager``, ``compiled``, ``compiled-fp32``).

    ``release`` (compiled only, for modules adaspec loaded itself): keep one copy of the
    weights, the packed one; an eager forward of the module rebuilds its own tensors first.
    ``encoding`` (``compiled`` only): re-encode the module's weights ("q8_0", "bf16", ...):
    for drafts, whose precision never changes the output.
    """
    if runtime in COMPILED:
        from .compiled_runner import CompiledRunner

        return CompiledRunner(model, release, native=runtime == "compiled", encoding=encoding)
    if runtime != "eager":
        raise InvalidArgumentError(f"runtime {runtime!r} must be resolved first (eager, compiled or "
                                   "compiled-fp32)")
    return ModelRunner(model)


def set_threads(n: int | None, torch_threads: int | None = None) -> None:
    """Use ``n`` CPU threads for torch and for the compiled runtime's kernels (numba);
    ``torch_threads`` overrides torch's count (e.g. 1 where the models run in the kernels
    and torch does only small per-row work). ``n`` None: leave the kernels' count."""
    import torch

    torch.set_num_threads(torch_threads or n)
    if n is None:
        return
    if importlib.util.find_spec("numba") is not None:
        from .kernels import numba

        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))


__all__ = ["COMPILED", "RUNTIMES", "cache_dir", "check_runtime", "compiled_unsupported", "make_runner",
           "resolve_runtime", "set_threads"]
