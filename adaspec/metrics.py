"""Mergeable run statistics (docs/design.md §2): counts that add up exactly, ratios read from them.

A :class:`RunMetrics` holds only counts and seconds, so the statistics of several runs
(turns, repeats, prompts) are their sum, field by field, histograms position by
position: ``a + b`` is exactly the statistics of a's rounds followed by b's. Every ratio
(τ, acceptance, per-position acceptance, tokens/s, ...) is then read from the pooled
counts, never averaged over runs.

Definitions (docs/design.md §2):

- τ = new tokens / target (verify) forwards: tokens committed per verify, the
  bonus / recovered token included; plain decoding = 1.
- acceptance rate = accepted draft tokens / drafted tokens (depends on the draft length).
- per-position acceptance p_i = P(token i accepted | tokens < i accepted)
  = pos_accepted[i-1] / pos_tested[i-1], over the rounds whose draft reached position i
  with tokens 1..i-1 accepted.
- accept_hist[m] = rounds that accepted m draft tokens.

This module is runtime code: it imports nothing from adaspec (the engine's
:class:`~adaspec.types.GenerationStats` extends it; the bench and the draft evaluation
pool it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

Empty = TypeVar("Empty", float, None)

HISTOGRAMS = ("accept_hist", "pos_tested", "pos_accepted")


def ratio(num: float, den: float, empty: Empty = 0.0) -> float | Empty:
    """num / den, or ``empty`` when there is nothing to divide by (den == 0)."""
    return num / den if den else empty


def add_hist(a: list[int], b: list[int]) -> list[int]:
    """Position-by-position sum of two count histograms of any lengths."""
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]


@dataclass
class RunMetrics:
    """Counts and seconds of one or more generations; ``+`` pools runs exactly.

    Attributes:
        prompt_tokens / new_tokens: prompt and generated tokens.
        wall_s / prefill_s / draft_s / verify_s / policy_s: seconds (wall time of the
            generate calls and its stages; policy = policy and predictor overhead).
        target_forwards: verification forwards of the target (prefill excluded).
        draft_forwards: draft-model forward calls (dropped tokens included).
        drafted_tokens / accepted_tokens: draft chain tokens verified / accepted.
        rounds: draft-verify rounds.
        tree_nodes: draft tokens verified, extra candidates included.
        branch_rounds: rounds that verified a token tree (some extra candidates);
        branch_accepts: of those, rounds won by an extra candidate.
        accept_hist: accept_hist[m] = rounds with m draft tokens accepted.
        pos_tested: pos_tested[i] = rounds whose draft reached position i+1 with positions
            1..i all accepted (token i+1 was put to the test);
        pos_accepted: pos_accepted[i] = of those, rounds where token i+1 was accepted.
    """

    prompt_tokens: int = 0
    new_tokens: int = 0
    wall_s: float = 0.0
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    policy_s: float = 0.0
    target_forwards: int = 0
    draft_forwards: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    rounds: int = 0
    tree_nodes: int = 0
    branch_rounds: int = 0
    branch_accepts: int = 0
    accept_hist: list[int] = field(default_factory=list)
    pos_tested: list[int] = field(default_factory=list)
    pos_accepted: list[int] = field(default_factory=list)

    def record_round(self, drafted: int, accepted: int) -> None:
        """Count one round that verified ``drafted`` chain tokens and accepted the first
        ``accepted`` of them (the caller counts its forwards and committed tokens)."""
        self.rounds += 1
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        _bump(self.accept_hist, accepted)
        for i in range(min(drafted, accepted + 1)):  # tokens 1..accepted, and the rejected one
            _bump(self.pos_tested, i)
            if i < accepted:
                _bump(self.pos_accepted, i)

    # --- pooling -----------------------------------------------------------------------

    def counts(self) -> dict[str, Any]:
        """Every count as a plain dict (histograms copied): a bench results row's counters."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), list) else v)
                for f in dataclasses.fields(RunMetrics)}

    @classmethod
    def from_counts(cls, row: Mapping[str, Any]) -> RunMetrics:
        """The counters of a dict (e.g. a results row); absent or null ones count 0 (rows
        written before a counter existed)."""
        out = cls()
        for f in dataclasses.fields(RunMetrics):
            v = row.get(f.name)
            if v:
                setattr(out, f.name, list(v) if f.name in HISTOGRAMS else v)
        return out

    def merge(self, other: RunMetrics) -> RunMetrics:
        """The statistics of ``self``'s rounds followed by ``other``'s (a new RunMetrics:
        counts and seconds summed, histograms summed position by position)."""
        out = RunMetrics()
        for f in dataclasses.fields(RunMetrics):
            a, b = getattr(self, f.name), getattr(other, f.name)
            setattr(out, f.name, add_hist(a, b) if f.name in HISTOGRAMS else a + b)
        return out

    __add__ = merge

    @staticmethod
    def pool(runs: Iterable[RunMetrics]) -> RunMetrics:
        """The sum of ``runs`` in order (an empty RunMetrics for none)."""
        out = RunMetrics()
        for r in runs:
            out = out.merge(r)
        return out

    # --- ratios (docs/design.md §2) ------------------------------------------------------------

    @property
    def tokens_per_s(self) -> float:
        """New tokens / wall seconds (pooled: the whole run's rate)."""
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def tau(self) -> float:
        """Mean tokens committed per target (verification) forward; plain decoding = 1."""
        return ratio(self.new_tokens, self.target_forwards)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted draft tokens."""
        return ratio(self.accepted_tokens, self.drafted_tokens)

    @property
    def per_position_acceptance(self) -> list[float]:
        """P(token i accepted | tokens < i accepted), i = 1..len(pos_tested)."""
        acc = self.pos_accepted + [0] * (len(self.pos_tested) - len(self.pos_accepted))
        return [ratio(a, t) for a, t in zip(acc, self.pos_tested, strict=False)]

    def rates(self, empty: Empty = 0.0) -> dict[str, Any]:
        """The docs/design.md §2 ratios of these counts; ``empty`` where a denominator is 0."""
        new, rounds = self.new_tokens, self.rounds
        return {
            "tau": ratio(new, self.target_forwards, empty),
            "acceptance_rate": ratio(self.accepted_tokens, self.drafted_tokens, empty),
            "target_forwards_per_token": ratio(self.target_forwards, new, empty),
            "draft_forwards_per_token": ratio(self.draft_forwards, new, empty),
            "wasted_draft_tokens_per_token": ratio(self.drafted_tokens - self.accepted_tokens, new, empty),
            "tree_nodes_per_round": ratio(self.tree_nodes, rounds, empty),
            "tree_round_rate": ratio(self.branch_rounds, rounds, empty),
            "tree_win_rate": ratio(self.branch_accepts, self.branch_rounds, empty),
            "per_position_acceptance": self.per_position_acceptance,
        }

    def stage_pct(self, empty: Empty = None) -> dict[str, float | Empty]:
        """``draft_pct`` / ``verify_pct`` / ``policy_pct``: stage seconds in percent of wall
        time (``empty`` without wall time)."""
        return {f"{k}_pct": ratio(100 * getattr(self, f"{k}_s"), self.wall_s, empty)
                for k in ("draft", "verify", "policy")}


def _bump(hist: list[int], i: int) -> None:
    while len(hist) <= i:
        hist.append(0)
    hist[i] += 1


__all__ = ["HISTOGRAMS", "RunMetrics", "add_hist", "ratio"]
