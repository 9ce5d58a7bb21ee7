"""The batch engine: many sequences per target forward, each exactly as if it ran alone.

- the compiled batched forward gives every sequence bit-identical logits to its own runner's
  forward (chains and trees, different cache lengths);
- greedy texts through :class:`BatchEngine` (sequences joining and leaving, fixed and
  adaptive policies, with the batch-level draft budget) equal ``generate()`` alone, on the
  compiled and the eager runtime;
- sampling with per-request seeds stays exact with sequences batched together (chi-square
  against the enumerated target distribution, as in test_distribution);
- the draft budget drafts less in a full batch than for one sequence; a failing sequence
  ends alone.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import layered_pair, rand_prompts
from test_distribution import N, V, chi_square_p, exact_distribution, marginal

from adaspec.api import SpeculativeGenerator
from adaspec.engine import StopRules, VerifyCall
from adaspec.policies import make_policy
from adaspec.sampling import SamplingConfig
from adaspec.serve.batch import BatchEngine, CostFit, DraftBudget, Sequence
from adaspec.types import GenerationStats

pytest.importorskip("numba")


@pytest.fixture(scope="module")
def pair64():
    return layered_pair()


def _runner(model, native=False, encoding=None):
    from adaspec.runtime.compiled_runner import CompiledRunner

    return CompiledRunner(model, native=native, encoding=encoding)


@pytest.mark.parametrize("fmt", [(False, None), (True, None), (True, "q8_0")], ids=["fp32", "native", "q8_0"])
def test_batched_forward_bit_identical(pair64, fmt):
    from adaspec.runtime.batched import batchable, run_calls

    target = pair64[0].model
    _runner = lambda m: globals()["_runner"](m, *fmt)  # noqa: E731
    prompts = rand_prompts(4, seed=11)
    prompts[1] = prompts[1] * 6  # a longer cache than the others
    drafts = [[1, 2, 3], [], [5, 6, 7, 8, 9], [4, 4]]
    pairs = [(_runner(target), _runner(target)) for _ in prompts]
    calls, alone = [], []
    for (a, b), p, d in zip(pairs, prompts, drafts):
        for r in (a, b):
            r.prefill(p[:-1])
        if d == [4, 4]:  # a token tree: chain 4, 4 plus a sibling 7 of the first node
            calls.append(VerifyCall(a, p, 4, True, [4, 4, 7], [-1, 0, -1]))
            alone.append(b.forward_tree(p, [4, 4, 7], [-1, 0, -1], hidden=True))
        else:
            calls.append(VerifyCall(a, p + d, len(d) + 1, True))
            alone.append(b.forward(p + d, len(d) + 1, hidden=True))
    for _step in range(2):  # the second step crops and reuses the caches the first one wrote
        assert batchable(calls)
        for out, ref in zip(run_calls(calls), alone):
            assert torch.equal(out.logits, ref.logits) and torch.equal(out.hidden, ref.hidden)
        assert [a.tokens for a, _ in pairs] == [b.tokens for _, b in pairs]
        nxt = [p + [int(ref.logits[0].argmax()), 3, 1] for p, ref in zip(prompts, alone)]
        calls = [VerifyCall(a, s, 3, True) for (a, _), s in zip(pairs, nxt)]
        alone = [b.forward(s, 3, hidden=True) for (_, b), s in zip(pairs, nxt)]


def _texts_alone(gen, prompts, max_new):
    return [gen.generate(p, max_new_tokens=max_new).token_ids for p in prompts]


def _run_batch(engine: BatchEngine, prompts, max_new, sampling=None, policies=None):
    """Feed prompts through the batch (joining as slots free up); new ids per prompt."""
    pending = list(enumerate(prompts))
    out: dict[int, list[int]] = {}
    seqs: dict[int, Sequence] = {}
    while pending or engine.active:
        while pending and engine.free:
            i, p = pending.pop(0)
            cfg = sampling(i) if sampling else SamplingConfig()
            seqs[i] = engine.add(i, p, cfg, StopRules(max_new), policies(i) if policies else None)
        for ev in engine.step():
            if ev.finished:
                assert ev.seq.error is None, ev.seq.error
                out[ev.seq.key] = ev.seq.new
    return [out[i] for i in range(len(prompts))], seqs


@pytest.mark.parametrize("runtime", ["auto", "compiled-fp32", "eager"])
@pytest.mark.parametrize("policy", [("fixed", {"k": 4}), ("heuristic", {})])
def test_batch_greedy_identical_to_alone(pair64, runtime, policy):
    gen = SpeculativeGenerator(*pair64, policy[0], policy[1], runtime=runtime)
    prompts = rand_prompts(7, seed=5)
    ref = _texts_alone(gen, prompts, 24)
    engine = BatchEngine(lambda pol: gen.new_engine(pol or make_policy(*policy)), max_batch=3,
                         budget=DraftBudget())
    got, seqs = _run_batch(engine, prompts, 24)
    assert got == ref
    assert sum(s.stats.accepted_tokens for s in seqs.values()) > 0  # speculation ran
    assert sum(s.stats.drafted_tokens - s.stats.accepted_tokens for s in seqs.values()) > 0  # rejected


def test_budget_drafts_less_in_a_full_batch():
    budget = DraftBudget(max_k=8)
    budget.cost.a, budget.cost.b, budget.draft_cost = 0.05, 0.004, 0.0005
    seqs = [Sequence(i, None, GenerationStats()) for i in range(8)]
    for s in seqs:
        budget.counts[id(s)] = [30.0, 10.0]  # alpha = 0.74
    one = budget.caps(seqs[:1])[id(seqs[0])]
    full = budget.caps(seqs)
    assert one >= 5 and max(full.values()) < one
    budget.counts[id(seqs[0])] = [90.0, 1.0]  # a sequence that is accepted more drafts more
    full = budget.caps(seqs)
    assert full[id(seqs[0])] > full[id(seqs[1])]


def test_cost_fit_recovers_a_line():
    fit = CostFit()
    for rows in (3, 8, 16, 24, 8, 3):
        fit.add(rows, 0.02 + 0.003 * rows)
    assert fit.a == pytest.approx(0.02) and fit.b == pytest.approx(0.003)


def test_failing_sequence_ends_alone(pair64):
    gen = SpeculativeGenerator(*pair64, "fixed", {"k": 3})
    prompts = rand_prompts(3, seed=9)
    ref = _texts_alone(gen, prompts, 12)
    engine = BatchEngine(lambda pol: gen.new_engine(make_policy("fixed", {"k": 3})), max_batch=3)
    seqs = [engine.add(i, p, SamplingConfig(), StopRules(12)) for i, p in enumerate(prompts)]

    def broken(*a, **k):
        raise RuntimeError("boom")

    seqs[1].engine.drafter.propose_steps = broken
    done = {}
    while engine.active:
        for ev in engine.step():
            if ev.finished:
                done[ev.seq.key] = ev.seq
    assert isinstance(done[1].error, RuntimeError)
    assert [done[0].new, done[2].new] == [ref[0], ref[2]]


def test_sampling_exact_with_sequences_batched(virtual_clock):
    """N seeded samples, 8 sequences per step, each with its own seed: the continuation's
    distribution is the target's (chi-square over the first two and last two tokens)."""
    target, draft = layered_pair(vocab=V, seed=3, init=0.1)
    prompt, length, cfg = [2, 2, 1], 3, SamplingConfig(1.0)
    gen = SpeculativeGenerator(target, draft, "fixed", {"k": 2})
    engine = BatchEngine(lambda pol: gen.new_engine(make_policy("fixed", {"k": 2})), max_batch=8)
    got, seqs = _run_batch(engine, [prompt] * N, length, sampling=lambda i: SamplingConfig(1.0, seed=i))
    counts = Counter(tuple(g) for g in got)
    assert sum(s.stats.drafted_tokens - s.stats.accepted_tokens for s in seqs.values()) > 100
    exact = exact_distribution(target.model, prompt, cfg, length)
    for window in ((0, 2), (1, 3)):
        sub: Counter = Counter()
        for k, n in counts.items():
            sub[k[window[0]:window[1]]] += n
        assert chi_square_p(sub, marginal(exact, window)) > 5e-4
    # the same seed gives the same sample alone and in the batch
    for i in (0, 1, 7):
        alone = gen.generate(prompt, max_new_tokens=length, temperature=1.0, seed=i).token_ids
        assert alone == got[i]


