"""A small causal LM as the drafter (the standard speculative-decoding draft)."""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING

import torch

from ..kv import ForwardOut
from ..models import LoadedModel
from ..runtime import make_runner
from ..sampling import SamplingConfig, processed_probs, sample
from ..types import Action, Draft, DraftStep
from .base import BranchFn, DecideFn, DraftNeeds

if TYPE_CHECKING:
    from ..engine import VerifyCall


class ModelDrafter:
    """Drafts with an HF causal LM that shares the target's vocabulary.

    ``vocab_size`` is the target's logits size: a draft with a smaller output layer is
    padded with -inf (q = 0), one with padding rows beyond it is truncated.
    """

    def __init__(self, draft: LoadedModel, vocab_size: int, runtime: str = "eager") -> None:
        self.loaded = draft
        self.runner = make_runner(draft.model, runtime, release=draft.owned)
        self.vocab_size = vocab_size
        self.max_context = min(draft.max_context, getattr(self.runner, "capacity", draft.max_context))

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
        from ..engine import VerifyCall  # the engine imports the drafters

        tokens: list[int] = []
        steps: list[DraftStep] = []
        branches: dict[int, list[int]] = {}
        start_forwards = self.runner.forwards
        for i in range(1, budget + 1):
            out = yield VerifyCall(self.runner, context + tokens, 1, needs.hidden,
                                   concentration=needs.attention)
            logits = fit_vocab(out.logits[0], self.vocab_size)  # [V]
            probs = processed_probs(logits, sampling)  # [V]
            token = int(logits.argmax()) if sampling.greedy else sample(probs, generator)
            conc = self.runner.attention_concentration() if needs.attention else None
            step = DraftStep(i, token, logits, probs,
                             hidden=None if out.hidden is None else out.hidden[0],
                             attn_concentration=conc, context_len=len(context))
            if not keep_step(step, decide, branch, tokens, steps, branches):
                break
        probs_kq = None
        if not sampling.greedy and steps:
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


def fit_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[..., V_draft] -> [..., V_target] logits: a smaller draft head is padded with -inf
    (q = 0), padding rows beyond the target's vocabulary are dropped."""
    v = logits.shape[-1]
    if v == vocab_size:
        return logits
    if v > vocab_size:
        return logits[..., :vocab_size]
    pad = logits.new_full((*logits.shape[:-1], vocab_size - v), float("-inf"))
    return torch.cat([logits, pad], dim=-1)


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
