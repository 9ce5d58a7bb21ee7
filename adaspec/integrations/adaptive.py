"""Engine-free core of the adaspec proposers for batched serving engines (vLLM).

A serving engine hands a proposer, once per step, the tokens each running request has
just committed, and the table of every row's committed token ids. From those alone,
:class:`AdaptiveNgram` drafts with adaspec's incremental n-gram index
(:class:`~adaspec.drafters.ngram.NgramIndex`) and chooses, per request and per step, how
many tokens to draft (0 = do not draft):

- **Requests** (:class:`RequestTracker`). A row is the same request as in the previous
  step when its committed text extends the text seen there (compared in full, O(length)
  vectorised); rows may move (an engine compacts its batch), so the other live states are
  tried too. Otherwise the row is a new request: a state is created. A state not seen in
  a step is dropped (its request finished, was aborted or preempted; a preempted request
  is re-prefilled and starts a new state). Two live requests with identical texts are
  interchangeable: their indexes hold the same text.
- **Acceptance** (:class:`AcceptanceTable`). A request's committed tokens in a step are
  its accepted draft tokens plus one, so the accepted count of its last draft is
  ``len(sampled) - 1``: the first ``a`` positions were accepted and, if ``a`` < drafted,
  position ``a + 1`` was rejected. Conditional acceptance rates r (P(x_j accepted |
  x_<j accepted)) are kept per match-length bucket
  (:func:`~adaspec.predictors.source_choice.length_bucket`), globally (decayed counts,
  shared by all requests) and per request (shrunk toward the global rate).
- **Cost** (:class:`StepCost`). A step verifying N tokens (one per request plus the drafts)
  costs t(N) = a + b N seconds; b is fitted by decayed least squares on the measured time
  between calls (steps with a prefill, an arrival or a departure are not used). One more
  draft token with cumulative acceptance probability P adds b seconds and P expected
  tokens to a step that commits C tokens in t seconds; it raises throughput iff
  P t > b C, i.e. P > tau = b C / t. The same token is worth less when the batch is full
  (C / t, the batch's throughput, grows), so drafts shrink with the batch.
- **Length**: the longest d <= K (and <= the match's continuation) with r^d >= tau; 0 when
  r < tau or the match is shorter than ``min_match``.

Proposals are exact tokens (q one-hot); the engine verifies them, so outputs stay those of
plain decoding whatever is drafted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..drafters.ngram import NgramIndex
from ..drafters.suffix import SuffixCache
from ..predictors.costs import DecayedLine, WarmEma
from ..predictors.source_choice import length_bucket

N_BUCKETS = length_bucket(1 << 30) + 1


@dataclass
class StepCost:
    """Online fit of step seconds t(N) = a + b N over N verified tokens, and tau = b C / t.

    Args:
        alpha: decay of the least-squares statistics and the moving averages per step.
        tau_min / tau_max: clamp of tau.
        max_ratio: a step longer than ``max_ratio`` times the average is an idle gap, not used.
    """

    alpha: float = 0.05
    tau_min: float = 0.05
    tau_max: float = 0.95
    max_ratio: float = 8.0
    _line: DecayedLine = field(default_factory=DecayedLine)  # (tokens verified N, step seconds)
    _t: WarmEma = field(default_factory=WarmEma)  # seconds per step
    _c: WarmEma = field(default_factory=WarmEma)  # tokens committed per step

    @property
    def steps(self) -> int:
        """Steps used so far."""
        return self._t.n

    @property
    def b(self) -> float:
        """Seconds per extra verified token (0 until N has varied)."""
        return self._line.slope() or 0.0

    def update(self, seconds: float, verified: int, committed: int) -> None:
        """One step: its seconds, tokens verified (N) and tokens committed (C)."""
        if seconds <= 0 or (self.steps >= 4 and seconds > self.max_ratio * self._t.value):
            return
        self._t.add(seconds, self.alpha)
        self._c.add(committed, self.alpha)
        self._line.add(verified, seconds, 1.0 - self.alpha)

    @property
    def tau(self) -> float:
        """Threshold on a draft token's cumulative acceptance probability."""
        if self._t.value <= 0 or self.b <= 0:
            return self.tau_min
        return min(self.tau_max, max(self.tau_min, self.b * self._c.value / self._t.value))

    def report(self) -> dict:
        return {"tau": self.tau, "verify_slope_s": self.b, "step_s": self._t.value,
                "committed_per_step": self._c.value, "cost_steps": self.steps}


