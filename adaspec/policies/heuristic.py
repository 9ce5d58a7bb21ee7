"""``heuristic``: Hugging Face's assisted-generation schedule (K += 2 / K -= 1)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import PolicyArgumentError
from ..types import RoundContext, RoundOutcome
from . import register
from .base import Policy


@register
@dataclass
class HeuristicPolicy(Policy):
    """K starts at ``k`` each generate call; K += 2 after a fully accepted draft, else
    K = max(1, K - 1) (transformers' ``num_assistant_tokens_schedule="heuristic"``).

    Args:
        k: initial draft length (default 5, as in transformers).
        k_max: upper bound on K (default 32; transformers has none besides max_new_tokens).
    """

    name = "heuristic"
    k: int = 5
    k_max: int = 32
    _k: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.k < 1 or self.k_max < self.k:
            raise PolicyArgumentError(f"heuristic: need 1 <= k <= k_max, got k={self.k} k_max={self.k_max}")
        self._k = self.k

    def reset(self) -> None:
        self._k = self.k

    def begin_round(self, ctx: RoundContext) -> int:
        return self._k

    def observe(self, outcome: RoundOutcome) -> None:
        k = len(outcome.draft.tokens)
        if k == 0:
            return
        if outcome.verdict.accepted == k:
            self._k = min(self.k_max, self._k + 2)
        else:
            self._k = max(1, self._k - 1)
