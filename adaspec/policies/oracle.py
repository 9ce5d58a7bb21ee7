"""``oracle``: drafts exactly the tokens the target's greedy decoding would accept.

Analysis only: it peeks at the target's own greedy continuation (asked of the engine,
untimed, through the ``before_generate`` hook). It compares the draft's *argmax* with that reference (a
function of the draft distribution, not of the sampled token), so under sampling it
stays lossless, although it is then only a heuristic.

In bf16 a k-token verify can break a near-tie differently from single-token decoding, so
the committed text may leave the reference; from then on the oracle has no future to
peek at and drafts (almost) nothing. ``report()`` gives where that happened
(``oracle_diverged_at``, new-token index, or None), so such runs can be discounted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import PolicyArgumentError
from ..types import Action, DraftStep, RoundContext
from . import register
from .base import Policy


@register
@dataclass
class OraclePolicy(Policy):
    """Keep drafting while the draft's argmax equals the target's next greedy token; drop
    the first position where it does not (the target would reject it).

    Args:
        k_max: upper bound on the draft length (default 64).
    """

    name = "oracle"
    k_max: int = 64
    _ref: list = field(default_factory=list, init=False, repr=False)
    _pos: int = field(default=0, init=False, repr=False)
    _diverged: int | None = field(default=None, init=False, repr=False)
    _checked: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.k_max < 1:
            raise PolicyArgumentError(f"oracle: k_max must be >= 1, got {self.k_max}")

    def reset(self) -> None:
        self._diverged, self._checked = None, 0

    def before_generate(self, prompt: list[int], plain_greedy: Callable[[], list[int]]) -> None:
        self._ref = list(plain_greedy())  # the target's own greedy continuation (untimed)

    def begin_round(self, ctx: RoundContext) -> int:
        self._pos = len(ctx.committed) - ctx.prompt_len  # reference index of the next token
        if self._diverged is None:  # compare only the tokens committed since the last check
            for j in range(self._checked, self._pos):
                if j >= len(self._ref) or ctx.committed[ctx.prompt_len + j] != self._ref[j]:
                    self._diverged = j
                    break
            self._checked = self._pos
        return max(1, min(self.k_max, len(self._ref) - self._pos))

    def decide(self, step: DraftStep) -> Action:
        j = self._pos + step.index - 1
        if j >= len(self._ref) or int(step.logits.argmax()) != self._ref[j]:
            return Action.DROP
        return Action.CONTINUE

    def report(self) -> dict:
        return {"oracle_diverged_at": self._diverged}