@dataclass
class AcceptanceTable:
    """Conditional acceptance rates of n-gram drafts per match-length bucket.

    Args:
        prior_hits / prior_trials: pseudo-counts of every global bucket (optimistic start).
        decay: per-observation decay of the global counts (recent requests weigh more).
        shrink: pseudo-trials of the global rate in a request's own estimate.
    """

    prior_hits: float = 2.0
    prior_trials: float = 3.0
    decay: float = 0.995
    shrink: float = 8.0
    hits: list = field(default_factory=list)
    trials: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.hits = [self.prior_hits] * N_BUCKETS
        self.trials = [self.prior_trials] * N_BUCKETS

    def global_rate(self, bucket: int) -> float:
        return self.hits[bucket] / self.trials[bucket]

    def rate(self, bucket: int, own_hits: float, own_trials: float) -> float:
        """A request's rate: its own counts shrunk toward the global rate."""
        return (own_hits + self.shrink * self.global_rate(bucket)) / (own_trials + self.shrink)

    def observe(self, bucket: int, accepted: int, drafted: int) -> tuple[int, int]:
        """Record a draft of ``drafted`` tokens of which the first ``accepted`` were
        accepted; returns the (hits, trials) it adds (for the request's own counts)."""
        trials = accepted + (accepted < drafted)
        d = self.decay ** trials
        self.hits[bucket] = self.hits[bucket] * d + accepted
        self.trials[bucket] = self.trials[bucket] * d + trials
        return accepted, trials


@dataclass(eq=False)
class RequestState:
    """One running request: its committed text (indexed) and its last draft."""

    index: NgramIndex
    buf: np.ndarray  # [capacity] committed token ids (prefix [:n] valid)
    text: list = field(default_factory=list)  # the same ids as a list (what the index reads)
    n: int = 0
    prompt_len: int = 0  # committed tokens before the request's first decode step
    drafted: int = 0  # tokens proposed at the last step
    bucket: int = 0  # match-length bucket of that proposal
    hits: list = field(default_factory=lambda: [0.0] * N_BUCKETS)
    trials: list = field(default_factory=lambda: [0.0] * N_BUCKETS)

    def same_text(self, row: np.ndarray, length: int) -> bool:
        """True when ``row[:length]`` is exactly this request's committed text."""
        return length == self.n and bool(np.array_equal(row[:length], self.buf[:length]))

    def extend(self, row: np.ndarray, length: int) -> None:
        """Append ``row[n:length]`` (the newly committed tokens) to the text and index."""
        if length > self.buf.shape[0]:
            grown = np.empty(max(length, 2 * self.buf.shape[0]), dtype=self.buf.dtype)
            grown[:self.n] = self.buf[:self.n]
            self.buf = grown
        new = row[self.n:length]
        self.buf[self.n:length] = new
        self.text.extend(new.tolist())
        self.index.sync(self.text)  # appends the new tail only
        self.n = length


@dataclass
class RequestTracker:
    """Row -> :class:`RequestState` across steps, by committed text (module doc)."""

    n_min: int = 1
    n_max: int = 8
    max_match: int = 64
    rows: dict = field(default_factory=dict)  # row -> state of the last step
    created: int = 0
    dropped: int = 0
    finished: list = field(default_factory=list)  # states dropped at the last step (finished)

    def _new(self, row: np.ndarray, length: int) -> RequestState:
        st = RequestState(NgramIndex(self.n_min, self.n_max, self.max_match),
                          np.empty(max(64, 2 * length), dtype=np.int64))
        st.extend(row, length)
        self.created += 1
        return st

    def match_rows(self, sampled: list[list[int]], num_tokens: np.ndarray,
                   token_ids: np.ndarray) -> tuple[dict[int, tuple[RequestState, bool]], bool]:
        """States of this step's rows with committed tokens, and whether the batch is the
        same set of requests as in the last step (no arrival, no departure).

        Args:
            sampled: per row, the tokens committed in the step just run ([] = none, e.g. a
                partial prefill).
            num_tokens: [>= rows] committed tokens per row, this step's included.
            token_ids: [>= rows, max_len] committed token ids per row.

        Returns:
            ``{row: (state, continued)}`` with ``continued`` False for a new request, and
            True when every state of the last step continued and no row is new.
        """
        old = self.rows
        free = {id(s): s for s in old.values()}
        out: dict[int, tuple[RequestState, bool]] = {}
        steady = True
        for i, s in enumerate(sampled):
            if not s:
                steady = False
                continue
            n = int(num_tokens[i])
            prev = n - len(s)
            row = token_ids[i]
            st = old.get(i)
            if st is None or id(st) not in free or not st.same_text(row, prev):
                st = next((c for c in free.values() if c.same_text(row, prev)), None)
            if st is None:
                out[i] = (self._new(row, n), False)
                out[i][0].prompt_len = prev
                steady = False
                continue
            del free[id(st)]
            st.extend(row, n)
            out[i] = (st, True)
        self.finished = list(free.values())
        if free:
            steady = False
            self.dropped += len(free)
        self.rows = {i: st for i, (st, _) in out.items()}
        return out, steady


