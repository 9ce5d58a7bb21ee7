"""Online threshold for the ``context`` policy, from measured costs (docs/design.md §1 "Online threshold").

Cost model, refreshed after every round with exponential moving averages (rate ``alpha``):
- c_d: seconds per draft forward (draft_s / draft forwards; includes the predictor);
- v(n) = a + b n: seconds of a verify forward over n tokens, b fitted by least squares on
  decayed sufficient statistics of (n, verify_s) (b = 0 until n has varied; when the
  policy settles on one length and n stops varying, the last identified b is kept);
- T: seconds per committed token = EMA(draft_s + verify_s) / EMA(tokens committed).

Drafting one more token i pays when P(x_1..x_i all accepted) * T > c_d + b, so the
threshold on the predicted cumulative acceptance is tau = (c_d + b) / T, and a token
already drafted (its draft cost sunk) is worth keeping when P_i * T > b, i.e. above
tau_keep = b / T. Both are clamped to [tau_min, tau_max]. T itself depends on the policy,
so tau is a fixed point reached as the moving averages settle (a few dozen rounds).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DecayedLine:
    """Exponentially decayed sufficient statistics of points (n, v) for a least-squares
    line v = a + b n: ``sums`` = [w, w n, w n^2, w v, w n v] (each point weighs 1, and
    every older point is multiplied by ``decay`` per new one)."""

    sums: list = field(default_factory=lambda: [0.0] * 5)

    def add(self, n: float, v: float, decay: float) -> None:
        self.sums = [decay * x for x in self.sums]
        for i, x in enumerate((1.0, n, n * n, v, n * v)):
            self.sums[i] += x

    def moments(self) -> tuple[float, float, float, float]:
        """(mean n, mean v, var n, cov(n, v)) of the weighted points (w > 0)."""
        w, sn, snn, sv, snv = self.sums
        mean_n, mean_v = sn / w, sv / w
        return mean_n, mean_v, snn / w - mean_n ** 2, snv / w - mean_n * mean_v


@dataclass
class OnlineTau:
    """Tracks costs and yields ``tau`` (continue-drafting threshold) and ``tau_keep``."""

    tau0: float = 0.5
    tau_min: float = 0.05
    tau_max: float = 0.95
    alpha: float = 0.1
    c_d: float = 0.0
    T: float = 0.0
    trace: list = field(default_factory=list)
    _line: DecayedLine = field(default_factory=DecayedLine)  # (tokens verified, verify seconds)
    _round_s: float = 0.0
    _committed: float = 0.0
    _rounds: int = 0
    _last_slope: float = 0.0

    def reset(self) -> None:
        self.c_d = self.T = self._round_s = self._committed = 0.0
        self._line = DecayedLine()
        self._rounds = 0
        self._last_slope = 0.0
        self.trace = []

    def _ema(self, old: float, new: float) -> float:
        # first observation initialises; then EMA with a faster start (1/n for n < 1/alpha)
        if self._rounds <= 1:
            return new
        a = max(self.alpha, 1.0 / self._rounds)
        return (1 - a) * old + a * new

    def update(self, draft_s: float, draft_forwards: int, verify_s: float, n_verified: int,
               committed: int) -> None:
        """One round: its draft time / forwards, verify time over n_verified tokens, tokens committed."""
        self._rounds += 1
        if draft_forwards > 0:
            self.c_d = self._ema(self.c_d, draft_s / draft_forwards)
        self._round_s = self._ema(self._round_s, draft_s + verify_s)
        self._committed = self._ema(self._committed, float(committed))
        self.T = self._round_s / max(self._committed, 1e-9)
        self._line.add(float(n_verified), verify_s, 1.0 - self.alpha)
        self._last_slope = self.slope
        self.trace.append(round(self.tau, 4))

    @property
    def slope(self) -> float:
        """b: marginal verify seconds per extra verified token (>= 0)."""
        if self._line.sums[0] <= 0:
            return 0.0
        _, _, var, cov = self._line.moments()
        if var < 0.25:  # n has hardly varied lately: keep the last identified slope
            return self._last_slope
        return max(0.0, cov / var)

    def _clamp(self, x: float) -> float:
        return min(self.tau_max, max(self.tau_min, x))

    @property
    def tau(self) -> float:
        if self._rounds == 0 or self.T <= 0:
            return self.tau0
        return self._clamp((self.c_d + self.slope) / self.T)

    @property
    def tau_keep(self) -> float:
        if self._rounds == 0 or self.T <= 0:
            return self.tau_min
        return min(self.tau, self._clamp(self.slope / self.T))
