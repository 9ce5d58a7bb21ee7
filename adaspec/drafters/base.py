"""The drafter protocol, and the bookkeeping every drafting loop shares (:class:`DraftBuilder`)."""

from __future__ import annotations

from typing import Protocol

import torch

from ..types import Action, BranchFn, DecideFn, Draft, DraftNeeds, DraftRequest, DraftStep

__all__ = ["BranchFn", "DecideFn", "DraftBuilder", "DraftNeeds", "DraftRequest", "Drafter",
           "top_candidates"]  # the contract types live in adaspec.types


class Drafter(Protocol):
    """Proposes up to ``request.budget`` tokens after ``context``, asking ``request.decide``
    after each."""

    max_context: int

    def reset(self) -> None:
        """Start of a generate call: drop all state."""

    def prefill(self, context: list[int]) -> None:
        """Optionally pre-compute state for ``context`` (prompt minus its last token)."""

    def rollback(self, committed: list[int]) -> None:
        """Drop state for tokens that were not committed (after verification)."""

    def propose(self, context: list[int], request: DraftRequest) -> Draft:
        """Draft up to ``request.budget`` tokens after ``context`` (committed ids).

        ``request.branch(step)`` (optional) returns how many extra candidates to add at a
        kept position (``Draft.branches``)."""


class DraftBuilder:
    """One round's draft as it grows: asks the policy about each drafted token and records
    what it keeps (token, step, extra candidates from the same q). Every drafter's loop is
    ``while builder.keep(next_step): ...`` then ``builder.finish(forwards)``."""

    __slots__ = ("branches", "request", "steps", "tokens")

    def __init__(self, request: DraftRequest) -> None:
        self.request = request
        self.tokens: list[int] = []  # [K] kept token ids
        self.steps: list[DraftStep] = []  # [K] their steps
        self.branches: dict[int, list[int]] = {}  # 1-based position -> extra candidates

    def keep(self, step: DraftStep) -> bool:
        """Ask ``request.decide`` about ``step`` and keep it unless dropped. Returns True
        when drafting should go on."""
        action = self.request.decide(step)
        if action is Action.DROP:
            return False
        self.tokens.append(step.token)
        self.steps.append(step)
        branch = self.request.branch
        if branch is not None:
            n_extra = branch(step)
            if n_extra > 0:
                extra = top_candidates(step.probs, step.token, n_extra)
                if extra:
                    self.branches[step.index] = extra
        return action is not Action.STOP

    def finish(self, forwards: int) -> Draft:
        """The :class:`Draft` of the kept tokens (their [K, V] q under sampling)."""
        probs = None
        if not self.request.sampling.greedy and self.steps:
            probs = torch.stack([s.probs for s in self.steps])  # [K, V]
        return Draft(self.tokens, probs, self.steps, forwards, self.branches)


def top_candidates(probs: torch.Tensor, chosen: int, n: int) -> list[int]:
    """The ``n`` most likely tokens of a [V] distribution other than ``chosen`` (q > 0 only)."""
    vals, idx = probs.topk(min(n + 1, probs.shape[-1]))
    return [int(t) for v, t in zip(vals.tolist(), idx.tolist()) if v > 0 and t != chosen][:n]
