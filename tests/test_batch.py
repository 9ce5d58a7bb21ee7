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


@pytest.mark.parametrize("chunk", [128, 1], ids=["whole-prompts", "chunked-prefill"])
def test_sampling_exact_with_sequences_batched(virtual_clock, chunk):
    """N seeded samples, 8 sequences per step, each with its own seed: the continuation's
    distribution is the target's (chi-square over the first two and last two tokens); also
    with prompts fed one row per step and prefixes copied between slots."""
    target, draft = layered_pair(vocab=V, seed=3, init=0.1)
    prompt, length, cfg = [2, 2, 2, 1], 3, SamplingConfig(1.0)
    gen = SpeculativeGenerator(target, draft, "fixed", {"k": 2})
    engine = BatchEngine(lambda pol: gen.new_engine(make_policy("fixed", {"k": 2})), max_batch=8,
                         prefill_chunk=chunk)
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
    for s in engine.active:
        s.pending = None  # running: their prompts are fed (caps are for running sequences)
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


@pytest.mark.parametrize("runtime", ["auto", "compiled-fp32"])
def test_slots_reuse_engines_and_shared_prefix(pair64, runtime):
    """Joining sequences reuse finished ones' engines (no new KV cache per request); the
    target cache keeps the prefix shared with the slot's previous prompt and the prompt is
    fed with the first shared forward (no prefill of its own), yet every text equals
    generate() alone."""
    gen = SpeculativeGenerator(*pair64, "fixed", {"k": 3}, runtime=runtime)
    system = [7, 3, 9, 11, 2, 5, 8, 1, 4]
    prompts = [system + p for p in rand_prompts(6, seed=31)]
    ref = _texts_alone(gen, prompts, 16)
    built, starts, prefills = [], [], []

    def make(pol):
        engine = gen.new_engine(pol or make_policy("fixed", {"k": 3}))
        r, sync = engine.target, engine.target._sync_prefix
        r._sync_prefix = lambda seq, keep, *a: starts.append(sync(seq, keep, *a)) or starts[-1]
        r.prefill = lambda *a, **k: prefills.append(a)
        built.append(engine)
        return engine

    got, seqs = _run_batch(BatchEngine(make, max_batch=2), prompts, 16)
    assert got == ref
    assert len(built) == 2  # two slots, six requests
    assert not prefills
    assert starts.count(0) == 4  # a fresh engine only (its start of generation and first forward)


def test_cost_fit_skips_steps_that_feed_prompts(pair64):
    """The first verify of a joining sequence also feeds its prompt, and a step may feed
    prompt chunks: such a step's time is no sample of the cost of verify rows; later steps are."""
    gen = SpeculativeGenerator(*pair64, "heuristic")
    engine = BatchEngine(lambda pol: gen.new_engine(make_policy("heuristic")), max_batch=4,
                         budget=DraftBudget())
    for i, p in enumerate(rand_prompts(3, seed=41)):
        engine.add(i, p * 4, SamplingConfig(), StopRules(12))
    engine.step()
    assert engine.budget.cost.points == []
    while any(s.pending is not None or s.stats.target_forwards == 0 for s in engine.active):
        engine.step()  # prompt chunks or a first verify: no sample
        assert engine.budget.cost.points == []
    engine.step()
    assert len(engine.budget.cost.points) == 1
    engine.add(9, [1, 2, 3, 4], SamplingConfig(), StopRules(12))
    engine.step()
    assert len(engine.budget.cost.points) == 1


def test_copy_prefix_gives_the_same_forward(pair64):
    """A prefix copied from another runner's cache gives bit-identical outputs to computing it."""
    from adaspec.serve.batch import copy_prefix

    target = pair64[0].model
    a, b, c = _runner(target, True), _runner(target, True), _runner(target, True)
    prompt = rand_prompts(1, seed=51)[0] * 5
    a.prefill(prompt[:-1])
    b.prefill([9, 9, 9])  # b holds other text: the copy replaces it
    copy_prefix(a, b, len(prompt) - 3)
    assert b.tokens == prompt[:-3]
    ref = c.forward(prompt + [1, 2], 3, hidden=True)
    out = b.forward(prompt + [1, 2], 3, hidden=True)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.hidden, ref.hidden)


@pytest.mark.parametrize("runtime", ["auto", "compiled-fp32"])
def test_chunked_prefill_and_copied_prefixes_identical(pair64, runtime, monkeypatch):
    """Prompts fed 5 rows per step alongside decoding sequences, and a shared system prefix
    copied between slots (at least the system prompt each time): every text equals
    generate() alone, and chunks and copies happened."""
    import adaspec.serve.batch as B

    gen = SpeculativeGenerator(*pair64, "heuristic", runtime=runtime)
    system = [7, 3, 9, 11, 2, 5, 8, 1, 4, 6, 10, 12]
    prompts = [system + p * 3 for p in rand_prompts(7, seed=61)]
    ref = _texts_alone(gen, prompts, 16)
    copies, chunks = [], []
    copy = B.copy_prefix
    monkeypatch.setattr(B, "copy_prefix", lambda src, dst, n: copies.append(n) or copy(src, dst, n))
    feed = BatchEngine._feed_prompts

    def spy(self):
        calls = feed(self)
        chunks.extend(len(c.seq) for _, c in calls)
        return calls

    monkeypatch.setattr(BatchEngine, "_feed_prompts", spy)
    engine = BatchEngine(lambda pol: gen.new_engine(pol or make_policy("heuristic")), max_batch=3,
                         budget=DraftBudget(), prefill_chunk=5)
    got, _ = _run_batch(engine, prompts, 16)
    assert got == ref
    assert chunks and copies and all(n >= len(system) for n in copies)


def test_a_lone_prompt_goes_whole_then_others_are_chunked(pair64):
    """Nobody decoding: the first prompt is fed whole with its first verify (no chunk call);
    a prompt joining a decoding sequence is fed ``prefill_chunk`` rows per step."""
    gen = SpeculativeGenerator(*pair64, "fixed", {"k": 2})
    engine = BatchEngine(lambda pol: gen.new_engine(make_policy("fixed", {"k": 2})), max_batch=2,
                         prefill_chunk=4)
    first = engine.add(0, list(range(1, 30)), SamplingConfig(), StopRules(40))
    assert engine._feed_prompts() == [] and first.pending is None
    engine.step()
    assert first.engine.target.tokens[:28] == list(range(1, 29))
    second = engine.add(1, list(range(30, 50)), SamplingConfig(), StopRules(40))
    calls = engine._feed_prompts()
    assert [(s, len(c.seq)) for s, c in calls] == [(second, 4)] and second.pending is not None
    steps = 0
    while second.pending is not None:
        engine.step()
        steps += 1
    assert steps == 5  # 19 prompt rows: 4 chunks of 4, then the last 3 go with its first verify
