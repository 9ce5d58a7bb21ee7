"""``oracle``: drafts exactly the tokens the target's greedy decoding would accept.

Analysis only: it peeks at the target's own greedy continuation (computed untimed by
the engine before the call). It compares the draft's *argmax* with that reference (a
function of the draft distribution, not of the sampled token), so under sampling it
stays lossless, although it is then only a heuristic.
"""

from __future__ import annotations

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
    needs_reference = True
    k_max: int = 64
    _ref: list = field(default_factory=list, init=False, repr=False)
    _pos: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.k_max < 1:
            raise PolicyArgumentError(f"oracle: k_max must be >= 1, got {self.k_max}")

    def set_reference(self, token_ids: list[int]) -> None:
        self._ref = list(token_ids)

    def begin_round(self, ctx: RoundContext) -> int:
        self._pos = len(ctx.committed) - ctx.prompt_len  # reference index of the next token
        return max(1, min(self.k_max, len(self._ref) - self._pos))

    def decide(self, step: DraftStep) -> Action:
        j = self._pos + step.index - 1
        if j >= len(self._ref) or int(step.logits.argmax()) != self._ref[j]:
            return Action.DROP
        return Action.CONTINUE