@dataclass
class AdaptiveNgram:
    """Per-request adaptive n-gram drafts for a batched engine (module doc).

    Args:
        k_max: most tokens drafted per request and step (the engine's K).
        max_len: the engine's maximum sequence length (no draft past it).
        adaptive: False drafts the whole match continuation up to ``k_max`` (ablation).
        min_match: no draft when the longest suffix match is shorter.
        n_min / n_max / max_match: the n-gram index's settings.
        cache: a cross-request :class:`~adaspec.drafters.suffix.SuffixCache` shared by every
            request (finished requests enter it; it drafts when its match is longer), or None.
    """

    k_max: int
    max_len: int = 1 << 30
    adaptive: bool = True
    min_match: int = 2
    n_min: int = 1
    n_max: int = 8
    max_match: int = 64
    cache: SuffixCache | None = None
    cost: StepCost = field(default_factory=StepCost)
    table: AcceptanceTable = field(default_factory=AcceptanceTable)
    tracker: RequestTracker = field(init=False)
    _last_t: float | None = field(default=None, init=False, repr=False)
    _last_verified: int = field(default=0, init=False, repr=False)
    _drafted: int = field(default=0, init=False, repr=False)
    _accepted: int = field(default=0, init=False, repr=False)
    _proposals: int = field(default=0, init=False, repr=False)
    _skipped: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.k_max < 1:
            raise ValueError(f"k_max must be >= 1, got {self.k_max}")
        self.tracker = RequestTracker(self.n_min, self.n_max, self.max_match)

    def length(self, rate: float, budget: int) -> int:
        """Longest d <= budget with rate^d >= tau (0: do not draft)."""
        tau = self.cost.tau
        if rate >= 1.0:
            return budget
        if rate <= tau:
            return 0
        return min(budget, int(math.log(tau) / math.log(rate) + 1e-9))

    def step(self, sampled: list[list[int]], num_tokens: np.ndarray, token_ids: np.ndarray,
             now: float) -> list[list[int]]:
        """Drafts of this step, one list per row (see :meth:`RequestTracker.match_rows`);
        ``now``: a monotonic clock in seconds."""
        states, steady = self.tracker.match_rows(sampled, num_tokens, token_ids)
        if self.cache is not None:  # requests gone from the batch have finished
            for st in self.tracker.finished:
                self.cache.add_generation(st.text[:st.prompt_len], st.text[st.prompt_len:])
        committed = 0
        for i, (st, continued) in states.items():
            committed += len(sampled[i])
            if continued and st.drafted:
                a = min(len(sampled[i]) - 1, st.drafted)
                h, t = self.table.observe(st.bucket, a, st.drafted)
                st.hits[st.bucket] += h
                st.trials[st.bucket] += t
                self._accepted += a
        if steady and self._last_t is not None:
            self.cost.update(now - self._last_t, self._last_verified, committed)
        out: list[list[int]] = []
        verified = 0
        for i in range(len(sampled)):
            entry = states.get(i)
            if entry is None:
                out.append([])
                continue
            st = entry[0]
            draft = self._draft(st)
            st.drafted = len(draft)
            verified += 1 + len(draft)
            out.append(draft)
        self._last_t, self._last_verified = now, verified
        return out

    def _draft(self, st: RequestState) -> list[int]:
        budget = min(self.k_max, self.max_len - st.n - 1)
        if budget <= 0:
            return []
        m = st.index.match(budget)
        if self.cache is not None:
            g = self.cache.match(st.text, budget)
            m = g if g.length > m.length else m
        if m.length < self.min_match:
            return []
        st.bucket = length_bucket(m.length)
        d = len(m.tokens)
        if self.adaptive:
            d = self.length(self.table.rate(st.bucket, st.hits[st.bucket], st.trials[st.bucket]), d)
        self._proposals += 1
        if d == 0:
            self._skipped += 1
            return []
        self._drafted += d
        return list(m.tokens[:d])

    def report(self) -> dict:
        """Counters and the learned state (for benchmarks and tests)."""
        return {"live_requests": len(self.tracker.rows), "requests_created": self.tracker.created,
                "requests_dropped": self.tracker.dropped, "drafted": self._drafted,
                "accepted": self._accepted, "matches": self._proposals,
                "matches_not_drafted": self._skipped,
                "acceptance_by_bucket": [round(self.table.global_rate(b), 3) for b in range(N_BUCKETS)],
                **(self.cache.report() if self.cache is not None else {}), **self.cost.report()}

