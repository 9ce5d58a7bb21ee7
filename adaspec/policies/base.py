"""The policy protocol: how long to draft, token by token, and what to learn after verify."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from ..types import Action, DraftNeeds, DraftStep, RoundContext, RoundOutcome


class Policy:
    """Base class. Subclasses override what they need; state is reset per generate call.

    Lifecycle per generate(): ``before_generate(prompt, plain_greedy)``, ``reset()``, then
    per round ``begin_round(ctx) -> budget``, ``decide(step)`` after every drafted token,
    ``observe(outcome)`` after verification.
    """

    name: ClassVar[str] = "base"
    needs: DraftNeeds = DraftNeeds()
    needs_target_hidden: bool = False

    def reset(self) -> None:
        """Forget per-call state."""

    def begin_round(self, ctx: RoundContext) -> int:
        """Upper bound on the number of tokens to draft this round (before ctx.max_budget)."""
        raise NotImplementedError

    def decide(self, step: DraftStep) -> Action:
        """Keep drafting, stop after this token, or drop it."""
        return Action.CONTINUE

    def extra_candidates(self, step: DraftStep) -> int:
        """Extra candidates to verify beside ``step.token`` at this position (0 = none).

        The drafter adds the next most likely tokens of q at this position as leaves of
        a token tree verified in the same target forward. Default: never branch.
        """
        return 0

    def observe(self, outcome: RoundOutcome) -> None:
        """Learn from a verified round."""

    def check_pair(self, target: object, draft: object) -> None:
        """Raise :class:`PolicyArgumentError` if a learned part was trained for another pair.

        ``target`` / ``draft`` are :class:`adaspec.checkpoints.loader.LoadedModel` (either may be None).
        Policies backed by a predictor keep it in ``self._pred``; others have nothing to check.
        """
        pred = getattr(self, "_pred", None)
        if pred is not None:
            pred.check_pair(target, draft)

    def report(self) -> dict:
        """Policy-specific statistics for GenerationStats.extra (e.g. threshold trace)."""
        return {}

    def before_generate(self, prompt: list[int], plain_greedy: Callable[[], list[int]]) -> None:
        """Called once per generate(), before ``reset()`` and before timing starts.

        ``plain_greedy()`` runs plain greedy decoding of the target on ``prompt`` (same stop
        rules) and returns the new ids; it costs a full generation, so only analysis
        policies (the oracle) call it. Default: nothing.
        """
