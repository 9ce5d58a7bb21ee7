"""The draft hot path: ModelStep builds full-vocabulary logits and q only when read, and
what it reports then equals the eager computation over the full vocabulary (the predictor
features too, computed over the draft's scored logits only); a reduced-vocabulary draft on
the compiled runtime proposes exactly the full-vocabulary argmax; a draft step compares no
prefix (the runner is told what its cache already holds)."""

from __future__ import annotations

import pytest
import torch
from conftest import loaded, prompt_ids

from adaspec.drafters.model import ModelDrafter, ModelStep, fit_vocab
from adaspec.drafters.ngram import NgramStep
from adaspec.predictors.features import scalar_features
from adaspec.sampling import SamplingConfig, argmax, processed_probs
from adaspec.types import Action, DraftRequest, DraftStep

V = 262
IDS = torch.arange(0, V, 3)  # a subset head's ids, ascending


def _sub(seed: int = 0) -> torch.Tensor:
    return torch.randn(len(IDS), generator=torch.Generator().manual_seed(seed)) * 3


def test_lazy_step_equals_the_full_vocabulary_step():
    sub = _sub()
    j = int(sub.argmax())
    greedy = SamplingConfig()
    step = ModelStep(2, int(IDS[j]), sub, IDS, V, greedy, pos=j)
    assert "logits" not in step.__dict__ and "probs" not in step.__dict__  # nothing built yet
    full = fit_vocab(sub, V, IDS)
    ref = DraftStep(2, int(IDS[j]), full, torch.softmax(full, dim=-1))
    assert step.token_prob == pytest.approx(ref.token_prob, rel=1e-6)
    assert "logits" not in step.__dict__ and step.scored is sub
    assert step.top1 == pytest.approx(float(ref.probs.max()), rel=1e-6)
    assert "logits" not in step.__dict__  # the greedy features read the subset only
    assert torch.equal(step.logits, full) and torch.equal(step.probs, ref.probs)
    assert int(step.logits.argmax()) == step.token
    hot = SamplingConfig(temperature=0.7, top_k=20)
    s2 = ModelStep(1, int(IDS[0]), sub, IDS, V, hot)
    assert torch.equal(s2.probs, processed_probs(full, hot)) and s2.token_prob == float(s2.probs[s2.token])


@pytest.mark.parametrize("seed", range(5))
def test_features_over_the_scored_logits_equal_the_full_vocabulary_features(seed):
    """scalar_features reads the [Vs] scored logits; over the [V] padded logits (the way it
    read them before, and the way replayed traces give them) the values agree to float
    rounding, and no full-vocabulary tensor is built for them."""
    sub = _sub(seed) * (1 + seed)  # from flat to peaked distributions
    j = int(sub.argmax())
    step = ModelStep(1 + seed, int(IDS[j]), sub, IDS, V, SamplingConfig(), pos=j, attn_concentration=0.3)
    full = fit_vocab(sub, V, IDS)
    ref = DraftStep(1 + seed, int(IDS[j]), full, torch.softmax(full, dim=-1), attn_concentration=0.3)
    got = scalar_features(step, 0.6)
    assert "logits" not in step.__dict__ and "probs" not in step.__dict__
    torch.testing.assert_close(got, scalar_features(ref, 0.6), rtol=1e-6, atol=1e-7)
    small = ModelStep(1, 0, sub[:3], None, 3, SamplingConfig())  # fewer scores than TOP_K
    assert scalar_features(small, 0.5).shape == scalar_features(ref, 0.5).shape


def test_ngram_step_features_equal_its_one_hot_distribution():
    step = NgramStep(2, 7, V, 10, 5, 1.0)
    ref = DraftStep(2, 7, step.logits, step.probs)
    assert step.token_prob == ref.token_prob == 1.0 and step.top1 == ref.top1 == 1.0
    fresh = NgramStep(2, 7, V, 10, 5, 1.0)
    torch.testing.assert_close(scalar_features(fresh, 0.5), scalar_features(ref, 0.5))


def test_argmax_is_the_first_maximum():
    x = torch.tensor([0.0, 3.0, 1.0, 3.0])
    assert argmax(x) == int(x.argmax()) == 1
    assert argmax(x.double()) == 1


@pytest.mark.parametrize("runtime", ["eager", "compiled"])
def test_subset_draft_proposes_the_full_vocabulary_argmax(runtime, monkeypatch):
    """Greedy drafts of a SubsetLMHead draft: every token is the argmax of its full-vocabulary
    logits (q = 0 outside the subset), on the runtime that keeps the logits unscattered too
    (weights as stored: a re-encoded draft would propose from other numbers)."""
    monkeypatch.setenv("ADASPEC_DRAFT_ENCODING", "stored")
    from transformers import LlamaConfig

    from adaspec.checkpoints.subset_draft import build_subset_draft

    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    torch.manual_seed(0)
    model = build_subset_draft(cfg, IDS).eval()
    drafter = ModelDrafter(loaded(model), V, runtime)
    assert (drafter.ids is not None) == (runtime == "compiled")
    ctx = prompt_ids(1)
    drafter.reset()
    draft = drafter.propose(ctx, DraftRequest(5, decide=lambda s: Action.CONTINUE))
    assert len(draft.tokens) == 5 and draft.probs is None
    with torch.inference_mode():
        for i, (tok, step) in enumerate(zip(draft.tokens, draft.steps)):
            full = model(torch.tensor([ctx + draft.tokens[:i]])).logits[0, -1]
            assert tok == int(full.argmax()) == step.token and set(IDS.tolist()) >= {tok}
            fin = ~torch.isinf(full)
            assert torch.equal(fin, ~torch.isinf(step.logits))
            torch.testing.assert_close(step.logits[fin], full[fin], rtol=1e-4, atol=1e-4)


def test_draft_encoding_follows_the_environment(monkeypatch):
    from adaspec.drafters.model import DRAFT_ENCODING, draft_encoding

    monkeypatch.delenv("ADASPEC_DRAFT_ENCODING", raising=False)
    assert draft_encoding() == DRAFT_ENCODING == "q8_0"
    monkeypatch.setenv("ADASPEC_DRAFT_ENCODING", " BF16 ")
    assert draft_encoding() == "bf16"
    monkeypatch.setenv("ADASPEC_DRAFT_ENCODING", "stored")
    assert draft_encoding() is None


def test_a_draft_step_compares_no_prefix(monkeypatch):
    """After the round's first forward, each draft forward tells the runner that everything
    but the newest token is already in its cache: the prefix comparison covers one token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    torch.manual_seed(0)
    drafter = ModelDrafter(loaded(LlamaForCausalLM(cfg).eval()), V, "compiled")
    ctx = prompt_ids(3)[:40]
    drafter.reset()
    drafter.prefill(ctx[:-1])
    compared = []
    sync = type(drafter.runner)._sync_prefix

    def spy(self, seq, keep_out, synced=0):
        compared.append(len(seq) - keep_out - min(synced, len(seq) - keep_out))
        return sync(self, seq, keep_out, synced)

    monkeypatch.setattr(type(drafter.runner), "_sync_prefix", spy)
    draft = drafter.propose(ctx, DraftRequest(6))
    assert len(draft.tokens) == 6 and compared[0] == len(ctx) - 1 and compared[1:] == [0] * 5