def test_one_call_runs_on_its_runner(pair64):
    from adaspec.runtime.batched import batchable

    r = _runner(pair64[0].model)
    assert not batchable([VerifyCall(r, [1, 2], 1, False)])
    assert not batchable([VerifyCall(r, [1, 2], 1, False)] * 2)  # one runner twice


def test_lone_sequence_keeps_its_policy_budget(pair64):
    """One sequence: no cap (drafts as its policy says); a full batch of adaptive sequences is
    capped; fixed policies never are."""
    gen = SpeculativeGenerator(*pair64, "heuristic")
    engine = BatchEngine(lambda pol: gen.new_engine(pol or make_policy("heuristic")), max_batch=8,
                         budget=DraftBudget())
    engine.budget.cost.a, engine.budget.cost.b = 0.01, 0.01  # rows as dear as a tenth of a forward
    first = engine.add(0, [1, 2, 3], SamplingConfig(), StopRules(8))
    engine._set_caps()
    assert first.engine.cap is None
    for i in range(1, 8):
        engine.add(i, [1, 2, 3 + i], SamplingConfig(), StopRules(8))
    fixed = engine.active.pop()
    engine.active.append(BatchEngine(lambda pol: gen.new_engine(make_policy("fixed")), 1).add(
        9, [4, 5], SamplingConfig(), StopRules(8)))
    engine._set_caps()
    caps = [s.engine.cap for s in engine.active]
    assert caps[-1] is None and all(c is not None and c < 5 for c in caps[:-1]), caps
    del fixed


def test_batch_model_plus_ngram_identical(pair64):
    """A model + n-gram drafter (MixedDrafter): model rounds join the shared draft forwards."""
    target, draft = pair64
    gen = SpeculativeGenerator(target, [draft, "ngram"], "fixed", {"k": 3})
    prompts = [p * 3 for p in rand_prompts(5, seed=21)]  # repeats: the n-gram source finds matches
    ref = _texts_alone(gen, prompts, 20)
    engine = BatchEngine(lambda pol: gen.new_engine(make_policy("fixed", {"k": 3})), max_batch=5)
    got, seqs = _run_batch(engine, prompts, 20)
    assert got == ref
    rounds = Counter()
    for s in seqs.values():
        rounds.update(s.engine.drafter.rounds)
    assert rounds["model"] > 0 and rounds["ngram"] > 0
