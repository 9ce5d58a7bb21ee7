"""The engine with a batch dimension: many sequences' rounds share one target forward per step.

Each sequence is one :class:`~adaspec.engine.Engine` (its own target cache, drafter and
policy state) whose :meth:`~adaspec.engine.Engine.rounds` hands its verify forward out as a
:class:`~adaspec.types.VerifyCall`. A :meth:`BatchEngine.step` advances every active
sequence to its verify call (budget, then draft), runs all calls in one forward
(:func:`adaspec.runtime.batched.run_calls`: on the compiled runtime the rows of all
sequences go through every linear together), then hands each output back (verify, commit,
roll back, observe). Sequences join (:meth:`BatchEngine.add`) and leave (finished,
cancelled or failed) between steps; a sequence that raises ends alone.

Before drafting, :class:`DraftBudget` caps each sequence's draft length by expected accepted
tokens per unit of measured cost (see its docstring); with one sequence, or ``fixed``
policies, the policy's own budget stands.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..engine import Engine, StopRules, VerifyCall
from ..runtime.batched import run_calls
from ..sampling import SamplingConfig
from ..types import GenerationStats


@dataclass(eq=False)  # hashed and compared by identity
class Sequence:
    """One generation in the batch.

    Attributes:
        key: the caller's handle (any hashable).
        engine: this sequence's engine (target cache, drafter, policy).
        stats: filled in place, final once ``done``.
        new: ids committed so far.
        error: the exception that ended it, if one did.
    """

    key: Any
    engine: Engine
    stats: GenerationStats
    rounds: Any = None
    new: list[int] = field(default_factory=list)
    done: bool = False
    error: BaseException | None = None
    adaptive: bool = True
    seen: tuple[int, int] = (0, 0)  # (drafted, accepted) already given to the budget


@dataclass(frozen=True)
class StepEvent:
    """What one step did to one sequence: ids committed (maybe none), and whether it ended."""

    seq: Sequence
    committed: list[int]
    finished: bool


class CostFit:
    """Least-squares fit t(rows) = a + b * rows of measured step forwards (recent window).

    Starts from a prior (``a`` seconds per forward, ``b`` per row) until two different row
    counts have been seen.
    """

    def __init__(self, a: float = 0.05, b: float = 0.004, window: int = 64) -> None:
        self.a, self.b, self.window = a, b, window
        self.points: list[tuple[int, float]] = []

    def add(self, rows: int, seconds: float) -> None:
        self.points.append((rows, seconds))
        del self.points[:-self.window]
        xs = [p[0] for p in self.points]
        if len(set(xs)) < 2:
            return
        n = len(xs)
        mx, my = sum(xs) / n, sum(p[1] for p in self.points) / n
        sxx = sum((x - mx) ** 2 for x in xs)
        b = sum((x - mx) * (y - my) for x, y in self.points) / sxx
        self.b = max(b, 1e-6)
        self.a = max(my - self.b * mx, 1e-6)


class DraftBudget:
    """Per step, how many draft tokens each sequence may verify.

    A sequence's chance that its j-th draft token survives is modelled as alpha^j, with
    alpha its acceptance so far (Beta(1, 1)-smoothed counts: accepted tokens vs rejections).
    A step of R rows costs a + b R seconds (:class:`CostFit`, measured) plus ``draft_cost``
    per drafted token; it yields one token per sequence plus the survivors. Draft positions
    are added in order of survival while their expected tokens per second beat the step's
    current tokens per second (the ratio-optimal fill), each sequence up to ``max_k``.
    """

    def __init__(self, max_k: int = 8) -> None:
        self.max_k = max_k
        self.cost = CostFit()
        self.draft_cost = 0.0005
        self.counts: dict[int, list[float]] = {}  # id(seq) -> [accepted, rejections]

    def observe(self, seq: Sequence) -> None:
        """Take in the sequence's newest rounds (from its stats)."""
        s = seq.stats
        drafted, accepted = s.drafted_tokens - seq.seen[0], s.accepted_tokens - seq.seen[1]
        seq.seen = (s.drafted_tokens, s.accepted_tokens)
        c = self.counts.setdefault(id(seq), [0.0, 0.0])
        c[0] += accepted
        c[1] += 1.0 if accepted < drafted else 0.0

    def forget(self, seq: Sequence) -> None:
        self.counts.pop(id(seq), None)

    def alpha(self, seq: Sequence) -> float:
        acc, rej = self.counts.get(id(seq), (0.0, 0.0))
        return (acc + 1.0) / (acc + rej + 2.0)

    def caps(self, seqs: list[Sequence]) -> dict[int, int]:
        """id(seq) -> draft cap for this step."""
        gain_rate = len(seqs)  # tokens: one per sequence whatever is drafted
        t = self.cost.a + self.cost.b * len(seqs)
        step_cost = self.cost.b + self.draft_cost
        cand = []
        for s in seqs:
            a = self.alpha(s)
            cand += [(a ** j, id(s)) for j in range(1, self.max_k + 1)]
        caps = {id(s): 0 for s in seqs}
        for gain, sid in sorted(cand, key=lambda c: -c[0]):
            if gain / step_cost <= gain_rate / t:
                break
            caps[sid] += 1
            gain_rate += gain
            t += step_cost
        return caps


