"""The model-free n-gram drafter: the matcher on hand-made sequences, greedy identity and the
exact sampling distribution with n-gram drafts (q one-hot), and its cost at 4k tokens."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import torch
from conftest import layered_pair, loaded, make_model, perturbed
from scipy.stats import chi2

from adaspec.api import SpeculativeGenerator
from adaspec.bench.methods import MethodError, parse_methods
from adaspec.checkpoints.loader import LoadedModel
from adaspec.drafters.mixed import SOURCES, MixedDrafter
from adaspec.drafters.model import ModelDrafter
from adaspec.drafters.ngram import Match, NgramDrafter, NgramIndex
from adaspec.drafters.registry import DraftSpec, parse_draft
from adaspec.engine import Engine, StopRules
from adaspec.errors import InvalidArgumentError, PolicyArgumentError
from adaspec.policies.context import ContextPolicy
from adaspec.policies.fixed import FixedPolicy
from adaspec.predictors.source_choice import Plan, SourceChoice, prior_survival
from adaspec.sampling import SamplingConfig, processed_probs
from adaspec.types import DraftRequest, GenerationStats

# ---------------------------------------------------------------------------- the matcher


def index_of(seq: list[int], **kw) -> NgramIndex:
    idx = NgramIndex(**kw)
    idx.sync(seq)
    return idx


def test_longest_match_wins_over_a_more_recent_shorter_one():
    # suffix [1, 2, 3]: "1 2 3 -> 7" early (3-gram), "2 3 -> 9" later (only a 2-gram)
    seq = [1, 2, 3, 7, 8, 5, 2, 3, 9, 6, 1, 2, 3]
    m = index_of(seq).match(3)
    assert m.length == 3 and m.tokens == (7, 8, 5)


def test_most_recent_occurrence_of_the_longest_ngram_wins():
    seq = [4, 5, 1, 4, 5, 2, 4, 5]
    m = index_of(seq).match(2)
    assert m.tokens == (2, 4) and m.length == 2 and m.count == 2
    assert m.agreement == 0.5  # "4 5" was followed by 1 once and by 2 once


def test_match_length_extends_beyond_n_max_and_is_capped():
    seq = list(range(20)) + [99] + list(range(20))
    assert index_of(seq, n_max=4).match(1).length == 20  # measured backwards, not just n_max
    assert index_of(seq, n_max=4, max_match=6).match(1).length == 6


def test_no_match_and_n_min():
    assert index_of([1, 2, 3, 4]).match(4).length == 0
    assert index_of([]).match(4).tokens == ()
    assert index_of([1, 2, 3, 1], n_min=2).match(2).length == 0  # a 1-gram match only
    assert index_of([1, 2, 3, 1]).match(2).tokens == (2, 3)


def test_periodic_text_continues_its_period():
    # the occurrence ends right before the suffix: the copy runs into the tokens it copies
    assert index_of([5, 1, 2, 1, 2]).match(5).tokens == (1, 2, 1, 2, 1)
    assert index_of([3, 3, 3]).match(4).tokens == (3, 3, 3, 3)


def test_incremental_index_equals_a_rebuild_and_a_brute_force_search():
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 5, (300,), generator=g).tolist()
    inc = NgramIndex(n_max=6)
    for t in range(1, len(seq) + 1):
        inc.sync(seq[:t])  # grows one token at a time, as rounds commit
        if t % 37 == 0 or t == len(seq):
            m, fresh = inc.match(6), index_of(seq[:t], n_max=6).match(6)
            assert m == fresh
            assert m == brute_force(seq[:t], 6, n_max=6)
    inc.sync(seq[:100])  # a cut: rebuilt
    assert inc.match(6) == index_of(seq[:100], n_max=6).match(6)


def brute_force(text: list[int], budget: int, n_max: int, max_match: int = 64):
    """The rule by definition: longest n (<= n_max), then most recent earlier occurrence."""
    size = len(text)
    for n in range(min(n_max, size - 1), 0, -1):
        ends = [e for e in range(n - 1, size - 1) if text[e - n + 1:e + 1] == text[size - n:]]
        if ends:
            e = ends[-1]
            length = n
            while length < max_match and e - length >= 0 and text[e - length] == text[size - 1 - length]:
                length += 1
            out = []
            for j in range(budget):
                src = e + 1 + j
                out.append(text[src] if src < size else out[src - size])
            first = text[e + 1]
            follow = sum(1 for x in ends if text[x + 1] == first)
            return Match(length, len(ends), follow / len(ends), tuple(out))
    return Match()


def test_matcher_cost_at_4k_tokens_is_tiny():
    """Index a 4,096-token text, then 200 rounds that commit 3 tokens and look up 16: the
    per-round cost must be far below a model forward (measured ~10-30 us here)."""
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, 2000, (4096 + 600,), generator=g).tolist()
    d = NgramDrafter(vocab_size=2000)
    t0 = time.process_time()
    d.prefill(seq[:4096])
    build = time.process_time() - t0
    t0 = time.process_time()
    for r in range(200):
        d.match(seq[:4096 + 3 * r], 16)
    per_round = (time.process_time() - t0) / 200
    assert build < 0.5 and per_round < 5e-4, (build, per_round)


# ---------------------------------------------------------------------------- the engine


def run(model, drafter, prompt, cfg: SamplingConfig, n: int, k: int = 6) -> tuple[list[int], GenerationStats]:
    eng = Engine(model, model.config.vocab_size, 256, drafter, FixedPolicy(k))
    stats = GenerationStats()
    out: list[int] = []
    for chunk in eng.run(prompt, cfg, StopRules(n), stats):
        out.extend(chunk)
    return out, stats


def test_greedy_identity_with_ngram_drafts_accepted_and_rejected():
    """Random tiny models (vocabulary 8) fall into loops: the n-gram source then gets whole
    drafts accepted, and it is rejected before a loop starts or where it breaks."""
    accepted = rejected = 0
    for seed, arch in ((0, "llama"), (3, "qwen2"), (5, "llama")):
        model = make_model(arch, vocab=8, hidden=32, seed=seed, init=0.5)
        for prompt in ([1, 2, 3, 1, 2], [7, 7, 6, 5, 7], [4, 5, 6, 4, 5, 6, 4]):
            ref, _ = run(model, None, prompt, SamplingConfig(), 60)
            out, st = run(model, NgramDrafter(8), prompt, SamplingConfig(), 60)
            assert out == ref, (arch, seed, prompt)
            assert st.draft_forwards == 0
            accepted += st.accepted_tokens
            rejected += st.drafted_tokens - st.accepted_tokens
    assert accepted > 100 and rejected > 100, (accepted, rejected)


def exact_distribution(model, prompt: list[int], cfg: SamplingConfig, length: int, vocab: int) -> dict:
    """{continuation: probability} of the target's own samples, by enumeration."""
    probs: dict[tuple[int, ...], float] = {(): 1.0}
    with torch.no_grad():
        for _ in range(length):
            seqs = list(probs)
            logits = model(torch.tensor([prompt + list(s) for s in seqs])).logits[:, -1].float()
            nxt = {}
            for s, row in zip(seqs, logits):
                p = processed_probs(row, cfg)
                for x in range(vocab):
                    if p[x] > 0:
                        nxt[s + (x,)] = probs[s] * float(p[x])
            probs = nxt
    return probs


