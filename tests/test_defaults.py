"""What a user gets without --policy / --draft, the predictor-free ``context`` (online
calibration of the draft's confidence), the no-draft round, the mixed-source oracle, and the
bench's ``default`` method and per-category table."""

from __future__ import annotations

import json
import warnings
from collections import Counter

import pytest
import torch
from conftest import loaded, make_model, make_tokenizer, perturbed
from conftest import rand_prompts as prompts

from adaspec import cli
from adaspec.api import SpeculativeGenerator
from adaspec.errors import PolicyArgumentError
from adaspec.policies import make_policy
from adaspec.predictors.online import OnlineAcceptance
from adaspec.types import Draft, DraftStep, RoundContext, RoundOutcome, Verdict


def tiny_pair8():
    target = make_model("llama", vocab=8, hidden=32, seed=0, init=0.5)
    return loaded(target, name="tiny8"), loaded(perturbed(target, 0.6), name="tiny8-draft")


def test_default_is_context_over_model_plus_ngram_and_falls_back_in_one_note(pair):
    """A pair without a trained predictor: context with predictor=online over model+ngram,
    said once (one warning, one line); greedy output equals plain decoding."""
    target, draft = pair
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gen = SpeculativeGenerator(target, [draft, "ngram"])
    notes = [str(w.message) for w in caught]
    assert len(notes) == 1 and "\n" not in notes[0] and "predictor=online" in notes[0], notes
    assert gen.policy_name == "context" and gen.draft_name == f"{draft.name}+ngram"
    assert gen.policy.predictor == "online"
    plain = SpeculativeGenerator(target, None)
    for p in prompts(4):
        assert gen.generate(p, max_new_tokens=30).token_ids == plain.generate(p, max_new_tokens=30).token_ids


def test_explicit_policy_is_kept_and_auto_refuses_arguments(pair):
    target, draft = pair
    gen = SpeculativeGenerator(target, draft, "fixed", {"k": 3})
    assert gen.policy_name == "fixed" and gen.default_note is None and gen.draft_name == draft.name
    with pytest.raises(PolicyArgumentError):
        SpeculativeGenerator(target, draft, "auto", {"k": 3})
    with pytest.warns(UserWarning, match="no draft model: ngram only"):  # said once, in one line
        gen = SpeculativeGenerator(target, "ngram")  # no draft model: fixed k=8 over the copy
    assert gen.policy_name == "fixed" and gen.policy.k == 8 and gen.draft_name == "ngram"


def test_shipped_predictor_is_used_only_for_its_own_pair(pair):
    from adaspec.policies.auto import shipped_predictor_fits

    target, draft = pair
    why = shipped_predictor_fits(target, draft)
    assert why is not None and "tiny" in why


