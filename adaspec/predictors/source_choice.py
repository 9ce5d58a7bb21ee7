"""Per-round choice of draft source and n-gram draft length (n-gram copy, draft model, or
nothing) from predicted yield and measured cost, for ``context`` with ``--draft model+ngram``.

A round of source s that commits G tokens in C seconds is worth ``G - lam * C``, where
``lam`` is the measured throughput (committed tokens per second, exponential moving
averages over all rounds, rate ``alpha``): the choice that maximises this per round
maximises tokens per second over the whole generation (the renewal-reward argument; a
round that beats ``lam`` raises it). The candidates:

- n-gram, length k (1 .. budget): ``G = 1 + sum_{j<=k} S_j`` where ``S_j = P(the first j
  copied tokens are all accepted)``, and ``C = v(k + 1)``, the verify of k + 1 tokens (the
  copy itself is free). S_j comes from the match: a copy that has held for L tokens is
  expected to hold on in proportion to L (SuffixDecoding sets its draft length from the
  match length), so the prior conditional acceptance of the j-th copied token is
  ``(L - 2 + j) / (L - 1 + j)`` (j = 1: ``(L - 1) / L``), times the match's agreement
  (the share of earlier occurrences followed by the proposed token: how often that
  continuation recurred) at j = 1. Measured acceptance per position and per class of
  match (length bucket, agreement = 1 or < 1) corrects the prior as a Beta posterior
  with ``prior_weight`` pseudo-rounds. The best k is the draft length: long, recurrent
  matches get long drafts, short or ambiguous ones short drafts or none.
- model: the measured mean committed tokens and seconds (draft + verify) of a model
  round (the policy's own stop / drop rule inside); tried once before it is compared.
- none: 1 token in ``v(1)`` seconds.

``v(n) = a + b n`` is fitted by least squares on decayed sums of (tokens verified,
verify seconds) over every round; until n has varied, ``b = prior_slope * a``.
Only committed history and measured times are read, never this round's draft, so the
choice keeps greedy identity and exact sampling whatever it decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .costs import DecayedLine, WarmEma

_EDGES = (1, 2, 4, 8, 16, 32)  # bucket b holds lengths <= _EDGES[b]; the last one the rest


def length_bucket(length: int) -> int:
    for b, edge in enumerate(_EDGES):
        if length <= edge:
            return b
    return len(_EDGES)


def prior_survival(length: int, agreement: float, k: int) -> list[float]:
    """Prior S_1..S_k ([k]): P(the first j copied tokens are accepted) for a match of
    ``length`` tokens whose first proposed token followed ``agreement`` of its earlier
    occurrences (S_j = agreement * (L - 1) / (L - 1 + j))."""
    if length < 1:
        return [0.0] * k
    return [agreement * (length - 1) / (length - 1 + j) for j in range(1, k + 1)]


def _running_product(probs: tuple) -> list[float]:
    out, s = [], 1.0
    for p in probs:
        s *= p
        out.append(s)
    return out


@dataclass
class _Positions:
    """Copied tokens put to the test / accepted, per position j (1-based, index j - 1)."""

    tested: list = field(default_factory=list)
    accepted: list = field(default_factory=list)

    def add(self, drafted: int, accepted: int) -> None:
        for j in range(min(drafted, accepted + 1)):
            while len(self.tested) <= j:
                self.tested.append(0)
                self.accepted.append(0)
            self.tested[j] += 1
            self.accepted[j] += j < accepted


@dataclass(frozen=True)
class Plan:
    """A round's source and, for the n-gram source, its draft length (0 otherwise)."""

    source: str
    length: int = 0