def chi_square_p(counts: Counter, probs: dict) -> float:
    n = sum(counts.values())
    assert not set(counts) - set(probs)
    expected = {key: p * n for key, p in probs.items()}
    assert min(expected.values()) >= 5, min(expected.values())
    stat = sum((counts.get(key, 0) - e) ** 2 / e for key, e in expected.items())
    return float(chi2.sf(stat, len(probs) - 1))


def pooled(counts: Counter, probs: dict, min_expected: float) -> tuple[Counter, dict]:
    """Cells expected fewer than ``min_expected`` times merged into one ("rare",) cell."""
    n = sum(counts.values())
    rare = {key for key, p in probs.items() if p * n < min_expected}
    cell = lambda key: ("rare",) if key in rare else key  # noqa: E731
    out_counts: Counter = Counter()
    out_probs: dict = {}
    for key, c in counts.items():
        out_counts[cell(key)] += c
    for key, p in probs.items():
        out_probs[cell(key)] = out_probs.get(cell(key), 0.0) + p
    return out_counts, out_probs


def sample_counts(model, drafter_factory, prompt, cfg_t: float, n: int, length: int, k: int = 4):
    counts: Counter = Counter()
    totals = Counter()
    for seed in range(n):
        out, st = run(model, drafter_factory(), prompt, SamplingConfig(cfg_t, seed=seed), length, k=k)
        counts[tuple(out)] += 1
        totals.update(drafted=st.drafted_tokens, accepted=st.accepted_tokens)
    return counts, totals


