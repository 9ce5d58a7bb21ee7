"""Sampling is exact for every policy and variant: the distribution of sampled continuations
equals the target's own (docs/design.md §4), with a test that has the power to see a 5 % error.

Design (fixed seeds and a virtual clock, so every run draws the very same samples):
- a vocabulary-4 pair (:func:`conftest.layered_pair`, small weights so that distributions
  are flat), a fixed prompt, N = 2,500 seeded samples per variant, 3 new tokens (4 for the
  variants whose adaptive paths show only after a few rounds): round 1 drafts 2+ tokens;
- the exact target distribution of the continuation by enumeration (V^L sequences);
- Pearson's chi-square over all 16 cells of the first two and of the last two tokens, no
  pooling, each at 5e-4 (family-wise 1e-3): the test *asserts* that every cell expects >= 5
  samples and that nothing outside the target's support (top-k / top-p) was sampled;
- power: any alternative at total variation 0.05 from the exact distribution moves the
  chi-square statistic by a non-centrality >= N (2 * 0.05)^2 = 25 (Cauchy-Schwarz), so even
  the least detectable 5 % error gives p < 1e-3 with probability 0.55 (median p < 1e-3;
  :func:`test_sample_size_has_power`); a deliberately biased verifier exactly 5 % TV off
  (non-centrality 45) is caught with probability 0.95, and the fixed seeds catch it at
  p = 3e-5 (:func:`test_biased_verifier_is_caught`);
- counters from the policy's own decisions and the stats prove that the paths a variant
  exists for (rejections, drops, stops, token trees, accepted extra candidates) ran.

Runtimes: the variants run on ``auto`` (what users get: the compiled runtime for these Llama
models); a chain, a tree and the timing-driven ``context`` variants run on ``eager`` (the HF
modules). ``context`` adapts tau from measured draft / verify seconds, so it reads a
:class:`conftest.VirtualClock`: each HF forward advances it by a fixed cost (target 10 ms +
2 ms per token fed, draft 1 ms + 0.1 ms per token), and its decisions are deterministic too.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import layered_pair, rand_prompts
from scipy.stats import chi2, ncx2

from adaspec.api import SpeculativeGenerator
from adaspec.checkpoints.loader import LoadedModel
from adaspec.policies import make_policy
from adaspec.policies.base import Policy
from adaspec.sampling import SamplingConfig, processed_probs
from adaspec.types import Action, DraftStep, RoundContext, Verdict

V = 4
PROMPT = [2, 2, 1]  # draft and target argmax agree on its greedy path (the oracle drafts)
N = 2500
ALPHA = 1e-3
TV_ERROR = 0.05


# ---------------------------------------------------------------------------- helpers


def exact_distribution(model: torch.nn.Module, prompt: list[int], cfg: SamplingConfig,
                       length: int) -> dict[tuple[int, ...], float]:
    """{continuation: probability} of the target's own ``length``-token samples (enumeration)."""
    probs: dict[tuple[int, ...], float] = {(): 1.0}
    with torch.no_grad():
        for _ in range(length):
            seqs = list(probs)
            logits = model(torch.tensor([prompt + list(s) for s in seqs])).logits[:, -1].float()  # [S, V]
            nxt = {}
            for s, row in zip(seqs, logits):
                p = processed_probs(row, cfg)  # [V]
                for x in range(V):
                    if p[x] > 0:
                        nxt[s + (x,)] = probs[s] * float(p[x])
            probs = nxt
    return probs


def marginal(dist: dict[tuple[int, ...], float], window: tuple[int, int]) -> dict[tuple[int, ...], float]:
    out: dict[tuple[int, ...], float] = {}
    for key, p in dist.items():
        sub = key[window[0]:window[1]]
        out[sub] = out.get(sub, 0.0) + p
    return out


def chi_square_p(counts: dict[tuple[int, ...], float], probs: dict[tuple[int, ...], float]) -> float:
    """Pearson chi-square p-value over every cell of ``probs`` (none pooled).

    Asserts the test's preconditions: no sample outside the support, every expected count >= 5.
    """
    n = sum(counts.values())
    outside = set(counts) - set(probs)
    assert not outside, f"sampled continuations the target gives probability 0: {sorted(outside)[:3]}"
    expected = {k: p * n for k, p in probs.items()}
    assert min(expected.values()) >= 5, f"a cell expects {min(expected.values()):.1f} < 5 samples"
    stat = sum((counts.get(k, 0) - e) ** 2 / e for k, e in expected.items())
    return float(chi2.sf(stat, len(probs) - 1))


