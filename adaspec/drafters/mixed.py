"""Several draft sources behind one drafter: per round, draft from the n-gram source, the
draft model, or nothing.

The choice is made before drafting, from the n-gram :class:`~.ngram.Match` of the current
text (free to compute) and whatever the chooser has learned; it never looks at this round's
draft tokens, so greedy output stays identical and sampling stays exact whatever is chosen.
Without a chooser the rule is the simple one: the n-gram continuation when its match is at
least ``min_match`` tokens long, else the model. A policy with a ``choose_source(match,
budget)`` method (``context``) is wired in as the chooser by :func:`.registry.build_drafter`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Generator
from typing import Any

import torch

from ..types import Draft, DraftRequest
from .model import ModelDrafter, run_steps
from .ngram import Match, NgramDrafter

SOURCES = ("ngram", "model", "none")  # what a source choice may return (the one list)
Chooser = Callable[[Match, int], str]


class MixedDrafter:
    """The draft model plus the n-gram source; one of them (or none) drafts each round.

    Args:
        model: the model drafter.
        ngram: the n-gram drafter (its own ``min_match`` is ignored here).
        min_match: the simple rule's threshold on the match length (default 3).
        chooser: ``(match, budget) -> "ngram" | "model" | "none"``; None = the simple rule.
    """

    def __init__(self, model: ModelDrafter, ngram: NgramDrafter, min_match: int = 3,
                 chooser: Chooser | None = None) -> None:
        self.model, self.ngram, self.min_match, self.chooser = model, ngram, min_match, chooser
        self.max_context = model.max_context
        self.rounds: Counter[str] = Counter()
        self.last_source = "none"
        # a feature head as the model source reads the target's features every round
        self.needs_target_hidden = getattr(model, "needs_target_hidden", False)

    def observe_target(self, pos0: int, hidden: torch.Tensor) -> None:
        """Pass the target's features on to a model source that reads them (a feature head)."""
        self.model.observe_target(pos0, hidden)

    def reset(self) -> None:
        self.model.reset()
        self.ngram.reset()
        self.rounds = Counter()

    def prefill(self, context: list[int]) -> None:
        self.model.prefill(context)
        self.ngram.prefill(context)

    def rollback(self, committed: list[int]) -> None:
        # after an n-gram round the model's cache lags; its next forward feeds the gap
        self.model.rollback(committed)
        self.ngram.rollback(committed)  # remembers the text for the suffix cache

    def choose(self, match: Match, budget: int) -> str:
        if self.chooser is not None:
            source = self.chooser(match, budget)
            if source not in SOURCES:
                raise ValueError(f"draft source chooser returned {source!r}; expected one of {SOURCES}")
            return source
        return "ngram" if match.length >= self.min_match else "model"

    def propose(self, context: list[int], request: DraftRequest) -> Draft:
        return run_steps(self.propose_steps(context, request))

    def propose_steps(self, context: list[int], request: DraftRequest) -> Generator[Any, Any, Draft]:
        """:meth:`propose` with the model's draft forwards handed out (a batch engine runs
        many sequences' draft forwards together; see ``ModelDrafter.propose_steps``)."""
        match = self.ngram.match(context, request.budget)
        source = self.choose(match, request.budget)
        if source == "ngram" and not match.tokens:
            source = "model"  # nothing to copy: never worse than the model
        self.rounds[source] += 1
        self.last_source = source
        if source == "ngram":
            return self.ngram.draft_from(match, context, request)
        if source == "model":
            steps = getattr(self.model, "propose_steps", None)  # a head drafter has none
            if steps is None:
                return self.model.propose(context, request)
            return (yield from steps(context, request))
        return Draft.empty()

    def report(self) -> dict:
        return {"source_rounds": dict(self.rounds), **self.ngram.report()}