def test_sampling_distribution_with_ngram_drafts():
    """q one-hot: accept x with probability p(x), else sample p without x. 2,500 seeded
    samples of a 2-token continuation (16 cells) against the exact distribution."""
    target, _ = layered_pair(vocab=4, seed=3, init=0.1)
    prompt = [2, 2, 1, 2, 2, 1]  # a periodic prompt: the n-gram source always proposes
    cfg = SamplingConfig(0.7)
    exact = exact_distribution(target.model, prompt, cfg, 2, 4)
    counts, totals = sample_counts(target.model, lambda: NgramDrafter(4), prompt, 0.7, 2500, 2)
    assert totals["drafted"] > 2000 and 0 < totals["accepted"] < totals["drafted"], totals
    assert chi_square_p(counts, exact) > 1e-3


# ---------------------------------------------------------------------------- API, bench


def tiny_pair8() -> tuple[LoadedModel, LoadedModel]:
    target = make_model("llama", vocab=8, hidden=32, seed=0, init=0.5)
    return loaded(target, name="tiny8"), loaded(perturbed(target, 0.6), name="tiny8-draft")


def test_api_ngram_and_mixed_drafts_are_greedy_identical():
    target, draft = tiny_pair8()
    prompts = ([1, 2, 3, 1, 2], [7, 7, 6, 5, 7], [4, 5, 6, 4, 5, 6, 4], [0, 1])
    plain = SpeculativeGenerator(target, None, "fixed")
    gens = {d: SpeculativeGenerator(target, [draft, "ngram"] if d == "mixed" else d, "fixed", {"k": 5})
            for d in ("ngram", "mixed")}
    sources: Counter = Counter()
    for p in prompts:
        ref = plain.generate(p, max_new_tokens=50).token_ids
        for name, gen in gens.items():
            res = gen.generate(p, max_new_tokens=50)
            assert res.token_ids == ref, (name, p)
            if name == "mixed":
                sources.update(res.stats.extra["source_rounds"])
            assert res.stats.extra["ngram_lookup_s"] >= 0
    assert sources["ngram"] > 5 and sources["model"] > 5, sources


def test_draft_spec_knows_its_kind_and_renders_itself_back(tmp_path):
    """``kind`` and ``arg`` are the one place that reads a draft argument: every spec parses back
    to itself, a ``head:`` spec (even one whose directory holds no head yet) is a head, and a
    loaded model renders as a list beside its sources."""
    target, draft = tiny_pair8()
    for text in ("default", "default+ngram", "ngram", "head:default", "head:x+ngram", "/some/dir"):
        spec = parse_draft(text)
        assert parse_draft(spec.arg) == spec, text
    assert [parse_draft(t).kind for t in ("none", "ngram", "model+ngram", "head:x", "head")] == \
        [None, None, "model", "head", "head"]
    loaded = parse_draft([draft, "ngram"])
    assert loaded.kind == "model" and loaded.arg == [draft, "ngram"] and parse_draft(loaded.arg) == loaded
    assert loaded.name == f"{draft.name}+ngram" and parse_draft(None).name == "none"
    assert parse_draft(None).arg is None and parse_draft("ngram").with_model("m").arg == "m+ngram"


