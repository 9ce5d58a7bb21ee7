"""The drafter protocol."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from ..sampling import SamplingConfig
from ..types import Action, Draft, DraftNeeds, DraftStep

DecideFn = Callable[[DraftStep], Action]
BranchFn = Callable[[DraftStep], int]

__all__ = ["BranchFn", "DecideFn", "DraftNeeds", "Drafter"]  # DraftNeeds lives in adaspec.types


class Drafter(Protocol):
    """Proposes up to ``budget`` tokens after ``context``, asking ``decide`` after each."""

    max_context: int

    def reset(self) -> None:
        """Start of a generate call: drop all state."""

    def prefill(self, context: list[int]) -> None:
        """Optionally pre-compute state for ``context`` (prompt minus its last token)."""

    def rollback(self, committed: list[int]) -> None:
        """Drop state for tokens that were not committed (after verification)."""

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
        """Draft up to ``budget`` tokens after ``context`` (committed ids).

        ``branch(step)`` (optional) returns how many extra candidates to add at a kept
        position (``Draft.branches``)."""
