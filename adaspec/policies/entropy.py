"""``entropy``: do not draft a position whose draft distribution is too uncertain.

High draft entropy bounds acceptance from above (SVIP, AdaEDL). The entropy of position
i is known before x_i is drawn, so dropping x_i on it is lossless under sampling too.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import PolicyArgumentError
from ..predictors.features import entropy_and_top
from ..types import Action, DraftStep, RoundContext
from . import register
from .base import Policy


@register
@dataclass
class EntropyPolicy(Policy):
    """Draft up to ``k_max`` tokens; end the draft before the first position whose draft
    entropy (nats) exceeds ``h`` (the first position of a round is always drafted when
    ``min_k`` >= 1).

    Args:
        h: entropy threshold in nats (default 1.5).
        k_max: upper bound on the draft length (default 16).
        min_k: positions drafted regardless of entropy (default 1).
    """

    name = "entropy"
    h: float = 1.5
    k_max: int = 16
    min_k: int = 1

    def __post_init__(self) -> None:
        if self.h < 0 or self.k_max < 1 or not 0 <= self.min_k <= self.k_max:
            raise PolicyArgumentError(f"entropy: need h >= 0 and 0 <= min_k <= k_max >= 1; got {self}")

    def begin_round(self, ctx: RoundContext) -> int:
        return self.k_max

    def decide(self, step: DraftStep) -> Action:
        if step.index > self.min_k and entropy_and_top(step.scored, 1)[0] > self.h:
            return Action.DROP
        return Action.CONTINUE