def test_draft_arguments_and_refusals():
    target, draft = tiny_pair8()
    assert parse_draft("model+ngram") == DraftSpec("default", ("ngram",))
    assert parse_draft(["x", "ngram"]) == DraftSpec("x", ("ngram",))
    assert parse_draft("none").empty and parse_draft(None).empty
    for bad in ("ngram+ngram", "a+b", "none+ngram", []):
        with pytest.raises(InvalidArgumentError):
            parse_draft(bad)
    for policy in ("specdecpp", "ldlp", "context"):  # they need the model's hidden state / lengths
        with pytest.raises(PolicyArgumentError, match="needs a draft model"):
            SpeculativeGenerator(target, "ngram", policy)
    with pytest.raises(PolicyArgumentError, match="reads the draft model's hidden state"):
        SpeculativeGenerator(target, [draft, "ngram"], "specdecpp")
    with pytest.raises(InvalidArgumentError, match="empty"):
        SpeculativeGenerator(target, "ngram", "fixed").generate([], max_new_tokens=4)
    # policies that read q (one-hot for n-gram steps) work
    ref = SpeculativeGenerator(target, None, "fixed").generate([1, 2, 3, 1, 2], max_new_tokens=30).token_ids
    for policy in ("confidence", "entropy", "heuristic", "oracle"):
        out = SpeculativeGenerator(target, "ngram", policy).generate([1, 2, 3, 1, 2], max_new_tokens=30)
        assert out.token_ids == ref, policy


def test_bench_methods_draft_argument():
    specs = parse_methods("fixed:k=8:draft=ngram,heuristic:draft=model+ngram,fixed:4")
    assert [s.draft for s in specs] == ["ngram", "model+ngram", None]
    assert [s.needs_draft for s in specs] == [False, True, True]
    assert specs[0].args == {"k": "8"}
    assert parse_draft(specs[0].draft_arg(None)) == DraftSpec(None, ("ngram",))
    assert parse_draft(specs[1].draft_arg("M")) == DraftSpec("M", ("ngram",))
    assert specs[2].draft_arg("M") == "M"
    for bad in ("specdecpp:draft=ngram", "ldlp:draft=ngram", "fixed:draft=other+ngram", "fixed:draft=none"):
        with pytest.raises(MethodError):
            parse_methods(bad)


# ---------------------------------------------------------------------------- source choice


def measured_choice(verify_a: float = 0.02, verify_b: float = 0.002) -> SourceChoice:
    """A SourceChoice that has seen plain steps and verifies of 2..17 tokens (v(n) = a + b n)
    and one model round committing 2 tokens in 0.036 s (55 tok/s; a plain step: 45 tok/s)."""
    sc = SourceChoice()
    for n in (1, 2, 5, 9, 17, 1, 3):
        sc.update("none", 0, 0.0, 0.0, verify_a + verify_b * n, n, n - 1, 0, 1)
    sc.update("model", 0, 0.0, 0.01, verify_a + verify_b * 3, 3, 2, 1, 2)
    return sc


def test_prior_survival_grows_with_match_length_and_recurrence():
    short, long = prior_survival(2, 1.0, 8), prior_survival(20, 1.0, 8)
    assert all(a > b for a, b in zip(short, short[1:]))  # S_j falls with j
    assert all(lo < hi for lo, hi in zip(short, long))
    assert prior_survival(5, 0.5, 3) == [0.5 * x for x in prior_survival(5, 1.0, 3)]
    assert prior_survival(0, 1.0, 2) == [0.0, 0.0] and prior_survival(1, 1.0, 2) == [0.0, 0.0]


def test_source_choice_sets_the_ngram_length_from_the_match():
    sc = measured_choice()
    assert sc.verify_s(9) == pytest.approx(0.02 + 0.002 * 9, rel=1e-6)
    plans = {length: sc.plan(length, 1.0, 16) for length in (1, 2, 4, 12, 40)}
    assert plans[1].source == "model"  # below min_len: never copied
    lengths = [plans[n].length for n in (4, 12, 40) if plans[n].source == "ngram"]
    assert len(lengths) == 3 and lengths == sorted(lengths) and lengths[0] < lengths[-1], plans
    assert sc.plan(40, 1.0, 5).length <= 5 and sc.plan(40, 1.0, 16, copyable=3).length <= 3
    # an ambiguous continuation (followed something else most times) is copied less, or not at all
    amb = sc.plan(12, 0.3, 16)
    assert amb.source != "ngram" or amb.length < plans[12].length


