"""Every drafting policy is lossless: greedy output identical to plain decoding, and the
sampling distribution equal to the target's (tiny random models built in code, fp32).

The predictor-backed policies use predictors trained here on the tiny pair
(collect -> train, see ``trained_predictors``), which also exercises that pipeline.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adaspec.api import SpeculativeGenerator
from adaspec.models import LoadedModel
from adaspec.policies import make_policy

VOCAB = 64


def tiny_pair(vocab: int = VOCAB, seed: int = 0) -> tuple[LoadedModel, LoadedModel]:
    """Target: 2-layer Llama (d=32); draft: 1-layer Llama sharing the target's embeddings,
    first layer and head, so that the two agree often but not always."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3,
                  tie_word_embeddings=False, attn_implementation="sdpa",
                  eos_token_id=None, bos_token_id=None, pad_token_id=None)
    target = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **common)).eval()
    with torch.no_grad():  # a weak second layer: the 1-layer draft agrees with the target often
        target.model.layers[1].self_attn.o_proj.weight.mul_(0.25)
        target.model.layers[1].mlp.down_proj.weight.mul_(0.25)
    draft = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, **common)).eval()
    sd = {k: v for k, v in target.state_dict().items() if not k.startswith("model.layers.1.")}
    draft.load_state_dict(sd)
    with torch.no_grad():  # perturb the draft a little so that it sometimes disagrees
        for p in draft.model.layers[0].parameters():
            p.add_(0.02 * torch.randn_like(p))
    return (LoadedModel(target, None, "tiny-target", vocab, 256),
            LoadedModel(draft, None, "tiny-draft", vocab, 256))


@pytest.fixture(scope="session")
def pair() -> tuple[LoadedModel, LoadedModel]:
    return tiny_pair()


def prompts(n: int, vocab: int = VOCAB, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture(scope="session")
def trained_predictors(pair, tmp_path_factory) -> dict[str, Path]:
    """collect -> train-predictor for every kind on the tiny pair."""
    from adaspec.predictors.traces import collect
    from adaspec.predictors.train import train_predictor

    root = tmp_path_factory.mktemp("pred")
    target, draft = pair
    collect(target, draft, prompts(22, seed=7), root / "traces", k=6, max_new_tokens=24, shard_size=8,
            progress=False)
    out = {}
    for kind in ("specdecpp", "context", "ldlp"):
        train_predictor(root / "traces", kind, root / kind, epochs=8, batch=64)
        out[kind] = root / kind
    return out


def policy_specs(preds: dict[str, Path]) -> list[tuple[str, dict]]:
    return [
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
        ("ldlp", {"predictor": str(preds["ldlp"]), "stop_q": "0.2"}),
    ]


def test_greedy_identity_every_policy(pair, trained_predictors):
    target, draft = pair
    plain = SpeculativeGenerator(target, None)
    ps = prompts(5)
    want = [plain.generate(p, max_new_tokens=40).token_ids for p in ps]
    for name, args in policy_specs(trained_predictors):
        gen = SpeculativeGenerator(target, draft, name, args)
        for p, w in zip(ps, want, strict=True):
            res = gen.generate(p, max_new_tokens=40)
            assert res.token_ids == w, f"{name} {args} changed greedy output"
        assert gen.engine.policy.name == name


def test_oracle_accepts_everything_it_drafts(pair):
    target, draft = pair
    gen = SpeculativeGenerator(target, draft, "oracle")
    for p in prompts(3):
        st = gen.generate(p, max_new_tokens=40).stats
        assert st.accepted_tokens == st.drafted_tokens
        assert st.extra["oracle_diverged_at"] is None  # fp32: never leaves the reference
        assert st.tau > 1.0


def _exact_two_token_probs(target: LoadedModel, prompt: list[int], temperature: float) -> torch.Tensor:
    """[V, V] exact probabilities of the target's 2-token continuations (enumeration)."""
    model, v = target.model, target.vocab_size
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].float() / temperature, -1)  # [V]
        seqs = torch.tensor([prompt + [x] for x in range(v)])  # [V, T+1]
        p2 = torch.softmax(model(seqs).logits[:, -1].float() / temperature, -1)  # [V, V]
    return p1[:, None] * p2


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square, cells with expectation < 5 pooled into one."""
    from scipy.stats import chi2

    n = counts.sum()
    exp = probs * n
    small = exp < 5
    obs_c = torch.cat([counts[~small], counts[small].sum().view(1)])
    exp_c = torch.cat([exp[~small], exp[small].sum().view(1)])
    keep = exp_c > 0
    stat = float(((obs_c[keep] - exp_c[keep]) ** 2 / exp_c[keep]).sum())
    return float(chi2.sf(stat, int(keep.sum()) - 1))


SMALL_VOCAB = 8


def _sample_counts(gen: SpeculativeGenerator, prompt: list[int], temp: float, n: int) -> torch.Tensor:
    counts = torch.zeros(SMALL_VOCAB * SMALL_VOCAB)
    for seed in range(n):
        ids = gen.generate(prompt, max_new_tokens=2, temperature=temp, seed=seed).token_ids
        counts[ids[0] * SMALL_VOCAB + ids[1]] += 1
    return counts


@pytest.fixture(scope="module")
def small_pair_exact() -> tuple[LoadedModel, LoadedModel, list[int], float, torch.Tensor]:
    t, d = tiny_pair(vocab=SMALL_VOCAB, seed=3)
    prompt, temp = [5, 1, 3], 1.0
    return t, d, prompt, temp, _exact_two_token_probs(t, prompt, temp).flatten()  # [V*V]


def test_sampling_distribution_every_policy(trained_predictors, small_pair_exact):
    """Two sampled tokens after a fixed prompt, 300 seeded samples per policy (vocabulary 8),
    against the exact target distribution. Seeds are fixed, so the test is deterministic.
    (The predictors were trained on the vocab-64 pair; the heads only read hidden states
    of the same width, so they run here too.)"""
    t, d, prompt, temp, exact = small_pair_exact
    specs = [s for s in policy_specs(trained_predictors) if "tau" not in s[1] and "mode" not in s[1]]
    for name, args in specs:
        gen = SpeculativeGenerator(t, d, name, args)
        pval = _chi_square_p(_sample_counts(gen, prompt, temp, 300), exact)
        assert pval > 1e-3, f"{name} {args}: sampling distribution differs (p={pval:.2e})"


def test_sampling_test_has_power(small_pair_exact):
    """Negative control: dropping a drafted token because of its sampled value is NOT
    lossless, and the chi-square test above must catch it."""
    from adaspec.policies.base import Policy
    from adaspec.types import Action

    class DropByValue(Policy):
        name = "drop-by-value"

        def begin_round(self, ctx):
            return 4

        def decide(self, step):
            return Action.DROP if step.token % 2 == 0 else Action.CONTINUE

    t, d, prompt, temp, exact = small_pair_exact
    pval = _chi_square_p(_sample_counts(SpeculativeGenerator(t, d, DropByValue()), prompt, temp, 300), exact)
    assert pval < 1e-3


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


