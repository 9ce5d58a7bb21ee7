"""The runtime plan: how each model of a generator runs, decided once.

:func:`plan_runtime` checks the user's ``--runtime`` and picks the dtype models are loaded in
(before any load); :meth:`RuntimePlan.resolve` then picks the runtime of the target and of
the draft model from the loaded modules and words the one line shown to the user. The
generator keeps the plan; the engine, the drafters and the server read it, none resolves
again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..errors import InvalidArgumentError
from . import RUNTIMES, check_runtime, resolve_runtime

# --dtype names -> torch dtypes ("auto" is decided by :func:`choose_dtype`)
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", "bf16", "fp32", "fp16")  # what the command line offers
DRAFT_ENCODING = "q8_0"  # the draft's weights on the native compiled runtime
ENCODING_ENV = "ADASPEC_DRAFT_ENCODING"  # overrides it: q8_0, bf16, f16, f32, or "stored" (as loaded)


def draft_encoding() -> str | None:
    """The encoding of the draft's weights on the native runtime: ``$ADASPEC_DRAFT_ENCODING``
    (``stored``: as loaded) or :data:`DRAFT_ENCODING`. The draft's precision never changes
    the output (verification decides), only how often its guesses are accepted."""
    enc = os.environ.get(ENCODING_ENV, DRAFT_ENCODING).strip().lower()
    return None if enc in ("", "stored", "none") else enc


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX).

    Without them PyTorch emulates bf16 matmuls, which on an AVX2-only CPU cost more
    than fp32 and grow linearly with the rows (tokens) verified, erasing the gain of
    verifying several tokens at once.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def choose_dtype(name: str | torch.dtype, device: str | torch.device = "cpu",
                 runtime: str = "eager") -> torch.dtype:
    """'auto' | 'bf16' | 'fp32' | 'fp16' (or a torch dtype) -> torch dtype.

    'auto' is bf16 on a GPU, fp32 on a CPU for the ``auto`` / ``compiled`` runtimes (the
    compiled CPU runtime computes in fp32 and beats bf16 eager forwards), and on a CPU
    for the eager runtime bf16 when the CPU has native bf16, else fp32.

    Raises:
        InvalidArgumentError: an unknown name.
    """
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        if torch.device(device).type == "cuda":
            return torch.bfloat16
        if runtime == "eager" and cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    try:
        return DTYPES[name.lower()]
    except KeyError:
        choices = ", ".join(DTYPE_CHOICES)
        raise InvalidArgumentError(f"unknown dtype {name!r}; choose one of {choices}") from None


@dataclass(frozen=True)
class RuntimePlan:
    """How a generator's models run.

    Attributes:
        requested: the runtime asked for, one of :data:`~adaspec.runtime.RUNTIMES`.
        dtype: the dtype models loaded by name are loaded in.
        target: the target's resolved runtime (``eager``, ``compiled``, ``compiled-fp32``);
            None until :meth:`resolve`.
        draft: the draft model's resolved runtime; None without a draft model. A feature
            head runs on the target's runtime.
        note: the one line shown to the user (what was chosen for each model, and why).
    """

    requested: str
    dtype: torch.dtype
    target: str | None = None
    draft: str | None = None
    note: str = ""

    def resolve(self, target: nn.Module, draft: nn.Module | None = None, *, head: bool = False,
                sources: tuple[str, ...] = ()) -> RuntimePlan:
        """The plan for these loaded modules (``head``: ``draft`` is a feature head;
        ``sources``: model-free draft sources, named in the note).

        Raises:
            InvalidArgumentError: a compiled runtime asked for a model it cannot run.
        """
        rt, why = resolve_runtime(self.requested, target)
        note, draft_rt = f"runtime: target {why}", None
        if draft is not None and head:
            note += f"; draft: feature head on the {rt} runtime"
        elif draft is not None:
            draft_rt, draft_why = resolve_runtime(self.requested, draft)
            note += f"; draft {draft_why}"
        if sources:
            note += f"; model-free draft: {'+'.join(sources)}"
        return replace(self, target=rt, draft=draft_rt, note=note)


def plan_runtime(requested: str = "auto", dtype: str | torch.dtype = "auto",
                 device: str | torch.device = "cpu") -> RuntimePlan:
    """The plan before any model loads: the runtime name checked, the dtype chosen.

    Raises:
        InvalidArgumentError: an unknown runtime or dtype name.
    """
    check_runtime(requested)
    return RuntimePlan(requested, choose_dtype(dtype, device, requested))


__all__ = ["DRAFT_ENCODING", "DTYPES", "DTYPE_CHOICES", "ENCODING_ENV", "RUNTIMES", "RuntimePlan",
           "choose_dtype", "cpu_has_fast_bf16", "draft_encoding", "plan_runtime"]