@dataclass
class SourceChoice:
    """Online yield / cost per draft source; :meth:`plan` returns the round's :class:`Plan`.

    Args:
        alpha: EMA rate of the measured costs and yields (default 0.1).
        explore_len: before anything is measured, copy when the match is at least this
            long, else ask the model (default 3).
        min_len: never copy from a match shorter than this (default 2).
        prior_weight: pseudo-rounds behind the prior acceptance of each position (default 4).
        prior_slope: verify cost per extra token as a share of a one-token verify, until
            measured (default 0.1).
        explore_every: a round that would draft nothing drafts with the model instead
            when the model has not drafted for this many rounds (default 1: "none" only
            right after a model round measured slower than a plain step).
        clip: a measured verify (draft) time above ``clip`` times its current estimate is
            counted as ``clip`` times the estimate (default 1.5): a round stalled by another
            process on the machine must not bend the cost fits that steer every choice.
    """

    alpha: float = 0.1
    explore_len: int = 3
    min_len: int = 2
    prior_weight: float = 4.0
    prior_slope: float = 0.1
    explore_every: int = 1
    clip: float = 1.5
    _d: WarmEma = field(default_factory=WarmEma)  # draft seconds of a model round
    _pos: dict = field(default_factory=dict)  # (length bucket, agreement == 1) -> _Positions
    _m_gain: WarmEma = field(default_factory=WarmEma)
    _m_s: WarmEma = field(default_factory=WarmEma)
    _gain: WarmEma = field(default_factory=WarmEma)
    _s: WarmEma = field(default_factory=WarmEma)
    _fit: DecayedLine = field(default_factory=DecayedLine)  # (tokens verified, verify seconds)
    ngram_rounds: int = field(default=0, init=False)  # n-gram rounds seen since the reset
    _since_model: int = 0

    def reset(self) -> None:
        fresh = SourceChoice(self.alpha, self.explore_len, self.min_len, self.prior_weight,
                             self.prior_slope, self.explore_every, self.clip)
        self.__dict__.update(fresh.__dict__)

    # ------------------------------------------------------------------ estimates

    @staticmethod
    def match_class(length: int, agreement: float, cached: bool = False) -> tuple[int, bool, bool]:
        return length_bucket(length), agreement >= 1.0, cached

    def survival(self, length: int, agreement: float, k: int, probs: tuple = ()) -> list[float]:
        """S_1..S_k ([k]) for a match: the prior corrected by this class's measured
        per-position acceptance (Beta posterior, ``prior_weight`` pseudo-rounds). A
        suffix-cache copy (``probs``: its per-token frequency probabilities, [>= k]) has
        the running product of those as its prior and classes of its own."""
        prior = prior_survival(length, agreement, k) if len(probs) < k else _running_product(probs[:k])
        pos = self._pos.get(self.match_class(length, agreement, bool(probs)))
        out, s, prev = [], 1.0, 1.0
        for j in range(k):
            r0 = prior[j] / prev if prev > 0 else 0.0  # prior conditional acceptance at j + 1
            prev = prior[j]
            if pos is not None and j < len(pos.tested):
                r0 = (pos.accepted[j] + self.prior_weight * r0) / (pos.tested[j] + self.prior_weight)
            s *= r0
            out.append(s)
        return out

    def verify_s(self, n: int) -> float:
        """Estimated seconds of a verify over ``n`` tokens: a + b n (module doc)."""
        if self._fit.sums[0] <= 0:
            return 0.0
        mean_n, mean_v, _, _ = self._fit.moments()
        slope = self._fit.slope()
        if slope is None:
            base = mean_v / (1.0 + self.prior_slope * (mean_n - 1.0))  # v(1) under the prior
            return base * (1.0 + self.prior_slope * (n - 1))
        return max(0.0, mean_v + slope * (n - mean_n))

    @property
    def throughput(self) -> float | None:
        """Committed tokens per second over recent rounds (None before the first)."""
        return self._gain.value / self._s.value if self._s.n and self._s.value > 0 else None

    # ------------------------------------------------------------------ the choice

    def plan(self, length: int, agreement: float, budget: int, copyable: int | None = None,
             probs: tuple = ()) -> Plan:
        """Source and n-gram length for a round with this match and token budget.

        ``copyable`` caps the n-gram length (tokens the match can propose; default budget);
        ``probs``: a suffix-cache copy's per-token probabilities (see :meth:`survival`).
        """
        k_max = min(budget, budget if copyable is None else copyable)
        can_copy = length >= self.min_len and k_max > 0
        if self.throughput is None or (self.ngram_rounds == 0 and self._m_gain.n == 0):
            return Plan("ngram", k_max) if can_copy and length >= self.explore_len else Plan("model")
        if not self._m_gain.n and not (can_copy and length >= self.explore_len):
            return Plan("model")  # the model is tried once before it is compared
        best, best_r = Plan("none"), 1.0 / max(self.verify_s(1), 1e-9)
        if self._m_gain.n and self._m_s.value > 0:
            r = self._m_gain.value / self._m_s.value
            if r > best_r:
                best, best_r = Plan("model"), r
        if can_copy:
            gain = 1.0
            for k, s in enumerate(self.survival(length, agreement, k_max, probs), start=1):
                gain += s
                r = gain / max(self.verify_s(k + 1), 1e-9)
                if r > best_r:
                    best, best_r = Plan("ngram", k), r
        if best.source == "none" and self._since_model >= self.explore_every:
            return Plan("model")  # re-measure the model now and then: its yield drifts
        return best

    def update(self, source: str, length: int, agreement: float, draft_s: float, verify_s: float,
               verified: int, drafted: int, accepted: int, committed: int, cached: bool = False) -> None:
        """One verified round: its source and match, seconds drafting / verifying,
        ``verified`` tokens in the verify forward (root included), ``drafted`` chain tokens,
        ``accepted`` of them, ``committed`` tokens; ``cached``: a suffix-cache copy."""
        a = self.alpha
        if self._fit.sums[0] > 0 and self._fit.slope() is not None:
            verify_s = min(verify_s, self.clip * self.verify_s(verified))
        if source == "model" and self._d.n:
            draft_s = min(draft_s, self.clip * self._d.value)
        self._gain.add(committed, a)
        self._s.add(draft_s + verify_s, a)
        self._fit.add(verified, verify_s, 1.0 - a)  # (re-)identifies the slope while n varies
        if source == "ngram":
            self.ngram_rounds += 1
            key = self.match_class(length, agreement, cached)
            self._pos.setdefault(key, _Positions()).add(drafted, accepted)
        self._since_model = 0 if source == "model" else self._since_model + 1
        if source == "model":
            self._d.add(draft_s, a)
            self._m_gain.add(committed, a)
            self._m_s.add(draft_s + verify_s, a)

    def report(self) -> dict:
        by_class = {f"{b}{'=' if agree else '<'}{'c' if cached else ''}":
                    [round(x / t, 3) if t else None for x, t in zip(p.accepted[:8], p.tested[:8])]
                    for (b, agree, cached), p in sorted(self._pos.items())}
        return {"ngram_accept_by_class": by_class, "model_gain": self._m_gain.value,
                "model_round_s": self._m_s.value, "tokens_per_s_est": self.throughput or 0.0,
                "verify_slope_s": self._fit.slope() or 0.0}
