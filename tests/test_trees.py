"""Candidate trees: extra draft candidates verified in one target forward stay lossless
(greedy here; their sampling distribution is tested in ``test_distribution.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from conftest import loaded, make_model, perturbed, prompt_ids
from test_engine import _cache_matches_fresh_prefill

from adaspec.api import SpeculativeGenerator
from adaspec.policies.base import Policy
from adaspec.types import DraftStep, RoundContext


@dataclass
class BranchEvery(Policy):
    """Test policy: K chain tokens, ``b`` extra candidates at every ``every``-th position."""

    name = "test-branch"
    k: int = 4
    b: int = 2
    every: int = 1

    def begin_round(self, ctx: RoundContext) -> int:
        return self.k

    def extra_candidates(self, step: DraftStep) -> int:
        return self.b if step.index % self.every == 0 else 0


def plain(target, prompt, **kw):
    return SpeculativeGenerator(target, None).generate(prompt, **kw)


@pytest.mark.parametrize(("k", "b", "every"), [(1, 3, 1), (3, 4, 1), (5, 2, 2), (6, 1, 3)])
def test_tree_greedy_identity(tiny_pair, k, b, every):
    target, draft = tiny_pair
    gen = SpeculativeGenerator(target, draft, BranchEvery(k, b, every))
    branch_accepts = 0
    for i in range(5):
        out = gen.generate(prompt_ids(i), max_new_tokens=30)
        assert out.token_ids == plain(target, prompt_ids(i), max_new_tokens=30).token_ids
        assert out.stats.tree_nodes > out.stats.drafted_tokens
        branch_accepts += out.stats.branch_accepts
    if b >= 3:
        assert branch_accepts > 0, "no extra candidate was ever accepted: the test proves little"


def test_tree_on_gpt2(tokenizer):
    target = loaded(make_model("gpt2", seed=3), tokenizer)
    draft = loaded(perturbed(target.model, 0.5), tokenizer)
    gen = SpeculativeGenerator(target, draft, BranchEvery(4, 2, 1))
    for i in range(3):
        assert gen.generate(prompt_ids(i), max_new_tokens=20).token_ids == \
            plain(target, prompt_ids(i), max_new_tokens=20).token_ids


def test_tree_caches_equal_fresh_prefill(tiny_pair):
    target, draft = tiny_pair
    gen = SpeculativeGenerator(target, draft, BranchEvery(4, 3, 1))
    branch_accepts = 0
    for i in range(4):
        ids = prompt_ids(i)
        rounds, stats, _ = gen._start(ids, 30, 0.0, 0, 1.0, None, None, False)
        committed = list(ids)
        for chunk in rounds:
            committed.extend(chunk)
            for runner in (gen.engine.target, gen.engine.drafter.runner):
                assert committed[: len(runner.tokens)] == runner.tokens
                _cache_matches_fresh_prefill(runner)
        branch_accepts += stats.branch_accepts
    assert branch_accepts > 0


def test_eos_inside_a_branch(tokenizer):
    """Find a round where an extra candidate was accepted, make that token the EOS, rerun."""
    model = make_model("llama", seed=0)
    target = loaded(model, tokenizer)
    draft = loaded(perturbed(model, 0.6), tokenizer)
    gen = SpeculativeGenerator(target, draft, BranchEvery(4, 5, 1))
    prompts = [prompt_ids(i) for i in range(5)]
    prompts += [[(7 * i + 3 * j) % 250 for j in range(6)] for i in range(10)]
    for ids in prompts:
        rounds, stats, _ = gen._start(ids, 30, 0.0, 0, 1.0, None, None, False)
        new: list[int] = []
        before = 0
        for chunk in rounds:  # stats are updated before each chunk is yielded
            new.extend(chunk)
            hit, before = stats.branch_accepts > before, stats.branch_accepts
            if hit and stats.stop_reason == "":
                alt = chunk[-2]  # the accepted candidate, followed by its bonus token
                if new.index(alt) == len(new) - 2:
                    break
        else:
            continue
        model.generation_config.eos_token_id = alt
        try:
            out = gen.generate(ids, max_new_tokens=30)
            assert out.stats.stop_reason == "eos"
            assert out.token_ids == new[:-1]
            assert out.token_ids == plain(target, ids, max_new_tokens=30).token_ids
        finally:
            model.generation_config.eos_token_id = None
        return
    pytest.fail("no accepted extra candidate found to put an EOS in")
