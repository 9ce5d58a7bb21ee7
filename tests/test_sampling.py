"""Sampling is exact: speculative sampling reproduces the target's own distribution.

Fixed seeds make every test deterministic (it cannot flake); the sample sizes make a
wrong algorithm fail by a wide margin (e.g. skipping the residual distribution).
"""

from __future__ import annotations

import pytest
import torch
from conftest import loaded, make_model, perturbed
from scipy.stats import chisquare

from adaspec.api import SpeculativeGenerator
from adaspec.sampling import SamplingConfig, processed_probs
from adaspec.verify import verify_greedy, verify_sampling


def _chi2_pvalue(counts: dict, probs: dict, n: int) -> float:
    """Chi-square goodness of fit, pooling cells with expected count < 5."""
    obs, exp, pool_o, pool_e = [], [], 0.0, 0.0
    for key, p in probs.items():
        if p * n >= 5:
            obs.append(counts.get(key, 0))
            exp.append(p * n)
        else:
            pool_o += counts.get(key, 0)
            pool_e += p * n
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    total = sum(exp)
    exp = [e * sum(obs) / total for e in exp]  # remove float round-off in the total
    return float(chisquare(obs, exp).pvalue)


def test_verify_sampling_first_token_is_distributed_as_p():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(2, 6, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(1, 6, generator=g) * 2, -1)
    n, counts = 20000, torch.zeros(6)
    for _ in range(n):
        x = int(torch.multinomial(q[0], 1, generator=g))
        v = verify_sampling([x], q, p, g)
        counts[x if v.accepted else v.token] += 1
    pv = _chi2_pvalue({i: int(c) for i, c in enumerate(counts)}, {i: float(p[0, i]) for i in range(6)}, n)
    assert pv > 1e-3


def test_verify_greedy_rules():
    logits = torch.tensor([[0.0, 5, 1], [3, 0, 0], [0, 0, 9]])
    assert verify_greedy([1, 0], logits) == verify_greedy([1, 0], logits)
    v = verify_greedy([1, 0], logits)
    assert (v.accepted, v.token, v.kind) == (2, 2, "bonus")
    v = verify_greedy([1, 2], logits)
    assert (v.accepted, v.token, v.kind) == (1, 0, "recovered")
    v = verify_greedy([], logits[:1])
    assert (v.accepted, v.token) == (0, 1)


VOCAB = 8


@pytest.fixture(scope="module")
def small_pair():
    # a small init keeps the distributions spread out even after temperature / top-k / top-p
    target = make_model("llama", vocab=VOCAB, hidden=32, seed=11, init=0.12)
    draft = perturbed(target, 1.5, seed=4)
    return loaded(target), loaded(draft)


def _exact_two_token_dist(target, prompt, cfg: SamplingConfig) -> dict:
    model = target.model
    with torch.no_grad():
        p1 = processed_probs(model(torch.tensor([prompt])).logits[0, -1], cfg)
        out = {}
        for a in range(VOCAB):
            if p1[a] == 0:
                continue
            p2 = processed_probs(model(torch.tensor([prompt + [a]])).logits[0, -1], cfg)
            for b in range(VOCAB):
                if p2[b] > 0:
                    out[(a, b)] = float(p1[a] * p2[b])
    return out


@pytest.mark.parametrize(("cfg", "k"),
                         [(SamplingConfig(1.0), 3), (SamplingConfig(0.7, top_k=5, top_p=0.9), 2)],
                         ids=["t1-k3", "t0.7-topk5-topp0.9-k2"])
def test_speculative_sampling_matches_target_distribution(small_pair, cfg, k):
    target, draft = small_pair
    prompt = [1, 2, 3]
    exact = _exact_two_token_dist(target, prompt, cfg)
    gen = SpeculativeGenerator(target, draft, "fixed", {"k": k})
    n = 2000
    counts: dict = {}
    rejections = 0
    for seed in range(n):
        out = gen.generate(prompt, max_new_tokens=2, temperature=cfg.temperature, top_k=cfg.top_k,
                           top_p=cfg.top_p, seed=seed)
        key = tuple(out.token_ids)
        counts[key] = counts.get(key, 0) + 1
        rejections += out.stats.drafted_tokens - out.stats.accepted_tokens
    assert set(counts) <= set(exact), "sampled a continuation the target gives probability 0"
    assert rejections > n * 0.1, "the draft must disagree often for this test to mean anything"
    assert _chi2_pvalue(counts, exact, n) > 1e-3


def test_draft_distribution_alone_would_fail(small_pair):
    """Sanity check of the test's power: the draft's own samples are rejected by the same test."""
    target, draft = small_pair
    cfg = SamplingConfig(1.0)
    exact = _exact_two_token_dist(target, [1, 2, 3], cfg)
    gen = SpeculativeGenerator(draft, None)
    n = 2000
    counts: dict = {}
    for seed in range(n):
        key = tuple(gen.generate([1, 2, 3], max_new_tokens=2, temperature=1.0, seed=seed).token_ids)
        counts[key] = counts.get(key, 0) + 1
    support = {k: exact.get(k, 0.0) for k in set(exact) | set(counts)}
    if any(v == 0 for k, v in support.items() if counts.get(k)):
        return  # draft produced impossible continuations: clearly distinguishable
    assert _chi2_pvalue(counts, exact, n) < 1e-6


def test_same_seed_same_output(small_pair):
    target, draft = small_pair
    gen = SpeculativeGenerator(target, draft, "fixed", {"k": 3})
    a = gen.generate([1, 2], max_new_tokens=10, temperature=1.0, seed=7).token_ids
    b = gen.generate([1, 2], max_new_tokens=10, temperature=1.0, seed=7).token_ids
    assert a == b


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    out = processed_probs(probs.log(), SamplingConfig(1.0, top_p=0.8))
    assert torch.allclose(out, torch.tensor([0.625, 0.375, 0, 0]))
    out = processed_probs(probs.log(), SamplingConfig(1.0, top_k=1))
    assert out.tolist() == [1.0, 0, 0, 0]
