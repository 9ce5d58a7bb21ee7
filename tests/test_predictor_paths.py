"""Decode-time fast paths of the predictors give the same numbers as the reference maths,
and the offline policy simulator runs on replay traces."""

from __future__ import annotations

import pytest
import torch

from adaspec.predictors import features as F
from adaspec.predictors.models import ContextHead


def _reference(logits: torch.Tensor) -> tuple[float, torch.Tensor]:
    p = torch.softmax(logits.double(), -1)
    ent = float(-torch.nansum(p * torch.log_softmax(logits.double(), -1)))
    return ent, p.sort(descending=True).values[:4]


@pytest.mark.parametrize("finite", [49152, 8192, 3])
def test_entropy_and_top_equal_the_direct_formulas_with_and_without_padding(finite):
    g = torch.Generator().manual_seed(finite)
    for _ in range(3):  # the cached padding length is re-checked on every call
        x = torch.full((49152,), float("-inf"))
        x[:finite] = torch.randn(finite, generator=g) * 3
        ent, top = F.entropy_and_top(x)
        want_ent, want_top = _reference(x)
        assert ent == pytest.approx(want_ent, abs=1e-4)
        assert torch.allclose(top.double(), torch.cat([want_top, want_top.new_zeros(4 - len(want_top))]),
                              atol=1e-6)
    x = torch.randn(49152, generator=g)  # same size, no padding any more: found again
    assert F.entropy_and_top(x)[0] == pytest.approx(_reference(x)[0], abs=1e-4)


def test_context_head_numpy_path_equals_forward():
    torch.manual_seed(0)
    head = ContextHead(32, 8, width=8)
    head.set_scalar_stats(torch.randn(100, 8))
    for _ in range(5):
        h, s = torch.randn(32), torch.randn(8)
        assert head.logit_one(h, s) == pytest.approx(float(head(h, s).detach()), abs=1e-5)
    with torch.no_grad():
        head.hidden.weight.mul_(2.0)  # weights changed in place: the cached copy follows
    h, s = torch.randn(32), torch.randn(8)
    assert head.logit_one(h, s) == pytest.approx(float(head(h, s).detach()), abs=1e-5)


def test_residual_head_numpy_path_equals_forward():
    from adaspec.predictors.models import ResidualHead

    torch.manual_seed(1)
    head = ResidualHead(24, blocks=2)
    for _ in range(5):
        h = torch.randn(24)
        assert head.logit_one(h) == pytest.approx(float(head(h).detach()), abs=1e-5)
    with torch.no_grad():
        head.blocks[1][2].weight.mul_(3.0)  # changed in place: the cached copy follows
    h = torch.randn(24)
    assert head.logit_one(h) == pytest.approx(float(head(h).detach()), abs=1e-5)


def test_simulator_ranks_the_oracle_first(tmp_path):
    from conftest import layered_pair, rand_prompts

    from adaspec.predictors.models import load_predictor
    from adaspec.train.predictor import train_predictor
    from adaspec.train.predictor_sim import Costs, responses, simulate
    from adaspec.train.traces import collect, load_traces

    target, draft = layered_pair()
    collect(target, draft, rand_prompts(14, seed=7), tmp_path / "tr", k=6, max_new_tokens=24, shard_size=8,
            progress=False, replay=True)
    pred = train_predictor(tmp_path / "tr", "context", tmp_path / "ctx", epochs=3, batch=64,
                           eval_traces=tmp_path / "tr")
    held = pred.meta["metrics"]["heldout"]  # --eval-traces: metrics on another trace directory
    assert held["n"] > 0 and 0.0 <= held["ece"] <= 1.0 and 0.0 <= held["auc"] <= 1.0
    _, t = load_traces(tmp_path / "tr")
    res = responses(t)
    assert len(res) == 14 and all(len(r.match) >= 2 for r in res.values())
    pred, costs = load_predictor(tmp_path / "ctx", "context"), Costs()

    def speed(rule: str, **kw) -> float:
        out = [simulate(r, rule, costs, pred=pred, **kw) for r in res.values()]
        return sum(tok for _, tok in out) / sum(s for s, _ in out)

    oracle = speed("oracle")
    assert all(oracle >= speed("fixed", k=k) for k in (1, 3, 6))
    assert oracle >= speed("context") and oracle >= speed("online")
    # every rule commits every response token exactly once
    for rule in ("fixed", "oracle", "context", "online"):
        assert [simulate(r, rule, costs, pred=pred)[1] for r in res.values()] == \
            [len(r.match) for r in res.values()]


def test_recipe_collects_train_and_dev_buckets_and_evaluates_on_dev():
    from adaspec.train.predictor_recipe import SOURCES, commands

    steps = commands("default", "T", "D", "OUT", 64, 8, 2)
    assert [s[0] for s in steps] == ["collect", "collect", "train-predictor", "train-predictor",
                                     "train-predictor"]
    assert all(f"{src}:train" in steps[0] for src in SOURCES)
    assert all(f"{src}:dev" in steps[1] for src in SOURCES)
    assert not any(a.endswith(":test") for s in steps for a in s)
    assert steps[2][steps[2].index("--eval-traces") + 1] == "D"
