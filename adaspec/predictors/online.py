"""Acceptance estimates that need no trained predictor: the draft's own confidence,
calibrated online against the target's verdicts.

For a pair nobody trained a predictor for, ``context`` (``predictor=online``) reads the
draft's top-1 probability c_i = max_v q_i(v) at every drafted position (``DraftStep.top1``:
under greedy from the draft's scored logits, no full-vocabulary q) and estimates P(x_i accepted | x_<i
accepted) per bin of c: a Beta posterior whose prior mean is c itself (a draft that says
0.9 is taken at its word until the target says otherwise) with ``prior_weight``
pseudo-observations, updated from every token the target put to the test (the accepted
ones and the first rejected one). On the default pair the draft's top-1 probability alone
ranks held-out tokens almost as well as the learned head (AUC 0.824 vs 0.830, see the
predictor card), so little is lost, and nothing has to be trained.

c depends only on the draft distribution, not on the sampled token, so DROP decisions
made from it stay lossless under sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BINS = 10


@dataclass
class OnlineAcceptance:
    """Per-bin Beta posteriors of acceptance given the draft's top-1 probability.

    Args:
        prior_weight: pseudo-observations behind the prior mean c (default 4).
        bins: equal-width bins over c in [0, 1] (default 10).
    """

    prior_weight: float = 4.0
    bins: int = BINS
    tested: list = field(default_factory=list)    # [bins] tokens put to the test
    accepted: list = field(default_factory=list)  # [bins] of them accepted

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.tested = [0] * self.bins
        self.accepted = [0] * self.bins

    def _bin(self, c: float) -> int:
        return min(self.bins - 1, max(0, int(c * self.bins)))

    def prob(self, c: float) -> float:
        """Estimated P(accept) of a token drafted with top-1 probability ``c``."""
        b = self._bin(c)
        w = self.prior_weight
        return (self.accepted[b] + w * c) / (self.tested[b] + w)

    def update(self, confidences: list[float], accepted: int) -> None:
        """One verified chain: the top-1 probabilities of its K drafted tokens and the
        number accepted; tokens 1..min(K, accepted + 1) were put to the test."""
        for i, c in enumerate(confidences[: accepted + 1]):
            b = self._bin(c)
            self.tested[b] += 1
            self.accepted[b] += i < accepted

    def report(self) -> dict:
        return {"online_accept_by_top1": [round(a / t, 3) if t else None
                                          for a, t in zip(self.accepted, self.tested, strict=True)]}