def test_source_choice_learns_from_rejected_copies():
    sc = measured_choice()
    assert sc.plan(6, 1.0, 16).source == "ngram"
    for _ in range(30):  # copies of 5-8-token matches are always rejected at once
        sc.update("ngram", 6, 1.0, 0.0, 0.03, 8, 7, 0, 1)
    assert sc.plan(6, 1.0, 16).source != "ngram"
    assert sc.plan(40, 1.0, 16).source == "ngram"  # another class keeps its prior


def test_a_stalled_round_does_not_bend_the_cost_fits():
    """A verify (or a model draft) 10x slower than usual, as when another process takes the
    core, counts as ``clip`` times the estimate; with clip off it drags the fit with it."""
    fits = {}
    for clip in (1.5, float("inf")):
        sc = SourceChoice(clip=clip)
        sc.__dict__.update(measured_choice().__dict__, clip=clip)
        before = (sc.verify_s(9), sc._d.value)
        sc.update("none", 0, 0.0, 0.0, 10 * sc.verify_s(9), 9, 8, 0, 1)
        sc.update("model", 0, 0.0, 10 * sc._d.value, sc.verify_s(3), 3, 2, 1, 2)
        fits[clip] = (sc.verify_s(9) / before[0], sc._d.value / before[1])
    assert all(r <= 1.5 for r in fits[1.5]), fits
    assert all(r > 1.5 for r in fits[float("inf")]), fits


def test_source_choice_model_none_and_exploration():
    sc = SourceChoice()
    assert sc.plan(1, 1.0, 8) == Plan("model") and sc.plan(5, 1.0, 8) == Plan("ngram", 8)  # explore
    sc = measured_choice()
    for _ in range(20):  # the model commits 1 token per 0.06 s: slower than a plain step
        sc.update("model", 0, 0.0, 0.052, 0.028, 4, 3, 0, 1)
    assert sc.plan(1, 1.0, 8) == Plan("none")  # right after a model round
    sc.update("none", 0, 0.0, 0.0, 0.022, 1, 0, 0, 1)
    assert sc.plan(1, 1.0, 8) == Plan("model")  # re-measured after explore_every rounds
    assert SourceChoice(explore_every=10**9).reset() is None


def test_context_policy_chooses_sources_and_stays_greedy_identical():
    target, draft = tiny_pair8()
    gen = SpeculativeGenerator(target, [draft, "ngram"], "context", {"mode": "random", "k_max": 6})
    plain = SpeculativeGenerator(target, None, "fixed")
    sources: Counter = Counter()
    for p in ([1, 2, 3, 1, 2], [7, 7, 6, 5, 7], [4, 5, 6, 4, 5, 6, 4]):
        res = gen.generate(p, max_new_tokens=60)
        assert res.token_ids == plain.generate(p, max_new_tokens=60).token_ids
        sources.update(res.stats.extra["source_rounds"])
    assert sources["ngram"] > 3 and sources["model"] > 3, sources


def test_sampling_distribution_with_mixed_sources():
    """Rounds draft from the n-gram source, the model or nothing (a deterministic rule on the
    match length); 1,000 seeded samples of a 2-token continuation against the exact one
    (every cell expects >= 23)."""
    target, draft = layered_pair(vocab=4, seed=3, init=0.1)
    prompt = [2, 2, 1, 2, 2, 1]
    exact = exact_distribution(target.model, prompt, SamplingConfig(0.7), 2, 4)
    used: Counter = Counter()

    def factory() -> MixedDrafter:
        def rule(m, budget):
            used[SOURCES[m.length % 3]] += 1
            return SOURCES[m.length % 3]

        return MixedDrafter(ModelDrafter(draft, 4), NgramDrafter(4), chooser=rule)

    counts, totals = sample_counts(target.model, factory, prompt, 0.7, 1000, 2, k=2)
    assert min(used.values()) > 100, used
    assert 0 < totals["accepted"] < totals["drafted"], totals
    assert chi_square_p(counts, exact) > 1e-3