def worst_case_power(n: int, cells: int, tv: float = TV_ERROR, alpha: float = ALPHA) -> float:
    """P(p < alpha) for the least detectable alternative at total variation ``tv``.

    For cell probabilities p and an alternative p + d with sum |d| = 2 tv, Cauchy-Schwarz
    gives sum d^2 / p >= (2 tv)^2, so the statistic is non-central chi-square with
    non-centrality at least n (2 tv)^2 (equality when d is proportional to p).
    """
    return float(ncx2.sf(chi2.isf(alpha, cells - 1), cells - 1, n * (2 * tv) ** 2))


@dataclass
class Run:
    """Samples of one variant and the counters that show which paths ran."""

    counts: Counter = field(default_factory=Counter)
    c: Counter = field(default_factory=Counter)


def counting(policy: Policy, c: Counter) -> Policy:
    """Wrap the policy's hooks to count its decisions into ``c``: actions by name,
    ``candidates`` (extra candidates asked for) and ``budget=K`` (round budgets)."""
    begin, decide, extra = policy.begin_round, policy.decide, policy.extra_candidates

    def counted_begin(ctx: RoundContext) -> int:
        k = begin(ctx)
        c[f"budget={k}"] += 1
        return k

    def counted_decide(step: DraftStep) -> Action:
        action = decide(step)
        c[action.value] += 1
        return action

    def counted_extra(step: DraftStep) -> int:
        n = extra(step)
        c["candidates"] += n
        return n

    policy.begin_round = counted_begin  # type: ignore[method-assign]
    policy.decide = counted_decide  # type: ignore[method-assign]
    policy.extra_candidates = counted_extra  # type: ignore[method-assign]
    return policy


def sample(target: LoadedModel, draft: LoadedModel, policy: Policy, cfg: SamplingConfig, length: int,
           n: int = N, runtime: str = "auto") -> Run:
    run = Run()
    gen = SpeculativeGenerator(target, draft, counting(policy, run.c), runtime=runtime)
    for seed in range(n):
        out = gen.generate(PROMPT, max_new_tokens=length, temperature=cfg.temperature, top_k=cfg.top_k,
                           top_p=cfg.top_p, seed=seed)
        run.counts[tuple(out.token_ids)] += 1
        s = out.stats
        run.c["drafted"] += s.drafted_tokens
        run.c["accepted"] += s.accepted_tokens
        run.c["rejected"] += s.drafted_tokens - s.accepted_tokens
        run.c["tree_rounds"] += s.branch_rounds
        run.c["candidate_wins"] += s.branch_accepts
    run.c["budgets"] = sum(1 for k in run.c if k.startswith("budget="))  # distinct round budgets
    return run


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pair4() -> tuple[LoadedModel, LoadedModel]:
    """Vocabulary-4 pair; target and draft differ by TV 0.04-0.17 per position."""
    return layered_pair(vocab=V, seed=3, init=0.1)


@pytest.fixture(scope="module")
def predictors4(pair4, tmp_path_factory) -> dict[str, Path]:
    """collect -> train-predictor for every kind on the vocabulary-4 pair itself."""
    from adaspec.train.predictor import train_predictor
    from adaspec.train.traces import collect

    root = tmp_path_factory.mktemp("pred4")
    collect(*pair4, rand_prompts(42, vocab=V, seed=7), root / "traces", k=4, max_new_tokens=16,
            shard_size=14, progress=False)
    for kind in ("specdecpp", "context", "ldlp"):
        train_predictor(root / "traces", kind, root / kind, epochs=8, batch=64)
    return {kind: root / kind for kind in ("specdecpp", "context", "ldlp")}


@pytest.fixture(scope="module")
def subset_draft(pair4, tmp_path_factory) -> LoadedModel:
    """The pair's draft with a reduced output vocabulary {0, 1, 2} (q(3) = 0), saved and
    loaded through the real draft-directory path."""
    import copy

    from adaspec.checkpoints.loader import load_model
    from adaspec.checkpoints.subset_draft import build_subset_draft, save_subset_draft

    draft = pair4[1].model
    ids = torch.tensor([0, 1, 2])
    model = build_subset_draft(copy.deepcopy(draft.config), ids)
    state = {k: v for k, v in draft.state_dict().items() if k != "lm_head.weight"}
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(draft.lm_head.weight[ids])
    path = tmp_path_factory.mktemp("subset") / "draft"
    save_subset_draft(model, path, {"draft_vocab_size": 3, "target_vocab_sha256": None, "target": "tiny"})
    return load_model(str(path), dtype="fp32", role="draft")


