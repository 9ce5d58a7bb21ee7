"""A small causal LM as the drafter (the standard speculative-decoding draft).

Per drafted token the hot path does one draft forward, one argmax (greedy) or one sample
and one policy call; nothing else is computed unless a policy reads it (:class:`ModelStep`
builds the full-vocabulary logits and q on first access). On the native compiled runtime
the draft's weights are re-encoded to :data:`DRAFT_ENCODING` (Q8_0; ``$ADASPEC_DRAFT_ENCODING``
overrides it): the draft's precision never changes the output (verification decides), only
how often its guesses are accepted.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from functools import cached_property

import torch

from ..checkpoints.loader import LoadedModel
from ..runtime import make_runner
from ..runtime.eager import ForwardOut
from ..sampling import SamplingConfig, fit_vocab, processed_probs, sample
from ..types import Action, Draft, DraftStep, VerifyCall
from .base import BranchFn, DecideFn, DraftNeeds

DRAFT_ENCODING = "q8_0"  # the draft's weights on the native compiled runtime
ENCODING_ENV = "ADASPEC_DRAFT_ENCODING"  # overrides it: q8_0, bf16, f16, f32, or "stored" (as loaded)


class ModelStep(DraftStep):
    """A :class:`DraftStep` of a draft LM whose ``logits`` ([V]) and ``probs`` ([V]) are
    built only when read.

    Args:
        sub: [Vs] draft logits over ``ids`` (a reduced-vocabulary head), or [V] when ``ids``
            is None.
        ids: [Vs] int64 target ids of ``sub`` (ascending), or None.
        vocab_size: V, the target's vocabulary.
        sampling: how q derives from the logits (temperature, top-k, top-p).
        probs: q when the drafter already computed it (sampling), else None.

    Under greedy, ``token_prob``, ``entropy`` and ``top_probs`` read ``sub`` directly: the
    tokens outside the subset have q = 0 and add nothing.
    """

    def __init__(self, index: int, token: int, sub: torch.Tensor, ids: torch.Tensor | None,
                 vocab_size: int, sampling: SamplingConfig, hidden: torch.Tensor | None = None,
                 attn_concentration: float | None = None, context_len: int = 0,
                 probs: torch.Tensor | None = None, pos: int | None = None) -> None:
        self.index, self.token, self.context_len = index, token, context_len
        self.hidden, self.attn_concentration = hidden, attn_concentration
        self.sub, self.ids, self.vocab_size, self.sampling = sub, ids, vocab_size, sampling
        self.pos = pos  # index of ``token`` in ``sub`` when known (greedy)
        if probs is not None:
            self.probs = probs

    @cached_property
    def logits(self) -> torch.Tensor:  # type: ignore[override]
        return fit_vocab(self.sub, self.vocab_size, self.ids)

    @cached_property
    def probs(self) -> torch.Tensor:  # type: ignore[override]
        return processed_probs(self.logits, self.sampling)

    @cached_property
    def token_prob(self) -> float:
        if not self.sampling.greedy or self.pos is None or "probs" in self.__dict__:
            return float(self.probs[self.token])
        x = self.sub.float()
        return float(torch.exp(x[self.pos] - torch.logsumexp(x, dim=-1)))

    @cached_property
    def entropy(self) -> float:
        logp = torch.log_softmax(self.sub.float(), dim=-1)
        return float(-torch.nansum(logp.exp() * logp))

    def top_probs(self, k: int) -> torch.Tensor:
        p = torch.softmax(self.sub.float(), dim=-1)
        top = p.topk(min(k, p.shape[-1])).values
        return top if top.shape[-1] == k else torch.cat([top, top.new_zeros(k - top.shape[-1])])

    def __repr__(self) -> str:
        return f"ModelStep(index={self.index}, token={self.token}, context_len={self.context_len})"


def draft_encoding() -> str | None:
    """The encoding of the draft's weights on the native runtime: ``$ADASPEC_DRAFT_ENCODING``
    (``stored``: as loaded) or :data:`DRAFT_ENCODING`."""
    enc = os.environ.get(ENCODING_ENV, DRAFT_ENCODING).strip().lower()
    return None if enc in ("", "stored", "none") else enc


def _draft_runner(model: torch.nn.Module, runtime: str, release: bool):
    """The draft's runner: on the native compiled runtime, weights re-encoded to
    :func:`draft_encoding` (a draft loaded natively from its files runs as stored), else as
    ``make_runner``."""
    enc = draft_encoding()
    if runtime == "compiled" and enc:
        from ..runtime.compiled import CompiledRunner
        from ..runtime.native import NativeWeights

        # a draft loaded natively from its own files has no module weights to re-encode: as stored.
        # Native weights built earlier for a module that still has its weights (e.g. the
        # re-encoded copy of an earlier drafter of the same draft) do not make it "stored": every
        # drafter of one module runs the same encoding (NativeWeights.of shares the copy).
        if NativeWeights.existing(model) is None or all(p.numel() for p in model.parameters()):
            return CompiledRunner(model, release, native=True, encoding=enc)
    return make_runner(model, runtime, release=release)


class ModelDrafter:
    """Drafts with an HF causal LM that shares the target's vocabulary.

    ``vocab_size`` is the target's logits size: a draft with a smaller output layer is
    padded with -inf (q = 0), one with padding rows beyond it is truncated.
    """

    def __init__(self, draft: LoadedModel, vocab_size: int, runtime: str = "eager") -> None:
        self.loaded = draft
        self.runner = _draft_runner(draft.model, runtime, draft.owned)
        self.vocab_size = vocab_size
        self.max_context = min(draft.max_context, getattr(self.runner, "capacity", draft.max_context))
        # a reduced-vocabulary head on the compiled runtime: take its [Vs] logits unscattered
        ids = getattr(getattr(self.runner, "lean", None), "out_ids", None)
        self.ids = ids if ids is not None and hasattr(type(self.runner), "full_vocab") else None
        if self.ids is not None:
            self.runner.full_vocab = False

    def reset(self) -> None:
        self.runner.reset()

    def prefill(self, context: list[int]) -> None:
        self.runner.prefill(context)

    def rollback(self, committed: list[int]) -> None:
        self.runner.rollback(committed)

    def propose(
        self,
        context: list[int],
        budget: int,
        decide: DecideFn,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
        needs: DraftNeeds,
        branch: BranchFn | None = None,
    ) -> Draft:
        return run_steps(self.propose_steps(context, budget, decide, sampling, generator, needs, branch))

    def propose_steps(
        self,
        context: list[int],
        budget: int,
        decide: DecideFn,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
        needs: DraftNeeds,
        branch: BranchFn | None = None,
    ) -> Generator[VerifyCall, ForwardOut, Draft]:
        """:meth:`propose` with each draft forward handed out (a :class:`VerifyCall` on the
        draft's runner, its output sent back), so a batch engine can run the draft forwards of
        many sequences together; returns the :class:`Draft`."""
        tokens: list[int] = []
        steps: list[DraftStep] = []
        branches: dict[int, list[int]] = {}
        start_forwards = self.runner.forwards
        seq = list(context)  # context + drafted tokens, grown in place
        ids, greedy = self.ids, sampling.greedy
        for i in range(1, budget + 1):
            out = yield VerifyCall(self.runner, seq, 1, needs.hidden, concentration=needs.attention)
            sub = out.logits[0]  # [Vs] over ids, or [V_draft]
            if ids is None and sub.shape[-1] != self.vocab_size:
                sub = fit_vocab(sub, self.vocab_size)
            probs, j = None, None
            if greedy:
                j = int(sub.argmax())
                token = j if ids is None else int(ids[j])
            else:
                probs = processed_probs(fit_vocab(sub, self.vocab_size, ids), sampling)  # [V]
                token = sample(probs, generator)
            conc = self.runner.attention_concentration() if needs.attention else None
            step = ModelStep(i, token, sub, ids, self.vocab_size, sampling,
                             None if out.hidden is None else out.hidden[0], conc, len(context), probs, j)
            if not keep_step(step, decide, branch, tokens, steps, branches):
                break
            seq.append(token)
        probs_kq = None
        if not greedy and steps:
            probs_kq = torch.stack([s.probs for s in steps])  # [K, V]
        return Draft(tokens, probs_kq, steps, self.runner.forwards - start_forwards,
                     {i: c for i, c in branches.items() if c})


def run_steps(steps: Generator[VerifyCall, ForwardOut, Draft]) -> Draft:
    """Drive a ``propose_steps`` generator, running each forward on its own runner."""
    try:
        call = next(steps)
        while True:
            call = steps.send(call.run())
    except StopIteration as stop:
        return stop.value


def keep_step(step: DraftStep, decide: DecideFn, branch: BranchFn | None, tokens: list[int],
              steps: list[DraftStep], branches: dict[int, list[int]]) -> bool:
    """Ask the policy about a drafted token and record what it keeps (token, step, extra
    candidates from the same q). Returns True when drafting should go on."""
    action = decide(step)
    if action is Action.DROP:
        return False
    tokens.append(step.token)
    steps.append(step)
    n_extra = branch(step) if branch is not None else 0
    if n_extra > 0:
        branches[step.index] = top_candidates(step.probs, step.token, n_extra)
    return action is not Action.STOP


def top_candidates(probs: torch.Tensor, chosen: int, n: int) -> list[int]:
    """The ``n`` most likely tokens of a [V] distribution other than ``chosen`` (q > 0 only)."""
    vals, idx = probs.topk(min(n + 1, probs.shape[-1]))
    return [int(t) for v, t in zip(vals.tolist(), idx.tolist()) if v > 0 and t != chosen][:n]