def test_context_policy_cuts_the_copy_at_the_planned_length():
    policy = ContextPolicy(mode="random", k_max=16)
    policy._sources = measured_choice()
    drafter = NgramDrafter(64)
    for length, expect_cut in ((4, True), (40, False)):
        match = Match(length, 1, 1.0, tuple(range(16)))
        assert policy.choose_source(match, 16) == "ngram"
        planned = policy._sources.plan(length, 1.0, 16, 16).length
        draft = drafter.draft_from(match, [0] * 50, DraftRequest(16, decide=policy.decide))
        assert len(draft.tokens) == planned and (planned < 16) == expect_cut, (length, planned)


def test_sampling_distribution_with_context_chosen_sources_and_lengths():
    """The context policy picks the source and the copy's length from measured times (they
    vary run to run); 1,000 seeded samples of a 3-token continuation (27 cells) against the
    exact one."""
    target, draft = layered_pair(vocab=3, seed=3, init=0.1)
    prompt = [2, 2, 1, 2, 2, 1]
    exact = exact_distribution(target.model, prompt, SamplingConfig(0.7), 3, 3)
    counts: Counter = Counter()
    used: Counter = Counter()
    for seed in range(1000):
        policy = ContextPolicy(mode="random", k_max=3, seed=seed)
        mixed = MixedDrafter(ModelDrafter(draft, 3), NgramDrafter(3), chooser=policy.choose_source)
        eng = Engine(target.model, 3, 256, mixed, policy)
        out: list[int] = []
        for chunk in eng.run(prompt, SamplingConfig(0.7, seed=seed), StopRules(3), GenerationStats()):
            out.extend(chunk)
        counts[tuple(out)] += 1
        used.update(mixed.rounds)
    assert used["ngram"] > 300 and used["model"] > 50, used
    assert chi_square_p(*pooled(counts, exact, min_expected=5)) > 1e-3


def test_copy_dataset_splits():
    from adaspec.bench.datasets import data_root, load_dataset

    if not (data_root() / "code_alpaca").is_dir():
        pytest.skip("../shared/data is absent")
    dev, test = load_dataset("copy", "dev"), load_dataset("copy", "test")
    assert len(dev) > 20 and len(test) > 20 and not {p.id for p in dev} & {p.id for p in test}
    assert all(p.category == "copy" and "\n\n" in p.turns[0] for p in dev)


def test_cache_copies_are_planned_from_their_frequencies_in_classes_of_their_own():
    """A suffix-cache copy's prior survival is the running product of its per-token
    probabilities (an own-text match of the same length and agreement keeps the length
    prior), and what cache copies turn out to be accepted does not move own-text classes."""
    sc = measured_choice()
    assert sc.survival(6, 0.9, 3, (0.9, 0.5, 0.5)) == pytest.approx([0.9, 0.45, 0.225])
    assert sc.survival(6, 0.9, 3, (0.9,)) == pytest.approx(sc.survival(6, 0.9, 3))  # too few: the prior
    sure, weak = sc.plan(6, 0.95, 16, probs=(0.95,) * 16), sc.plan(6, 0.5, 16, probs=(0.5,) * 16)
    assert sure.source == "ngram" and (weak.source != "ngram" or weak.length < sure.length)
    own = sc.survival(6, 0.95, 4)
    for _ in range(30):  # cache copies of 5-8-token matches are always rejected at once
        sc.update("ngram", 6, 0.95, 0.0, 0.03, 8, 7, 0, 1, cached=True)
    after = sc.plan(6, 0.95, 16, probs=(0.95,) * 16)
    assert after.source != "ngram" or after.length < sure.length
    assert sc.survival(6, 0.95, 1, (0.95,))[0] < 0.2  # what was measured, not the frequencies
    assert sc.survival(6, 0.95, 4) == own  # the own-text class is untouched
    assert "3<c" in sc.report()["ngram_accept_by_class"]
