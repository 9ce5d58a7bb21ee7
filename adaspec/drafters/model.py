"""A small causal LM as the drafter (the standard speculative-decoding draft).

Per drafted token the hot path does one draft forward, one argmax (greedy) or one sample
and one policy call; nothing else is computed unless a policy reads it (:class:`ModelStep`
builds the full-vocabulary logits and q on first access). On the native compiled runtime
the draft's weights are re-encoded to :data:`DRAFT_ENCODING` (Q8_0; ``$ADASPEC_DRAFT_ENCODING``
overrides it): the draft's precision never changes the output (verification decides), only
how often its guesses are accepted.
"""

from __future__ import annotations

from collections.abc import Generator
from functools import cached_property

import torch

from ..checkpoints.loader import LoadedModel
from ..runtime import make_runner
from ..runtime.eager import ForwardOut
from ..runtime.plan import DRAFT_ENCODING, ENCODING_ENV, draft_encoding  # noqa: F401 - re-exported
from ..sampling import SamplingConfig, argmax, fit_vocab, processed_probs, sample
from ..types import Draft, DraftRequest, DraftStep, VerifyCall
from .base import DraftBuilder


class ModelStep(DraftStep):
    """A :class:`DraftStep` of a draft LM: ``logits`` ([V]) and ``probs`` ([V]) are built
    only when read.

    Args:
        sub: [Vs] draft logits over ``ids`` (a reduced-vocabulary head), or [V] when ``ids``
            is None.
        ids: [Vs] int64 target ids of ``sub`` (ascending), or None.
        vocab_size: V, the target's vocabulary.
        sampling: how q derives from the logits (temperature, top-k, top-p).
        probs: q when the drafter already computed it (sampling), else None.
        pos: index of ``token`` in ``sub`` when known (greedy), else None.

    Under greedy, ``token_prob`` and the features (over ``scored``) read ``sub`` directly:
    the tokens outside the subset have q = 0 and add nothing.
    """

    def __init__(self, index: int, token: int, sub: torch.Tensor, ids: torch.Tensor | None,
                 vocab_size: int, sampling: SamplingConfig, hidden: torch.Tensor | None = None,
                 attn_concentration: float | None = None, context_len: int = 0,
                 probs: torch.Tensor | None = None, pos: int | None = None) -> None:
        self.index, self.token, self.context_len = index, token, context_len
        self.hidden, self.attn_concentration = hidden, attn_concentration  # [d] or None
        self.sub, self.ids, self.vocab_size, self.sampling = sub, ids, vocab_size, sampling
        self.pos = pos
        if probs is not None:
            self.probs = probs

    @property
    def scored(self) -> torch.Tensor:
        return self.sub

    @cached_property
    def logits(self) -> torch.Tensor:  # type: ignore[override]
        return fit_vocab(self.sub, self.vocab_size, self.ids)

    @cached_property
    def probs(self) -> torch.Tensor:  # type: ignore[override]
        return processed_probs(self.logits, self.sampling)

    @cached_property
    def token_prob(self) -> float:  # type: ignore[override]
        if not self.sampling.greedy or self.pos is None or "probs" in self.__dict__:
            return float(self.probs[self.token])
        x = self.sub.float()
        return float(torch.exp(x[self.pos] - torch.logsumexp(x, dim=-1)))

    @cached_property
    def top1(self) -> float:  # type: ignore[override]
        if not self.sampling.greedy or "probs" in self.__dict__:
            return float(self.probs.max())
        x = self.sub.float()  # greedy: q = softmax over the scored ids, 0 elsewhere
        return float(torch.exp(x.max() - torch.logsumexp(x, dim=-1)))

    def __repr__(self) -> str:
        return f"ModelStep(index={self.index}, token={self.token}, context_len={self.context_len})"


def _draft_runner(model: torch.nn.Module, runtime: str, release: bool):
    """The draft's runner: on the native compiled runtime, weights re-encoded to
    :func:`draft_encoding` (a draft loaded natively runs on the panels its load made: a
    reduced-vocabulary one already in :func:`draft_encoding`, another as stored), else as
    ``make_runner``."""
    enc = draft_encoding()
    if runtime == "compiled" and enc:
        from ..runtime.compiled_runner import CompiledRunner
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

    def propose(self, context: list[int], request: DraftRequest) -> Draft:
        return run_steps(self.propose_steps(context, request))

    def propose_steps(self, context: list[int], request: DraftRequest,
                      ) -> Generator[VerifyCall, ForwardOut, Draft]:
        """:meth:`propose` with each draft forward handed out (a :class:`VerifyCall` on the
        draft's runner, its output sent back), so a batch engine can run the draft forwards of
        many sequences together; returns the :class:`Draft`.

        Per token: one forward of one new row (``VerifyCall.synced`` tells the runner that
        everything before it is what its cache holds: no prefix comparison), one argmax
        (greedy) or one draw, one policy call. Nothing over the full vocabulary under greedy."""
        out_ids, greedy, sampling, needs = self.ids, request.sampling.greedy, request.sampling, request.needs
        build = DraftBuilder(request)
        start_forwards = self.runner.forwards
        seq = list(context)  # context + drafted tokens, grown in place
        n, synced = len(context), 0
        for i in range(1, request.budget + 1):
            out = yield VerifyCall(self.runner, seq, 1, needs.hidden, concentration=needs.attention,
                                   synced=synced)
            synced = len(seq)
            sub = out.logits[0]  # [Vs] over out_ids, or [V_draft]
            if out_ids is None and sub.shape[-1] != self.vocab_size:
                sub = fit_vocab(sub, self.vocab_size)
            probs, j = None, None
            if greedy:
                j = argmax(sub)
                token = j if out_ids is None else int(out_ids[j])
            else:
                probs = processed_probs(fit_vocab(sub, self.vocab_size, out_ids), sampling)  # [V]
                token = sample(probs, request.generator)
            conc = self.runner.attention_concentration() if needs.attention else None
            hidden = None if out.hidden is None else out.hidden[0]
            if not build.keep(ModelStep(i, token, sub, out_ids, self.vocab_size, sampling, hidden, conc, n,
                                        probs, j)):
                break
            seq.append(token)
        return build.finish(self.runner.forwards - start_forwards)


def run_steps(steps: Generator[VerifyCall, ForwardOut, Draft]) -> Draft:
    """Drive a ``propose_steps`` generator, running each forward on its own runner."""
    try:
        call = next(steps)
        while True:
            call = steps.send(call.run())
    except StopIteration as stop:
        return stop.value
