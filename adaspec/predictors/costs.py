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

MIN_VAR = 0.25  # weighted variance of n (tokens) from which a line's slope counts as identified


@dataclass
class WarmEma:
    """A moving average with a warm start: the plain mean of the first 1 / alpha values,
    then an exponential moving average at rate ``alpha`` (every cost model here uses it)."""

    value: float = 0.0
    n: int = 0  # values seen

    def add(self, x: float, alpha: float) -> float:
        self.n += 1
        self.value += max(alpha, 1.0 / self.n) * (x - self.value)
        return self.value


@dataclass
class DecayedLine:
    """Exponentially decayed sufficient statistics of points (n, v) for a least-squares
    line v = a + b n: ``sums`` = [w, w n, w n^2, w v, w n v] (each point weighs 1, and
    every older point is multiplied by ``decay`` per new one).

    The slope b is identified only while n has varied lately (weighted variance >=
    :data:`MIN_VAR`); when n stops varying (a policy settled on one length) the last
    identified b is kept: :meth:`slope`."""

    sums: list = field(default_factory=lambda: [0.0] * 5)
    last_slope: float | None = None  # b when last identified (None: never)

    def add(self, n: float, v: float, decay: float) -> None:
        self.sums = [decay * x for x in self.sums]
        for i, x in enumerate((1.0, n, n * n, v, n * v)):
            self.sums[i] += x
        _, _, var, cov = self.moments()
        if var >= MIN_VAR:
            self.last_slope = max(0.0, cov / var)

    def moments(self) -> tuple[float, float, float, float]:
        """(mean n, mean v, var n, cov(n, v)) of the weighted points (w > 0)."""
        w, sn, snn, sv, snv = self.sums
        mean_n, mean_v = sn / w, sv / w
        return mean_n, mean_v, snn / w - mean_n ** 2, snv / w - mean_n * mean_v

    def slope(self) -> float | None:
        """b >= 0, marginal v per unit of n, as last identified (None: not yet)."""
        return self.last_slope


@dataclass
class OnlineTau:
    """Tracks costs and yields ``tau`` (continue-drafting threshold) and ``tau_keep``."""

    tau0: float = 0.5
    tau_min: float = 0.05
    tau_max: float = 0.95
    alpha: float = 0.1
    trace: list = field(default_factory=list)
    _line: DecayedLine = field(default_factory=DecayedLine)  # (tokens verified, verify seconds)
    _c_d: WarmEma = field(default_factory=WarmEma)  # seconds per draft forward
    _round_s: WarmEma = field(default_factory=WarmEma)
    _committed: WarmEma = field(default_factory=WarmEma)

    def reset(self) -> None:
        self._c_d, self._round_s, self._committed = WarmEma(), WarmEma(), WarmEma()
        self._line = DecayedLine()
        self.trace = []

    @property
    def c_d(self) -> float:
        """Seconds per draft forward."""
        return self._c_d.value

    @property
    def T(self) -> float:  # noqa: N802 (the module doc's name)
        """Seconds per committed token."""
        return self._round_s.value / max(self._committed.value, 1e-9) if self._round_s.n else 0.0

    def update(self, draft_s: float, draft_forwards: int, verify_s: float, n_verified: int,
               committed: int) -> None:
        """One round: its draft time / forwards, verify time over n_verified tokens, tokens committed."""
        if draft_forwards > 0:
            self._c_d.add(draft_s / draft_forwards, self.alpha)
        self._round_s.add(draft_s + verify_s, self.alpha)
        self._committed.add(float(committed), self.alpha)
        self._line.add(float(n_verified), verify_s, 1.0 - self.alpha)
        self.trace.append(round(self.tau, 4))

    @property
    def slope(self) -> float:
        """b: marginal verify seconds per extra verified token (>= 0; 0 until identified)."""
        return self._line.slope() or 0.0

    def _clamp(self, x: float) -> float:
        return min(self.tau_max, max(self.tau_min, x))

    @property
    def tau(self) -> float:
        if self._round_s.n == 0 or self.T <= 0:
            return self.tau0
        return self._clamp((self.c_d + self.slope) / self.T)

    @property
    def tau_keep(self) -> float:
        if self._round_s.n == 0 or self.T <= 0:
            return self.tau_min
        return min(self.tau, self._clamp(self.slope / self.T))
