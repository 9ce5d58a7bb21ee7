"""Per-round choice of draft source (n-gram copy, draft model, or nothing) from measured
yield and cost, for the ``context`` policy with ``--draft model+ngram``.

Each source's throughput is estimated online (exponential moving averages, rate ``alpha``):

- n-gram: committed tokens per round, per bucket of the match length (1, 2, 3-4, 5-8,
  9-16, 17-32, 33+), divided by the seconds of an n-gram round (its verify: the copy is free);
- model: committed tokens per model round / seconds per model round (draft + verify; the
  policy's own stop / drop rule is inside, so a round it drops counts here);
- none: 1 token / seconds of a round that verified nothing (known once one was seen).

The source with the highest estimated tokens per second drafts. A bucket never tried is
explored when the match is at least ``explore_len`` tokens long (the simple rule), and the
model is tried once before it is compared. Only committed history and measured times are
read, never this round's draft, so the choice keeps greedy identity and exact sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_EDGES = (1, 2, 4, 8, 16, 32)  # bucket b holds lengths <= _EDGES[b]; the last one the rest


def length_bucket(length: int) -> int:
    for b, edge in enumerate(_EDGES):
        if length <= edge:
            return b
    return len(_EDGES)


@dataclass
class _Ema:
    value: float = 0.0
    n: int = 0

    def add(self, x: float, alpha: float) -> None:
        self.n += 1
        a = max(alpha, 1.0 / self.n)  # the mean until 1/alpha samples, then an EMA
        self.value += a * (x - self.value)


@dataclass
class SourceChoice:
    """Online yield / cost per draft source; ``choose`` returns "ngram", "model" or "none"."""

    alpha: float = 0.1
    explore_len: int = 3
    min_len: int = 2
    _ng_gain: list = field(default_factory=lambda: [_Ema() for _ in range(len(_EDGES) + 1)])
    _ng_s: _Ema = field(default_factory=_Ema)
    _m_gain: _Ema = field(default_factory=_Ema)
    _m_s: _Ema = field(default_factory=_Ema)
    _none_s: _Ema = field(default_factory=_Ema)

    def reset(self) -> None:
        fresh = SourceChoice(self.alpha, self.explore_len, self.min_len)
        self.__dict__.update(fresh.__dict__)

    def rates(self, match_len: int) -> dict[str, float | None]:
        """Estimated tokens per second of each source (None: not measured yet)."""
        g = self._ng_gain[length_bucket(match_len)]
        return {
            "ngram": g.value / self._ng_s.value if g.n and self._ng_s.value > 0 else None,
            "model": self._m_gain.value / self._m_s.value if self._m_gain.n and self._m_s.value > 0 else None,
            "none": 1.0 / self._none_s.value if self._none_s.n and self._none_s.value > 0 else None,
        }

    def choose(self, match_len: int) -> str:
        if match_len < self.min_len:
            return "model"
        r = self.rates(match_len)
        if r["ngram"] is None:
            return "ngram" if match_len >= self.explore_len else "model"
        if r["model"] is None:
            return "model"
        return max(("ngram", "model", "none"), key=lambda s: r[s] if r[s] is not None else -1.0)

    def update(self, source: str, match_len: int, seconds: float, committed: int, drafted: int) -> None:
        """One verified round of ``source`` (drafted = tokens it verified besides the root)."""
        if source == "ngram":
            self._ng_gain[length_bucket(match_len)].add(committed, self.alpha)
            self._ng_s.add(seconds, self.alpha)
        elif source == "model":
            self._m_gain.add(committed, self.alpha)
            self._m_s.add(seconds, self.alpha)
        if drafted == 0:
            self._none_s.add(seconds, self.alpha)

    def report(self) -> dict:
        return {"ngram_gain_by_len": [round(e.value, 3) for e in self._ng_gain],
                "ngram_round_s": self._ng_s.value, "model_gain": self._m_gain.value,
                "model_round_s": self._m_s.value}