@pytest.fixture(scope="module")
def head4(pair4, tmp_path_factory) -> str:
    """A random feature head for the vocabulary-4 target scoring {0, 1, 3} (q(2) = 0)."""
    from test_head import make_head

    path = tmp_path_factory.mktemp("head4") / "head"
    make_head(pair4[0].model, path, token_ids=[0, 1, 3], scale=1.0)
    return f"head:{path}"


# ---------------------------------------------------------------------------- variants


@dataclass
class BranchEvery(Policy):
    """Test policy: K chain tokens, ``b`` extra candidates at every position."""

    name = "test-branch"
    k: int = 2
    b: int = 2

    def begin_round(self, ctx: RoundContext) -> int:
        return self.k

    def extra_candidates(self, step: DraftStep) -> int:
        return self.b


T1 = SamplingConfig(1.0)
T07 = SamplingConfig(0.7, top_k=3, top_p=0.9)


@dataclass
class Spec:
    """A variant: how to build its policy, its sampling, its length, the paths it must show."""

    id: str
    build: Callable[[dict[str, Path]], Policy]
    cfg: SamplingConfig = T1
    length: int = 3
    needs: tuple[str, ...] = ("accepted", "rejected")
    subset: bool = False
    head: bool = False  # draft with a feature head (reads the target's hidden states)
    runtime: str = "auto"  # what users get: the compiled runtime for these Llama models


def _named(name: str, **args: object) -> Callable[[dict[str, Path]], Policy]:
    def build(preds: dict[str, Path]) -> Policy:
        kw = {k: (str(preds[v[1:]]) if isinstance(v, str) and v.startswith("@") else str(v))
              for k, v in args.items()}
        return make_policy(name, kw)

    return build


AR = ("accepted", "rejected")
TREE = ("tree_rounds", "candidate_wins")
E = "eager"  # HF modules: the virtual clock charges their forwards (context's cost model needs it)
SPECS = [
    Spec("fixed-k3", _named("fixed", k=3)),
    Spec("fixed-k3-eager", _named("fixed", k=3), runtime=E),
    Spec("fixed-k2-t0.7-topk3-topp0.9", _named("fixed", k=2), T07),
    Spec("fixed-k3-subset-draft", _named("fixed", k=3), subset=True),
    Spec("heuristic", _named("heuristic", k=1), length=4, needs=(*AR, "budgets")),
    Spec("confidence", _named("confidence", k_max=6), needs=(*AR, "continue", "stop")),
    Spec("entropy", _named("entropy", h=1.2, k_max=6), needs=(*AR, "continue", "drop")),
    # the oracle drops the first token whose draft argmax leaves the target's greedy path
    Spec("oracle", _named("oracle"), needs=(*AR, "continue", "drop")),
    Spec("specdecpp", _named("specdecpp", predictor="@specdecpp", h=0.5, k_max=6),
         needs=(*AR, "continue", "stop")),
    # tau_min 0.45: once costs are measured, tokens below P = 0.45 are dropped (tau_keep >= tau_min)
    Spec("context", _named("context", predictor="@context", tau_min=0.45), length=4,
         needs=(*AR, "continue", "stop", "drop"), runtime=E),
    Spec("context-adapt-false", _named("context", predictor="@context", adapt="false", tau=0.3),
         needs=(*AR, "continue", "stop"), runtime=E),
    Spec("context-branch-on", _named("context", predictor="@context", branch="on", max_branch=2,
                                     node_floor=0.0), length=4, needs=(*AR, "candidates", *TREE), runtime=E),
    Spec("context-branch-always-1", _named("context", predictor="@context", branch="on",
                                           branch_rule="always", max_branch=1), needs=(*AR, *TREE)),
    Spec("context-online", _named("context", predictor="online", tau_min=0.45), length=4,
         needs=(*AR, "stop", "drop"), runtime=E),
    Spec("context-mode-random", _named("context", mode="random", k_max=5), length=4, needs=(*AR, "budgets")),
    Spec("ldlp", _named("ldlp", predictor="@ldlp", stop_q=0.2), length=4,
         needs=(*AR, "continue", "stop", "budgets")),
    Spec("tree-b2", lambda _: BranchEvery(2, 2), needs=(*AR, *TREE)),
    Spec("tree-b2-eager", lambda _: BranchEvery(2, 2), needs=(*AR, *TREE), runtime=E),
    Spec("tree-b2-t0.8-topp0.95", lambda _: BranchEvery(2, 2), SamplingConfig(0.8, top_p=0.95),
         needs=(*AR, *TREE)),
    Spec("head-fixed-k3", _named("fixed", k=3), head=True),
    Spec("head-fixed-k3-eager", _named("fixed", k=3), head=True, runtime=E),
    Spec("head-tree-b1-t0.7-topk3", lambda _: BranchEvery(2, 1), T07, needs=(*AR, *TREE), head=True),
]


@pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])
def test_sampling_distribution(spec: Spec, pair4, subset_draft, head4, predictors4, virtual_clock):
    """N seeded samples of every variant against the exact target distribution."""
    target, draft = pair4
    if spec.subset:
        draft = subset_draft
    virtual_clock(target, draft)
    if spec.head:
        draft = head4
    run = sample(target, draft, spec.build(predictors4), spec.cfg, spec.length, runtime=spec.runtime)
    exact = exact_distribution(target.model, PROMPT, spec.cfg, spec.length)
    windows = [(0, 2)] + ([(spec.length - 2, spec.length)] if spec.length > 2 else [])
    for w in windows:
        pval = chi_square_p(marginal(run.counts, w), marginal(exact, w))
        assert pval > ALPHA / len(windows), f"{spec.id}: tokens {w} differ from the target (p={pval:.2e})"
    missing = [k for k in spec.needs if run.c[k] < (2 if k == "budgets" else 1)]
    assert not missing, f"{spec.id}: never exercised {missing}; counters {dict(run.c)}"


def test_sample_size_has_power():
    """The design: a 5 % TV error in its least detectable direction drives the median p-value
    below 1e-3 (power 0.55 at 1e-3, 0.48 at the 5e-4 of each of two windows)."""
    assert worst_case_power(N, V * V) >= 0.5
    assert worst_case_power(N, V * V, alpha=ALPHA / 2) >= 0.45


def test_biased_verifier_is_caught(pair4, monkeypatch):
    """Negative control: a verifier exactly 5 % TV off is rejected at p < 1e-3.

    The bias: in the first verification of a call, with probability eps the verifier
    rejects the whole draft and commits a uniformly random token instead. The first token
    is then distributed as (1 - eps) p1 + eps u and the rest exactly, so the joint is at
    TV eps * TV(u, p1) from the target's; eps makes that 0.05.
    """
    import adaspec.verify as verify

    target, draft = pair4
    exact = exact_distribution(target.model, PROMPT, T1, 2)
    p1 = marginal(exact, (0, 1))
    tv_u = 0.5 * sum(abs(1 / V - p1[(x,)]) for x in range(V))
    eps = TV_ERROR / tv_u
    assert eps < 1
    coin = torch.Generator().manual_seed(123)
    state = {"first": True, "biased": 0}
    honest = verify.verify_sampling

    def biased(tokens, q, p, generator):
        first, state["first"] = state["first"], False
        if first and float(torch.rand((), generator=coin)) < eps:
            state["biased"] += 1
            return Verdict(0, int(torch.randint(V, (), generator=coin)), "recovered")
        return honest(tokens, q, p, generator)

    patched = 0
    for mod in list(sys.modules.values()):
        name = getattr(mod, "__name__", "")
        if name.startswith("adaspec") and getattr(mod, "verify_sampling", None) is honest:
            monkeypatch.setattr(mod, "verify_sampling", biased)
            patched += 1
    assert patched >= 2  # adaspec.verify and the module whose loop calls it
    gen = SpeculativeGenerator(target, draft, "fixed", {"k": 2})
    counts: Counter = Counter()
    for seed in range(N):
        state["first"] = True
        counts[tuple(gen.generate(PROMPT, max_new_tokens=2, temperature=1.0, seed=seed).token_ids)] += 1
    assert state["biased"] > 0.5 * eps * N
    # the biased law, computed exactly, is 5 % off: the test must see it
    biased_law = {k: (1 - eps) * p + eps / V * p / p1[k[:1]] for k, p in exact.items()}
    tv = 0.5 * sum(abs(biased_law[k] - exact[k]) for k in exact)
    assert tv == pytest.approx(TV_ERROR, rel=1e-6)
    lam = N * sum((biased_law[k] - exact[k]) ** 2 / exact[k] for k in exact)  # non-centrality
    assert ncx2.sf(chi2.isf(ALPHA, len(exact) - 1), len(exact) - 1, lam) > 0.9  # power vs this bias
    assert chi_square_p(counts, exact) < ALPHA  # caught (p = 3e-5 with these seeds)
    assert chi_square_p(counts, biased_law) > ALPHA  # ...and it is what was sampled