def test_cli_default_names_policy_and_draft_and_says_the_fallback_once(tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    make_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    argv = ["generate", "hello", "--target", str(model_dir), "--draft", f"{model_dir}+ngram", "--dtype",
            "fp32", "--max-new-tokens", "12", "--json"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    obj = json.loads(out)
    assert obj["policy"] == "context" and obj["draft"] == f"{model_dir}+ngram"
    notes = [ln for ln in err.splitlines() if "default policy" in ln]
    assert len(notes) == 1 and "Warning" not in err


def test_online_acceptance_calibrates_the_draft_confidence():
    est = OnlineAcceptance(prior_weight=4)
    assert est.prob(0.9) == pytest.approx(0.9)  # the prior: the draft's own word
    for _ in range(50):  # the target rejects every 0.9-confident first token
        est.update([0.9, 0.95], 0)
    assert est.prob(0.9) < 0.1
    assert est.tested[9] == 50  # only the first token was put to the test
    est.update([0.35, 0.35, 0.35], 3)  # all accepted: three tested, three accepted
    assert est.tested[3] == 3 and est.accepted[3] == 3
    est.reset()
    assert est.prob(0.5) == pytest.approx(0.5)


def _step(i: int, conf: float) -> DraftStep:
    probs = torch.tensor([conf, 1.0 - conf, 0.0, 0.0])
    return DraftStep(i, 0, probs.clamp_min(1e-9).log(), probs)


def _outcome(k: int, m: int, draft_s: float, verify_s: float) -> RoundOutcome:
    d = Draft(list(range(k)), None, [], k)
    return RoundOutcome(d, Verdict(m, 0, "recovered" if m < k else "bonus"), torch.zeros(k + 1, 4), None,
                        draft_s, verify_s)


def test_no_draft_round_when_the_first_token_does_not_pay_and_probes_again():
    """Drafting costs as much as a verify and the first token is never accepted: the policy
    drafts nothing, except every probe_every-th round."""
    pol = make_policy("context", {"predictor": "online", "probe_every": 3})
    pol.reset()
    ctx = RoundContext([1, 2, 3], 3, 0, 16)
    for _ in range(4):  # four measured rounds before the rule speaks
        assert pol.begin_round(ctx) == 16
        pol.decide(_step(1, 0.9))
        pol.observe(_outcome(1, 0, 0.02, 0.02))
    budgets = []
    for _ in range(8):
        budgets.append(pol.begin_round(ctx))
        if budgets[-1]:
            pol.decide(_step(1, 0.9))
            pol.observe(_outcome(1, 0, 0.02, 0.02))
        else:
            pol.observe(_outcome(0, 0, 0.0, 0.02))
    assert budgets == [0, 0, 0, 16, 0, 0, 0, 16], budgets
    assert pol.report()["skipped_rounds"] == 6
    pol.reset()  # the next generate(): what was measured carries over (carry=auto, model alone),
    assert [pol.begin_round(ctx) for _ in range(4)] == [0, 0, 0, 16]
    short = []
    for _ in range(8):  # and the probe count: calls of one round each still probe
        pol.reset()
        short.append(pol.begin_round(ctx))
    assert short == [0, 0, 0, 16, 0, 0, 0, 16]
    pol._mixed = True  # ... but not after a call that drafted from several sources
    pol.reset()
    assert pol.begin_round(ctx) == 16
    with pytest.raises(PolicyArgumentError, match="carry must be"):
        make_policy("context", {"predictor": "online", "carry": "sometimes"})
    cold = make_policy("context", {"predictor": "online", "probe_every": 3, "carry": "false"})
    for _ in range(4):
        cold.begin_round(ctx)
        cold.decide(_step(1, 0.9))
        cold.observe(_outcome(1, 0, 0.02, 0.02))
    assert cold.begin_round(ctx) == 0
    cold.reset()  # ... unless carry=false: every call starts cold and drafts
    assert cold.begin_round(ctx) == 16
    cheap = make_policy("context", {"predictor": "online"})  # a third of first tokens pay a cheap draft
    cheap.reset()
    for r in range(12):
        assert cheap.begin_round(ctx) == 16
        cheap.decide(_step(1, 0.9))
        cheap.observe(_outcome(1, int(r % 3 == 0), 0.001, 0.02))


def test_mixed_oracle_chooses_the_source_that_gets_more_accepted():
    from adaspec.drafters.ngram import Match

    pol = make_policy("oracle")
    pol.reset()
    pol._ref = [5, 6, 7, 1, 2, 3]
    pol._model_run = [2, 1, 0, 0, 3, 2]
    pol._pos = 0
    assert pol.choose_source(Match(4, 1, 1.0, (5, 6, 7)), 8) == "ngram"  # 3 >= 2
    assert pol.choose_source(Match(4, 1, 1.0, (5, 0)), 8) == "model"  # 1 < 2
    pol._pos = 2
    assert pol.choose_source(Match(2, 1, 1.0, (4,)), 8) == "none"  # neither gets a token accepted
    assert pol.report()["oracle_sources"] == {"ngram": 1, "model": 1, "none": 1}


def test_mixed_oracle_is_greedy_identical_and_uses_every_source():
    target, draft = tiny_pair8()
    gen = SpeculativeGenerator(target, [draft, "ngram"], "oracle")
    plain = SpeculativeGenerator(target, None)
    used: Counter = Counter()
    for p in ([1, 2, 3, 1, 2], [7, 7, 6, 5, 7], [4, 5, 6, 4, 5, 6, 4]):
        res = gen.generate(p, max_new_tokens=60)
        assert res.token_ids == plain.generate(p, max_new_tokens=60).token_ids
        assert res.stats.accepted_tokens == res.stats.drafted_tokens  # never drafts a rejected token
        used.update(res.stats.extra["oracle_sources"])
    assert used["ngram"] > 0 and used["model"] > 0, used


def test_bench_default_method_and_category_table():
    from adaspec.bench.methods import MethodError, parse_method
    from adaspec.bench.report import category_table, default_first

    spec = parse_method("default")
    assert (spec.kind, spec.name, spec.draft) == ("policy", "auto", "model+ngram")
    assert parse_method("default:draft=model").draft == "model"
    with pytest.raises(MethodError):
        parse_method("default:k=3")
    assert default_first(["ar", "fixed:3", "default"]) == ["default", "ar", "fixed:3"]
    cell = {"speedup_vs_ar": 1.5, "tau": 2.0, "efficiency_vs_oracle": 0.9}
    summary = {"categories": ["code"], "methods": {
        "ar": {"per_category": {"code": {"speedup_vs_ar": 1.0, "tau": 1.0}}},
        "default": {"per_category": {"code": cell}}}}
    rows = category_table(summary).splitlines()
    assert rows[2].startswith("| `default` |") and "90% of oracle" in rows[2]
