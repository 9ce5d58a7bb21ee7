"""Engine losslessness: greedy identity, stopping inside drafts, cache invariants."""

from __future__ import annotations

import pytest
import torch
from conftest import EOS_ID, loaded, make_model, prompt_ids

from adaspec.api import SpeculativeGenerator
from adaspec.drafters import ModelDrafter
from adaspec.errors import InvalidArgumentError
from adaspec.runtime.eager import ModelRunner


def plain(target, prompt, **kw):
    return SpeculativeGenerator(target, None).generate(prompt, **kw)


@pytest.mark.parametrize("k", range(1, 9))
def test_greedy_identity_fixed_k(tiny_pair, k):
    target, draft = tiny_pair
    gen = SpeculativeGenerator(target, draft, "fixed", {"k": k})
    accepted = rejected = 0
    for i in range(4):
        ref = plain(target, prompt_ids(i), max_new_tokens=30)
        out = gen.generate(prompt_ids(i), max_new_tokens=30)
        assert out.token_ids == ref.token_ids, f"prompt {i}"
        accepted += out.stats.accepted_tokens
        rejected += out.stats.drafted_tokens - out.stats.accepted_tokens
    # the noisy draft must exercise both paths, or this test proves little
    assert accepted > 0 and rejected > 0


def test_gpt2_architecture_identity(tokenizer):
    target = loaded(make_model("gpt2", seed=3), tokenizer)
    from conftest import perturbed

    draft = loaded(perturbed(target.model, 0.5), tokenizer)
    for k in (2, 5):
        gen = SpeculativeGenerator(target, draft, "fixed", {"k": k})
        for i in range(3):
            assert gen.generate(prompt_ids(i), max_new_tokens=20).token_ids == \
                plain(target, prompt_ids(i), max_new_tokens=20).token_ids