class BatchEngine:
    """Up to ``max_batch`` sequences, one target forward per :meth:`step`.

    Args:
        make_engine: builds a fresh engine for a joining sequence (its own caches, drafter
            and policy; the target's weights are shared).
        max_batch: sequences per step.
        budget: the batch-level draft budget, or None to keep each policy's own.
    """

    def __init__(self, make_engine: Callable[[Any], Engine], max_batch: int = 8,
                 budget: DraftBudget | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.make_engine = make_engine
        self.max_batch = max_batch
        self.budget = budget
        self.active: list[Sequence] = []
        self.last_rows = 0

    @property
    def free(self) -> int:
        return self.max_batch - len(self.active)

    def add(self, key: Any, prompt: list[int], sampling: SamplingConfig, rules: StopRules,
            policy: Any = None) -> Sequence:
        """Start a sequence (it prefills and drafts at the next step)."""
        if not self.free:
            raise RuntimeError("the batch is full")
        engine = self.make_engine(policy)
        stats = GenerationStats()
        seq = Sequence(key, engine, stats, adaptive=getattr(engine.policy, "name", "") != "fixed")
        seq.rounds = engine.rounds(prompt, sampling, rules, stats)
        self.active.append(seq)
        return seq

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence between steps (e.g. its client went away); frees its slot."""
        if seq in self.active:
            self.active.remove(seq)
            seq.rounds.close()
            seq.done = True
        drafter = seq.engine.drafter  # hand the text to a shared suffix cache (an n-gram source's flush)
        for part in (drafter, getattr(drafter, "ngram", None)):
            flush = getattr(part, "flush", None)
            if flush is not None and seq.error is None:
                flush()
                break
        if self.budget is not None:
            self.budget.forget(seq)

    def step(self) -> list[StepEvent]:
        """One round of every active sequence; returns what each committed (finished ones
        leave the batch). Draft forwards run in lockstep (one shared draft forward per draft
        position), then one shared target forward verifies every sequence's draft."""
        events: list[StepEvent] = []
        self._set_caps()
        waiting = {}
        for s in list(self.active):
            call = self._advance(s, None, events)
            if call is not None:
                waiting[s] = call
        t0 = time.perf_counter()
        draft_rows = 0
        while True:
            drafting = [s for s, c in waiting.items() if c.runner is not s.engine.target]
            if not drafting:
                break
            draft_rows += len(drafting)
            for s, out in zip(drafting, self._run([waiting.pop(s) for s in drafting], drafting, events)):
                call = self._advance(s, out, events) if out is not None else None
                if call is not None:
                    waiting[s] = call
        t1 = time.perf_counter()
        ready = list(waiting)
        outs = self._run([waiting[s] for s in ready], ready, events)
        if self.budget is not None and len(ready) > 1:
            self.last_rows = sum(len(o.logits) for o in outs if o is not None)
            self.budget.cost.add(self.last_rows, time.perf_counter() - t1)
            if draft_rows:
                self.budget.draft_cost = 0.8 * self.budget.draft_cost + 0.2 * (t1 - t0) / draft_rows
        for s, out in zip(ready, outs):
            if out is not None:
                self._advance(s, out, events)
        for s in [s for s in self.active if s.done]:
            self.remove(s)
        return events

    def _run(self, calls: list[VerifyCall], seqs: list[Sequence], events: list[StepEvent]) -> list[Any]:
        """Outputs of ``calls`` (shared forwards where possible); when a shared forward fails,
        each call runs alone so only the failing sequence ends (its output is None)."""
        try:
            return run_calls(calls)
        except Exception:
            outs: list[Any] = []
            for c, s in zip(calls, seqs):
                try:
                    outs.append(c.run())
                except Exception as exc:
                    self._fail(s, exc, events)
                    outs.append(None)
            return outs

    def _set_caps(self) -> None:
        live = [s for s in self.active if s.adaptive]
        caps = self.budget.caps(live) if self.budget is not None and len(self.active) > 1 else {}
        for s in self.active:
            s.engine.cap = caps.get(id(s))

    def _advance(self, seq: Sequence, out: Any, events: list[StepEvent]) -> VerifyCall | None:
        """Run the sequence until it needs a forward (returned) or has committed / ended."""
        try:
            item = seq.rounds.send(out) if out is not None else next(seq.rounds)
        except StopIteration:
            seq.done = True
            events.append(StepEvent(seq, [], True))
            return None
        except Exception as exc:
            self._fail(seq, exc, events)
            return None
        if isinstance(item, VerifyCall):
            return item
        seq.new.extend(item)
        if self.budget is not None:
            self.budget.observe(seq)
        finished = bool(seq.stats.stop_reason)
        if finished:  # let the generator write its final stats
            next(seq.rounds, None)
            seq.done = True
        events.append(StepEvent(seq, item, finished))
        return None

    def _fail(self, seq: Sequence, exc: BaseException, events: list[StepEvent]) -> None:
        seq.error, seq.done = exc, True
        events.append(StepEvent(seq, [], True))
