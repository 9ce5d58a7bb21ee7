"""Every drafting policy is lossless under greedy decoding (output identical to plain
decoding, tiny random models built in code, fp32), plus each policy's own rules.
The sampling distribution of every policy is tested in ``test_distribution.py``.

The predictor-backed policies use predictors trained on the tiny pair
(collect -> train, see ``conftest.trained_predictors``), which also exercises that pipeline.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import rand_prompts as prompts

from adaspec.api import SpeculativeGenerator
from adaspec.policies import make_policy
from adaspec.types import Action

VOCAB = 64


def policy_specs(preds: dict[str, Path]) -> list[tuple[str, dict]]:
    return [
        ("fixed", {"k": "4"}),
        ("heuristic", {}),
        ("confidence", {"k_max": "6"}),
        ("entropy", {"h": "2.0", "k_max": "6"}),
        ("oracle", {}),
        ("specdecpp", {"predictor": str(preds["specdecpp"]), "h": "0.5", "k_max": "6"}),
        ("context", {"predictor": str(preds["context"])}),
        ("context", {"predictor": str(preds["context"]), "adapt": "false", "tau": "0.3"}),
        ("context", {"predictor": str(preds["context"]), "branch": "on", "max_branch": "2"}),
        ("context", {"predictor": str(preds["context"]), "branch": "on", "branch_rule": "always",
                     "max_branch": "1"}),
        ("context", {"mode": "random", "k_max": "5"}),
        ("context", {"predictor": "online"}),
        ("ldlp", {"predictor": str(preds["ldlp"]), "stop_q": "0.2"}),
    ]


@pytest.mark.parametrize("runtime", ["eager", "compiled"])
def test_greedy_identity_every_policy(pair, trained_predictors, virtual_clock, runtime):
    """Every policy and variant: greedy output equal to plain decoding on 5 prompts, and the
    paths that could break it ran: tokens accepted *and* rejected (the oracle never drafts
    a token the target rejects: it drops it instead), drops, stops, token trees."""
    target, draft = pair
    virtual_clock(target, draft)  # context's decisions read the clock: make them deterministic
    plain = SpeculativeGenerator(target, None, runtime="eager")
    ps = prompts(5)
    want = [plain.generate(p, max_new_tokens=40).token_ids for p in ps]
    for name, args in policy_specs(trained_predictors):
        policy = make_policy(name, args)
        actions: Counter = Counter()
        decide = policy.decide
        policy.decide = _counting(decide, actions)  # type: ignore[method-assign]
        gen = SpeculativeGenerator(target, draft, policy, runtime=runtime)
        c: Counter = Counter()
        for p, w in zip(ps, want, strict=True):
            res = gen.generate(p, max_new_tokens=40)
            assert res.token_ids == w, f"{name} {args} changed greedy output"
            if name == "specdecpp":  # calibration pairs: one per tested token, labels = accepted
                pairs = res.stats.extra["calibration"]
                assert len(pairs) == sum(res.stats.pos_tested)
                assert sum(label for _, label in pairs) == res.stats.accepted_tokens
            c.update(accepted=res.stats.accepted_tokens,
                     rejected=res.stats.drafted_tokens - res.stats.accepted_tokens,
                     tree_rounds=res.stats.branch_rounds, candidate_wins=res.stats.branch_accepts)
        what = f"{name} {args}: {dict(c)} {dict(actions)}"
        assert c["accepted"] > 0, what
        if name == "oracle":
            assert c["rejected"] == 0 and actions[Action.DROP] > 0, what
        else:
            assert c["rejected"] > 0, what
        if args.get("branch") == "on":
            assert c["tree_rounds"] > 0 and c["candidate_wins"] > 0, what
        if name in ("confidence", "specdecpp", "ldlp") or (name == "context" and "mode" not in args):
            assert actions[Action.STOP] + actions[Action.DROP] > 0, what
        if name == "entropy":
            assert actions[Action.DROP] > 0, what


def _counting(decide, actions: Counter):
    def counted(step):
        action = decide(step)
        actions[action] += 1
        return action

    return counted


def test_oracle_accepts_everything_it_drafts(pair):
    target, draft = pair
    gen = SpeculativeGenerator(target, draft, "oracle")
    for p in prompts(3):
        st = gen.generate(p, max_new_tokens=40).stats
        assert st.accepted_tokens == st.drafted_tokens
        assert st.extra["oracle_diverged_at"] is None  # fp32: never leaves the reference
        assert st.tau > 1.0


def test_policy_state_resets_per_call(pair):
    target, draft = pair
    gen = SpeculativeGenerator(target, draft, "heuristic")
    p = prompts(1)[0]
    a = gen.generate(p, max_new_tokens=30).stats
    b = gen.generate(p, max_new_tokens=30).stats
    assert a.accept_hist == b.accept_hist and a.drafted_tokens == b.drafted_tokens


def test_heuristic_schedule():
    from adaspec.policies.heuristic import HeuristicPolicy
    from adaspec.types import Draft, RoundOutcome, Verdict

    pol = HeuristicPolicy()
    pol.reset()

    def round_(k: int, m: int) -> None:
        d = Draft(list(range(k)), None, [], k)
        pol.observe(RoundOutcome(d, Verdict(m, 0, "bonus" if m == k else "recovered"),
                                 torch.zeros(k + 1, 4), None, 0.0, 0.0))

    assert pol.begin_round(None) == 5
    round_(5, 5)
    assert pol._k == 7
    round_(7, 2)
    assert pol._k == 6
    for _ in range(10):
        round_(pol._k, 0)
    assert pol._k == 1
    pol.reset()
    assert pol._k == 5


def test_confidence_threshold_fit():
    from adaspec.policies.confidence import fit_threshold

    assert fit_threshold([0.9, 0.8], [True, True]) is None
    t = fit_threshold([0.1, 0.2, 0.3, 0.8, 0.9], [False, False, True, True, True])
    assert t == pytest.approx(0.3)
    # 3 * FNR dominates: never put an accepted token below the threshold when avoidable
    t = fit_threshold([0.1, 0.5, 0.6, 0.7], [True, False, True, True])
    assert t <= 0.1


def test_policy_arguments_are_checked():
    from adaspec.errors import PolicyArgumentError

    with pytest.raises(PolicyArgumentError):
        make_policy("heuristic", {"k": "0"})
    with pytest.raises(PolicyArgumentError):
        make_policy("confidence", {"t": "2"})
    with pytest.raises(PolicyArgumentError):
        make_policy("context", {"mode": "bogus"})
    with pytest.raises(PolicyArgumentError):
        make_policy("context", {"branch_rule": "sometimes"})
    with pytest.raises(PolicyArgumentError):
        make_policy("entropy", {"nope": "1"})


def test_missing_predictor_explains_how_to_train(tmp_path):
    from adaspec.errors import PolicyArgumentError

    for kind in ("specdecpp", "context", "ldlp"):
        with pytest.raises(PolicyArgumentError, match="train-predictor"):
            make_policy(kind, {"predictor": str(tmp_path / "missing")})


def test_all_policies_registered():
    from adaspec.policies import POLICIES, _load_all

    _load_all()
    assert set(POLICIES) >= {"fixed", "heuristic", "confidence", "entropy", "specdecpp", "context",
                             "ldlp", "oracle"}