@pytest.mark.parametrize("k", [1, 3, 8])
def test_target_as_its_own_draft_accepts_everything(tiny_pair, k):
    target, _ = tiny_pair
    gen = SpeculativeGenerator(target, target, "fixed", {"k": k})
    out = gen.generate(prompt_ids(0), max_new_tokens=40)
    s = out.stats
    assert out.token_ids == plain(target, prompt_ids(0), max_new_tokens=40).token_ids
    assert s.acceptance_rate == 1.0
    # every round but the last commits K+1 tokens (the last is cut by max_new_tokens)
    assert s.new_tokens == 40 and s.rounds == -(-40 // (k + 1))
    assert s.tau == pytest.approx(40 / s.rounds)
    assert s.draft_forwards <= s.rounds * k


def test_max_new_tokens_inside_a_draft(tiny_pair):
    target, _ = tiny_pair
    for n in (1, 2, 5, 7):
        out = SpeculativeGenerator(target, target, "fixed", {"k": 8}).generate(
            prompt_ids(1), max_new_tokens=n)
        assert len(out.token_ids) == n
        assert out.stats.stop_reason == "max_new_tokens"
        assert out.token_ids == plain(target, prompt_ids(1), max_new_tokens=n).token_ids


def test_eos_inside_a_draft(tokenizer):
    """Make a token the target emits at position 3 the EOS: generation must stop right there."""
    model = make_model("llama", seed=5)
    ref = SpeculativeGenerator(loaded(model, tokenizer), None).generate(prompt_ids(2), max_new_tokens=12)
    eos = ref.token_ids[3]
    first = ref.token_ids.index(eos)
    model.generation_config.eos_token_id = eos
    target = loaded(model, tokenizer)
    for k in (2, 6):
        out = SpeculativeGenerator(target, target, "fixed", {"k": k}).generate(prompt_ids(2),
                                                                              max_new_tokens=12)
        assert out.token_ids == ref.token_ids[: first + 1]
        assert out.stats.stop_reason == "eos"
    model.generation_config.eos_token_id = EOS_ID


def test_stop_string_inside_a_draft(tiny_pair, tokenizer):
    target, _ = tiny_pair
    ref = plain(target, prompt_ids(0), max_new_tokens=20)
    text = tokenizer.decode(ref.token_ids[4:6])
    out = SpeculativeGenerator(target, target, "fixed", {"k": 8}).generate(
        prompt_ids(0), max_new_tokens=20, stop=[text])
    assert out.stats.stop_reason == "stop_string"
    assert out.text.endswith(text)
    assert ref.token_ids[: len(out.token_ids)] == out.token_ids
    assert len(out.token_ids) <= 6


def _cache_matches_fresh_prefill(runner) -> None:
    fresh = type(runner)(runner.model)
    if hasattr(runner, "lean"):  # the same packed weights (a draft's may be re-encoded, e.g. Q8_0)
        fresh.lean = runner.lean
        fresh.kt, fresh.vc = runner.lean.new_cache()
    fresh.reset()
    fresh.prefill(list(runner.tokens))
    n = len(runner.tokens)
    if isinstance(runner, ModelRunner):
        assert runner.cache.get_seq_length() == n
        for a, b in zip(runner.cache.layers, fresh.cache.layers):
            torch.testing.assert_close(a.keys, b.keys, rtol=1e-3, atol=1e-4)  # fp32 round-off only
            torch.testing.assert_close(a.values, b.values, rtol=1e-3, atol=1e-4)
    else:  # compiled runtime: static slots 0..n-1 must equal a fresh prefill's
        for a, b in ((runner.kt[..., :n], fresh.kt[..., :n]), (runner.vc[:, :, :n], fresh.vc[:, :, :n])):
            torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("runtime", ["eager", "auto"])
@pytest.mark.parametrize("draft_kind", ["noisy", "self"])
def test_cache_invariants_after_rollback(tiny_pair, draft_kind, runtime):
    """After every round, each cache holds exactly a prefix of the committed ids, with
    keys/values equal to a fresh prefill of that prefix (rejections and full accepts).
    ``auto`` is the compiled runtime for Llama and eager for Qwen2."""
    target, noisy = tiny_pair
    draft = target if draft_kind == "self" else noisy
    gen = SpeculativeGenerator(target, draft, "fixed", {"k": 4}, runtime=runtime)
    ids = prompt_ids(3)
    rules_out = gen._start(ids, 24, 0.0, 0, 1.0, None, None, False)
    rounds, stats, _ = rules_out
    committed = list(ids)
    drafter: ModelDrafter = gen.engine.drafter
    for chunk in rounds:
        committed.extend(chunk)
        for runner in (gen.engine.target, drafter.runner):
            assert committed[: len(runner.tokens)] == runner.tokens
            # target holds all but the newest token; the draft at most one more behind
            assert len(committed) - len(runner.tokens) <= 2 + (runner is drafter.runner)
            _cache_matches_fresh_prefill(runner)
    assert stats.new_tokens == 24


def test_stream_concatenates_to_text(tiny_pair):
    target, draft = tiny_pair
    gen = SpeculativeGenerator(target, draft, "fixed", {"k": 3})
    stream = gen.stream("hello", max_new_tokens=25)
    text = "".join(stream)
    assert stream.result is not None
    assert text == stream.result.text
    # generate's defaults are stream's (declared once): same ids without arguments
    assert "".join(gen.stream("hello")) == gen.generate("hello").text
    with pytest.raises(InvalidArgumentError, match="unknown arguments: max_tokens"):
        gen.stream("hello", max_tokens=3)


def test_stats_definitions(tiny_pair):
    from conftest import perturbed

    target, _ = tiny_pair
    draft = loaded(perturbed(target.model, 0.05, seed=3), target.tokenizer)  # accepts often, not always
    s = SpeculativeGenerator(target, draft, "fixed", {"k": 4}).generate(
        prompt_ids(0), max_new_tokens=30).stats
    assert s.new_tokens == 30
    assert s.tau == pytest.approx(s.new_tokens / s.target_forwards)
    assert sum(s.accept_hist) == s.rounds == s.target_forwards
    assert sum(m * c for m, c in enumerate(s.accept_hist)) == s.accepted_tokens
    # position i+1 is tested exactly when tokens 1..i were accepted and the draft went further
    for i, tested in enumerate(s.pos_tested):
        assert tested <= sum(c for m, c in enumerate(s.accept_hist) if m >= i)
    assert s.pos_accepted[0] == sum(c for m, c in enumerate(s.accept_hist) if m >= 1)
    assert 0 < s.accepted_tokens < s.drafted_tokens
    assert s.per_position_acceptance[0] == pytest.approx(s.pos_accepted[0] / s.pos_tested[0])
    assert 0 <= s.acceptance_rate <= 1
    assert s.wall_s >= s.draft_s + s.verify_s
    plain_stats = plain(target, prompt_ids(0), max_new_tokens=30).stats
    assert plain_stats.tau == 1.0 and plain_stats.draft_forwards == 0


def test_reduced_vocabulary_draft_greedy_identity(tiny_pair, tmp_path):
    """A SubsetLMHead draft (q = 0 outside its ids), saved and loaded as a draft directory:
    greedy output stays identical although the target emits tokens the draft cannot propose."""
    import copy

    from conftest import perturbed

    from adaspec.checkpoints.loader import load_model
    from adaspec.checkpoints.subset_draft import SubsetLMHead, build_subset_draft, save_subset_draft

    target, _ = tiny_pair
    draft = loaded(perturbed(target.model, 0.1, seed=3), target.tokenizer)  # agrees often
    want = [plain(target, prompt_ids(i), max_new_tokens=30).token_ids for i in range(4)]
    emitted = sorted({t for w in want for t in w})
    banned = set(emitted[::3])  # a third of the tokens the target emits are outside the subset
    ids = torch.tensor([t for t in range(target.vocab_size) if t not in banned])
    model = build_subset_draft(copy.deepcopy(draft.model.config), ids)
    model.load_state_dict({k: v for k, v in draft.model.state_dict().items() if k != "lm_head.weight"},
                          strict=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(draft.model.lm_head.weight[ids])
    save_subset_draft(model, tmp_path / "d", {"draft_vocab_size": len(ids), "target_vocab_sha256": None,
                                              "target": "tiny"})
    sub = load_model(str(tmp_path / "d"), dtype="fp32", role="draft")
    assert isinstance(sub.model.lm_head, SubsetLMHead) and sub.vocab_size == target.vocab_size
    gen = SpeculativeGenerator(target, sub, "fixed", {"k": 4})
    accepted = rejected = 0
    for i, w in enumerate(want):
        out = gen.generate(prompt_ids(i), max_new_tokens=30)
        assert out.token_ids == w, f"prompt {i}"
        accepted += out.stats.accepted_tokens
        rejected += out.stats.drafted_tokens - out.stats.accepted_tokens
    assert accepted > 0 and rejected > 0
    assert banned & set(t for w in want for t in w)  # the draft could not have proposed these


def test_cache_argument_follows_the_model_signature(tiny_pair):
    """One switch names the KV cache argument: ``cache`` where the forward declares it
    (no FutureWarning on transformers >= 5.2x), else ``past_key_values``."""
    import inspect
    import warnings

    from torch import nn

    from adaspec.runtime.eager import cache_kwargs

    target, _ = tiny_pair
    want = "cache" if "cache" in inspect.signature(target.model.forward).parameters else "past_key_values"
    assert list(cache_kwargs(target.model, None)) == [want]

    class Old(nn.Module):
        def forward(self, input_ids, past_key_values=None, **kwargs):
            return past_key_values

    assert cache_kwargs(Old(), 7) == {"past_key_values": 7}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        SpeculativeGenerator(target, None, "fixed").generate(prompt_ids(0), max_new_tokens=3)
