"""The draft hot path: ModelStep builds full-vocabulary logits and q only when read, and
what it reports then equals the eager computation over the full vocabulary; a reduced-
vocabulary draft on the compiled runtime proposes exactly the full-vocabulary argmax."""

from __future__ import annotations

import pytest
import torch
from conftest import loaded, prompt_ids

from adaspec.drafters.model import ModelDrafter, ModelStep, fit_vocab
from adaspec.sampling import SamplingConfig, processed_probs
from adaspec.types import Action, DraftNeeds, DraftStep

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
    assert step.entropy == pytest.approx(ref.entropy, rel=1e-5)
    torch.testing.assert_close(step.top_probs(4), ref.top_probs(4))
    assert "logits" not in step.__dict__  # the greedy features read the subset only
    assert torch.equal(step.logits, full) and torch.equal(step.probs, ref.probs)
    assert int(step.logits.argmax()) == step.token
    hot = SamplingConfig(temperature=0.7, top_k=20)
    s2 = ModelStep(1, int(IDS[0]), sub, IDS, V, hot)
    assert torch.equal(s2.probs, processed_probs(full, hot)) and s2.token_prob == float(s2.probs[s2.token])
    assert ModelStep(1, 0, sub[:3], None, 3, greedy).top_probs(5).shape == (5,)  # padded with zeros


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
    draft = drafter.propose(ctx, 5, lambda s: Action.CONTINUE, SamplingConfig(), None, DraftNeeds())
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
