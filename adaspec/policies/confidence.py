"""``confidence``: stop after a token the draft itself is unsure of (q(x) < t), with t
re-fitted online from this call's accepted / rejected history (transformers'
``assistant_confidence_threshold``, llama.cpp ``p_min``).

The rule reads the sampled token's probability, so it may only STOP (keep the token and
draft no further), which is lossless for any stopping rule; it never DROPs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..errors import PolicyArgumentError
from ..types import Action, DraftStep, RoundContext, RoundOutcome
from . import register
from .base import Policy


def fit_threshold(scores: list[float], accepted: list[bool], fn_weight: float = 3.0) -> float | None:
    """argmin over thresholds t of FPR(t) + fn_weight * FNR(t), where a token is predicted
    "accepted" iff its score >= t (positives = accepted tokens, as in transformers).

    Returns None unless both classes are present. Candidate thresholds are the observed
    scores (the ROC curve's corners).
    """
    pos = sum(accepted)
    neg = len(accepted) - pos
    if pos == 0 or neg == 0:
        return None
    pairs = sorted(zip(scores, accepted, strict=True))  # ascending score
    best_t, best_cost = None, float("inf")
    fn = 0  # accepted tokens with score < t
    tn = 0  # rejected tokens with score < t
    i = 0
    while i < len(pairs):
        t = pairs[i][0]
        cost = (neg - tn) / neg + fn_weight * fn / pos
        if cost < best_cost:
            best_t, best_cost = t, cost
        while i < len(pairs) and pairs[i][0] == t:  # move all ties below the next threshold
            if pairs[i][1]:
                fn += 1
            else:
                tn += 1
            i += 1
    return best_t


@register
@dataclass
class ConfidencePolicy(Policy):
    """Draft up to ``k_max`` tokens; stop after a token with q(x) < t (the token is kept).

    Args:
        t: initial threshold (default 0.4, transformers' default), reset per generate call.
        k_max: upper bound on the draft length (default 16).
        adapt: re-fit t after every round from the last ``history`` drafted tokens
            (tokens up to and including the first rejection), minimising FPR + 3*FNR.
        history: tokens of history used for the fit (default 256).
        t_min / t_max: bounds on the fitted threshold.
    """

    name = "confidence"
    t: float = 0.4
    k_max: int = 16
    adapt: bool = True
    history: int = 256
    t_min: float = 0.01
    t_max: float = 0.95
    _t: float = field(default=0.0, init=False, repr=False)
    _hist: deque = field(default_factory=deque, init=False, repr=False)
    _trace: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.t <= 1.0 or self.k_max < 1 or not 0 <= self.t_min <= self.t_max <= 1:
            raise PolicyArgumentError(f"confidence: need 0 <= t <= 1, k_max >= 1, t_min <= t_max; got {self}")
        self.reset()

    def reset(self) -> None:
        self._t = self.t
        self._hist = deque(maxlen=self.history)
        self._trace = []

    def begin_round(self, ctx: RoundContext) -> int:
        return self.k_max

    def decide(self, step: DraftStep) -> Action:
        return Action.STOP if step.token_prob < self._t else Action.CONTINUE

    def observe(self, outcome: RoundOutcome) -> None:
        steps, m = outcome.draft.steps, outcome.verdict.accepted
        for i, step in enumerate(steps[: m + 1]):  # later tokens were not tried conditionally
            self._hist.append((step.token_prob, i < m))
        if self.adapt and steps:
            t = fit_threshold([h[0] for h in self._hist], [h[1] for h in self._hist])
            if t is not None:
                self._t = min(self.t_max, max(self.t_min, t))
        self._trace.append(round(self._t, 4))

    def report(self) -> dict:
        return {"confidence_threshold_trace": list(self._trace), "confidence_threshold": self._t}
