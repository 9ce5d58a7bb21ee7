"""The compiled per-token policy pieces equal their torch / numpy definitions."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("numba")

import adaspec.runtime.kernels  # noqa: E402,F401  (numba set up, as under the compiled runtime)
from adaspec.predictors import fastpath  # noqa: E402
from adaspec.predictors.features import entropy_and_top  # noqa: E402
from adaspec.predictors.models import ContextHead  # noqa: E402


def _logits(case: int, g: torch.Generator) -> torch.Tensor:
    """[V] float32 logits: dense, a reduced-vocabulary padding, fewer than 4 finite, ties."""
    if case == 0:
        return torch.randn(8192, generator=g) * 4
    if case == 1:
        x = torch.full((49152,), float("-inf"))
        x[:8192] = torch.randn(8192, generator=g) * 3
        return x
    if case == 2:
        x = torch.full((300,), float("-inf"))
        x[[5, 70, 299]] = torch.tensor([1.0, 3.0, 2.0])
        return x
    return torch.tensor([2.0, 5.0, 5.0, -1.0, 5.0, 0.5])


@pytest.mark.parametrize("case", range(4))
def test_entropy_and_top_compiled_equals_torch(case: int, monkeypatch: pytest.MonkeyPatch) -> None:
    x = _logits(case, torch.Generator().manual_seed(case))
    monkeypatch.setenv("ADASPEC_POLICY_KERNELS", "0")
    assert fastpath.kernels() is None
    e0, t0 = entropy_and_top(x)
    monkeypatch.setenv("ADASPEC_POLICY_KERNELS", "1")
    assert fastpath.kernels() is not None
    e1, t1 = entropy_and_top(x)
    assert e1 == pytest.approx(e0, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(t1, t0, rtol=1e-6, atol=1e-7)
    p = torch.softmax(x, -1)
    assert e1 == pytest.approx(float(-(p[p > 0] * p[p > 0].log()).sum()), rel=1e-4, abs=1e-5)


def test_context_logit_compiled_equals_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    head = ContextHead(48, 8, width=6)
    with torch.no_grad():
        for prm in head.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g))
    head.set_scalar_stats(torch.rand(50, 8, generator=g))
    for _ in range(5):
        h, s = torch.randn(48, generator=g) * 3, torch.rand(8, generator=g)
        want = float(head(h[None], s[None]).detach())
        monkeypatch.setenv("ADASPEC_POLICY_KERNELS", "0")
        slow = head.logit_one(h, s)
        monkeypatch.setenv("ADASPEC_POLICY_KERNELS", "1")
        fast = head.logit_one(h, s)
        assert fast == pytest.approx(want, rel=1e-4, abs=1e-4)
        assert fast == pytest.approx(slow, rel=1e-5, abs=1e-5)


def test_no_kernels_before_numba_is_set_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """A policy never imports numba itself: without the runtime's kernels module loaded,
    the torch / numpy path runs."""
    import sys

    monkeypatch.setattr(fastpath, "_loaded", None)
    monkeypatch.delitem(sys.modules, "adaspec.runtime.kernels")
    assert fastpath.kernels() is None
