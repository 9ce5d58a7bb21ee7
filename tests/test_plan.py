"""The runtime plan: the runtime, the dtype and the note are decided once per generator, and
the engines it builds (one per served sequence) run on that plan without resolving again."""

from __future__ import annotations

import pytest
import torch
from conftest import loaded, make_model, perturbed

import adaspec.runtime as rt
from adaspec.api import SpeculativeGenerator
from adaspec.errors import InvalidArgumentError
from adaspec.frontend.options import _ARGS
from adaspec.runtime.plan import DTYPE_CHOICES, choose_dtype, plan_runtime


def _pair():
    target = make_model("llama", vocab=16, hidden=32, seed=0, init=0.5)
    return loaded(target, name="t"), loaded(perturbed(target, 0.5), name="d")


@pytest.mark.parametrize("runtime", ["eager", "compiled-fp32"])
def test_the_generator_resolves_once_and_its_engines_follow_the_plan(runtime, monkeypatch):
    target, draft = _pair()
    calls = []
    real = rt.resolve_runtime
    monkeypatch.setattr(rt, "resolve_runtime", lambda name, model: calls.append(name) or real(name, model))
    import adaspec.runtime.plan as plan_mod

    monkeypatch.setattr(plan_mod, "resolve_runtime", rt.resolve_runtime)
    gen = SpeculativeGenerator(target, [draft, "ngram"], "fixed", {"k": 3}, runtime=runtime)
    assert calls == [runtime, runtime]  # target, draft: once each
    assert (gen.plan.target, gen.plan.draft, gen.plan.requested) == (runtime, runtime, runtime)
    assert gen.runtime == runtime and gen.runtime_note == gen.plan.note
    assert gen.runtime_note.startswith(f"runtime: target {runtime}")
    assert gen.runtime_note.endswith("; model-free draft: ngram")
    engines = [gen.new_engine(gen.policy) for _ in range(3)]
    assert calls == [runtime, runtime]  # new engines read the plan
    kinds = {type(e.target).__name__ for e in engines}
    assert kinds == {"ModelRunner" if runtime == "eager" else "CompiledRunner"}


def test_dtype_and_choices_come_from_the_runtime_package():
    assert choose_dtype("auto", "cpu", "compiled") == torch.float32
    assert choose_dtype("bf16") == torch.bfloat16 and choose_dtype(torch.float16) == torch.float16
    assert plan_runtime("auto", "fp32").dtype == torch.float32
    with pytest.raises(InvalidArgumentError, match="unknown runtime"):
        plan_runtime("fast")
    with pytest.raises(InvalidArgumentError, match="unknown dtype"):
        plan_runtime("auto", "int3")
    assert _ARGS["runtime"]["choices"] == list(rt.RUNTIMES)
    assert _ARGS["dtype"]["choices"] == list(DTYPE_CHOICES)
