"""Verification rules as pure functions, and the sampling transforms.

The engine-level distribution tests (every policy, trees, reduced-vocabulary drafts, the
power of the test against a biased verifier) are in ``test_distribution.py``.
"""

from __future__ import annotations

import torch
from conftest import loaded, make_model
from scipy.stats import chi2

from adaspec.api import SpeculativeGenerator
from adaspec.sampling import SamplingConfig, processed_probs
from adaspec.verify import verify_greedy, verify_sampling


def test_verify_sampling_committed_token_is_distributed_as_p():
    """One drafted token: the committed token (x if accepted, else the recovered sample) ~ p.

    q puts zero mass on token 5 (as a reduced-vocabulary draft does) so only the residual
    can produce it; 20,000 draws, 6 cells, each expecting >= 5.
    """
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(2, 6, generator=g), -1)  # [K+1, V]
    q = torch.softmax(torch.randn(1, 6, generator=g) * 2, -1)
    q[0, 5] = 0
    q /= q.sum()
    n, counts, rejected = 20000, torch.zeros(6), 0
    for _ in range(n):
        x = int(torch.multinomial(q[0], 1, generator=g))
        v = verify_sampling([x], q, p, g)
        counts[x if v.accepted else v.token] += 1
        rejected += v.accepted == 0
    exp = p[0] * n
    assert float(exp.min()) >= 5
    assert 0.1 * n < rejected < 0.9 * n  # both branches are exercised
    assert counts[5] > 0  # reachable only through the residual
    stat = float(((counts - exp) ** 2 / exp).sum())
    assert chi2.sf(stat, 5) > 1e-3


def test_verify_sampling_rejects_impossible_tokens_and_accepts_sure_ones():
    p = torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.5, 0.5, 0.0]])
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        v = verify_sampling([0], q, p, g)  # p(0) = 0: always rejected, recovered from the residual
        assert (v.accepted, v.token, v.kind) == (0, 1, "recovered")
        v = verify_sampling([1], q, p, g)  # p(1) >= q(1): always accepted, bonus from p_2
        assert v.accepted == 1 and v.kind == "bonus"


def test_verify_greedy_rules():
    # argmax per row: [1, 0, 2]
    logits = torch.tensor([[0.0, 5, 1], [3, 0, 0], [0, 0, 9]])
    v = verify_greedy([1, 0], logits)  # both match: bonus = argmax of the last row
    assert (v.accepted, v.token, v.kind) == (2, 2, "bonus")
    v = verify_greedy([1, 2], logits)  # second mismatches: commit the target's 0 there
    assert (v.accepted, v.token, v.kind) == (1, 0, "recovered")
    v = verify_greedy([2, 0], logits)  # first mismatches: nothing after it counts
    assert (v.accepted, v.token, v.kind) == (0, 1, "recovered")
    v = verify_greedy([], logits[:1])  # no draft: plain decoding step
    assert (v.accepted, v.token, v.kind) == (0, 1, "bonus")


def test_same_seed_same_output():
    target = loaded(make_model("llama", vocab=8, hidden=32, seed=11, init=0.12))
    gen = SpeculativeGenerator(target, target, "fixed", {"k": 3})
    a = gen.generate([1, 2], max_new_tokens=10, temperature=1.0, seed=7).token_ids
    b = gen.generate([1, 2], max_new_tokens=10, temperature=1.0, seed=7).token_ids
    c = gen.generate([1, 2], max_new_tokens=10, temperature=1.0, seed=8).token_ids
    assert a == b and a != c


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    out = processed_probs(probs.log(), SamplingConfig(1.0, top_p=0.8))
    assert torch.allclose(out, torch.tensor([0.625, 0.375, 0, 0]))
    out = processed_probs(probs.log(), SamplingConfig(1.0, top_k=1))
    assert out.tolist() == [1.0, 0, 0, 0]
    out = processed_probs(probs.log(), SamplingConfig(0.5))  # p^(1/T), renormalised
    want = probs ** 2 / (probs ** 2).sum()
    assert torch.allclose(out, want, atol=1e-6)
