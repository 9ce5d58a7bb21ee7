"""``specdecpp``: SpecDec++ adaptive draft length from a learned acceptance head.

A residual MLP on the draft's last hidden state h_i ([d]) predicts p_i = P(x_i accepted |
x_<i accepted). After drafting token K the draft stops when the probability that at
least one of x_1..x_K is rejected exceeds h:  1 - prod_{i<=K} p_i > h  (SpecDec++, h = 0.3,
K clamped to [k_min, k_max]). Stopping keeps the token, so the rule is lossless.

The shipped head is trained with a class weight of 6 on rejections (SpecDec++), so its raw
probabilities are low by design and any h stops at k_min; it ships with a Platt calibration
fitted on greedy train-split traces, and h = 0.4 is the best threshold for it in a replay of
dev-split traces of every source set (``adaspec.train.predictor_sim``: 1.429x vs 1.432x for
the best fixed K = 2; h = 0.3, the paper's, 1.424x).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import PolicyArgumentError
from ..predictors.models import Predictor, load_predictor
from ..types import Action, DraftNeeds, DraftStep, RoundContext, RoundOutcome
from . import register
from .base import Policy


@register
@dataclass
class SpecDecPPPolicy(Policy):
    """Stop after token K once 1 - prod_{i<=K} p_hat_i > h.

    Args:
        predictor: predictor directory (default: the shipped one in
            ``adaspec/assets/predictors/specdecpp``).
        h: stop threshold on the probability of a rejection so far (default 0.4, tuned on dev).
        k_min / k_max: draft length bounds (defaults 2 and 20).
    """

    name = "specdecpp"
    needs = DraftNeeds(hidden=True)
    predictor: str | None = None
    h: float = 0.4
    k_min: int = 2
    k_max: int = 20
    _pred: Predictor | None = field(default=None, init=False, repr=False)
    _prod: float = field(default=1.0, init=False, repr=False)
    _round_p: list = field(default_factory=list, init=False, repr=False)  # p_hat of this round's tokens
    _pairs: list = field(default_factory=list, init=False, repr=False)  # [p_hat, accepted] per tested token

    def __post_init__(self) -> None:
        if not 0.0 < self.h < 1.0 or not 1 <= self.k_min <= self.k_max:
            raise PolicyArgumentError(f"specdecpp: need 0 < h < 1 and 1 <= k_min <= k_max; got {self}")
        self._pred = load_predictor(self.predictor, "specdecpp")

    def reset(self) -> None:
        self._pairs = []

    def begin_round(self, ctx: RoundContext) -> int:
        self._prod, self._round_p = 1.0, []
        return self.k_max

    @torch.inference_mode()
    def decide(self, step: DraftStep) -> Action:
        p = self._pred.step_prob(step, "specdecpp")
        self._prod *= p
        self._round_p.append(p)
        if step.index >= self.k_min and 1.0 - self._prod > self.h:
            return Action.STOP
        return Action.CONTINUE

    def observe(self, outcome: RoundOutcome) -> None:
        """Record (p_hat, accepted) for every token the target put to the test: the accepted
        ones and the first rejected one (the bench's calibration plot reads them)."""
        m = outcome.verdict.accepted
        self._pairs += [[round(p, 4), int(i < m)] for i, p in enumerate(self._round_p[: m + 1])]

    def report(self) -> dict:
        return {"calibration": list(self._pairs)}
