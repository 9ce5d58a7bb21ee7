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

On a compiled (batch-invariant) target, a joining sequence's prompt is fed through the shared
forwards at most ``prefill_chunk`` prompt rows per step (chunked prefill): prompt rows are
compute-bound, decode rows weight-bound, so the running sequences' rounds ride along with
the chunks instead of waiting for every prompt, and the rest of a prompt that fits the
step's row budget goes into the sequence's first verify forward. Before a prompt is fed, the
cached prefix it shares with any slot (e.g. the chat template's system prompt) is copied from
that slot's cache (:func:`copy_prefix`) instead of being computed again. Both only change
which forward computes a row, never its value (a row's keys, values and logits are the same
whichever forward computes them), so every text stays identical to one-at-a-time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..engine import Engine, StopRules, VerifyCall
from ..errors import InvalidArgumentError
from ..runtime.batched import batchable_runner, run_calls
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
    pending: list[int] | None = None  # prompt[:-1] while its target rows are still being fed
    started: bool = False  # its rounds have begun (it prefilled its drafter, reset its policy)


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


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case, compared in C
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


def copy_prefix(src: Any, dst: Any, n: int) -> None:
    """Make compiled runner ``dst``'s cache hold ``src``'s first ``n`` positions: keys
    kt[L, KVH, hd, :n] and values vc[L, KVH, :n, hdp] copied, tokens src.tokens[:n]. The
    same model's rows at the same positions: what dst would have computed itself."""
    dst.kt, dst.vc = dst.lean.fit_cache(dst.kt, dst.vc, n, 0)
    dst.kt[..., :n] = src.kt[..., :n]
    dst.vc[:, :, :n] = src.vc[:, :, :n]
    dst.tokens = src.tokens[:n]


PREFILL_CHUNK = 64  # prompt rows per step beside decoding sequences (a ~80 ms forward here)


class BatchEngine:
    """Up to ``max_batch`` sequences, one target forward per :meth:`step`.

    Args:
        make_engine: builds a fresh engine for a joining sequence (its own caches, drafter
            and policy; the target's weights are shared).
        max_batch: sequences per step.
        budget: the batch-level draft budget, or None to keep each policy's own.
        prefill_chunk: prompt rows fed per step while other sequences decode (chunked
            prefill, compiled targets; see the module docstring).
    """

    def __init__(self, make_engine: Callable[[Any], Engine], max_batch: int = 8,
                 budget: DraftBudget | None = None, prefill_chunk: int = PREFILL_CHUNK) -> None:
        if max_batch < 1:
            raise InvalidArgumentError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk < 1:
            raise InvalidArgumentError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.make_engine = make_engine
        self.max_batch = max_batch
        self.budget = budget
        self.prefill_chunk = prefill_chunk
        self.active: list[Sequence] = []
        self.spare: list[Engine] = []  # engines of finished sequences, reused by joining ones
        self.last_rows = 0

    @property
    def free(self) -> int:
        return self.max_batch - len(self.active)

    def add(self, key: Any, prompt: list[int], sampling: SamplingConfig, rules: StopRules,
            policy: Any = None) -> Sequence:
        """Start a sequence (it prefills and drafts at the next step)."""
        if not self.free:
            raise RuntimeError("the batch is full")
        engine = self._engine(policy)
        stats = GenerationStats()
        seq = Sequence(key, engine, stats, adaptive=getattr(engine.policy, "name", "") != "fixed")
        seq.rounds = engine.rounds(prompt, sampling, rules, stats)
        if len(prompt) > 1 and engine.keep_prefix and engine.defer_prefill \
                and not getattr(engine.drafter, "needs_target_hidden", False):
            seq.pending = prompt[:-1]  # fed in chunks by the shared forwards (see _feed_prompts)
        self.active.append(seq)
        return seq

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence between steps (finished, or its client went away); frees its slot
        and keeps its engine for a joining sequence (unless the sequence failed)."""
        if seq not in self.active:
            return
        self.active.remove(seq)
        seq.rounds.close()
        seq.done = True
        drafter = seq.engine.drafter  # hand the text to a shared suffix cache (an n-gram source's flush)
        for part in (drafter, getattr(drafter, "ngram", None)):
            flush = getattr(part, "flush", None)
            if flush is not None and seq.error is None and seq.started:
                flush()
                break
        if self.budget is not None:
            self.budget.forget(seq)
        if seq.error is None and len(self.spare) < self.max_batch:
            self.spare.append(seq.engine)

    def warm_up(self) -> None:
        """Load (or compile) the batched kernels now rather than in the first shared step: one
        shared forward of two throwaway engines' target runners, and of their draft runners."""
        if self.max_batch < 2:
            return
        engines = [self.make_engine(None) for _ in range(2)]
        for get in (lambda e: e.target, lambda e: getattr(e.drafter, "runner", None),
                    lambda e: getattr(getattr(e.drafter, "model", None), "runner", None)):
            runners = [get(e) for e in engines]
            if all(r is not None and batchable_runner(r) for r in runners):
                run_calls([VerifyCall(runners[0], [0, 1], 1, False), VerifyCall(runners[1], [0], 1, False)])

    def _engine(self, policy: Any) -> Engine:
        """An engine for a joining sequence: a finished sequence's engine when it ran the same
        kind of policy (``None``: the factory's default), reusing its caches, drafter and
        runners (no new KV cache per request), else a new one. On a compiled
        (batch-invariant) target the prompt is fed with the first shared forward, and the
        cache keeps the prefix it shares with the slot's previous request."""
        kind = None if policy is None else type(policy)
        for i, engine in enumerate(self.spare):
            if engine.pool_kind is kind:
                del self.spare[i]
                engine.cap = None
                if policy is not None:  # None: the engine's own policy (reset per generation)
                    engine.policy = policy
                    if hasattr(engine.drafter, "chooser"):  # a mixed drafter asks its policy for a source
                        engine.drafter.chooser = getattr(policy, "choose_source", None)
                return engine
        engine = self.make_engine(policy)
        engine.pool_kind = kind
        engine.defer_prefill = engine.keep_prefix = batchable_runner(engine.target)
        return engine

    def step(self) -> list[StepEvent]:
        """One round of every active sequence; returns what each committed (finished ones
        leave the batch). Draft forwards run in lockstep (one shared draft forward per draft
        position), then one shared target forward verifies every sequence's draft and feeds
        this step's prompt chunks."""
        events: list[StepEvent] = []
        feeding = self._feed_prompts()
        self._set_caps()
        waiting = {}
        for s in [s for s in self.active if s.pending is None]:
            s.started = True
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
        # a sequence's first verify also feeds its prompt: such a step is no sample of the
        # cost of verify rows
        joined = bool(feeding) or any(s.stats.target_forwards == 0 for s in ready)
        outs = self._run([waiting[s] for s in ready] + [c for _, c in feeding],
                         ready + [s for s, _ in feeding], events)[:len(ready)]
        if self.budget is not None and len(ready) > 1 and not joined:
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

    def _feed_prompts(self) -> list[tuple[Sequence, VerifyCall]]:
        """This step's prompt rows, oldest joiner first, within ``prefill_chunk`` rows: a
        sequence whose rest of prompt fits starts its rounds this step (its first verify
        feeds the rest); the first that does not gets a chunk (a target call whose output is
        dropped); the others wait. With nobody decoding, the first waiting prompt goes whole
        (nobody to keep going; one forward instead of several). Before that, each prompt
        takes the longest cached prefix any slot holds (:func:`copy_prefix`)."""
        room = self.prefill_chunk
        alone = all(s.pending is not None for s in self.active)
        calls = []
        for s in [s for s in self.active if s.pending is not None]:
            r = s.engine.target
            self._share_prefix(s)
            cached = common_prefix(r.tokens, s.pending)
            rest = len(s.pending) - cached
            if alone:
                room, alone = max(room, rest), False
            if rest <= room:
                s.pending = None
                room -= rest
            elif room > 0:
                calls.append((s, VerifyCall(r, s.pending[:cached + room], 1, False)))
                room = 0
        return calls

    def _share_prefix(self, seq: Sequence) -> None:
        """Copy into the sequence's target cache the longest prefix of its prompt that another
        slot's target cache holds (running or spare), when longer than its own by >= 8 rows."""
        r = seq.engine.target
        best, donor = common_prefix(r.tokens, seq.pending) + 7, None
        for e in [o.engine for o in self.active if o is not seq] + self.spare:
            d = e.target
            if d is not r and getattr(d, "lean", None) is r.lean:
                n = common_prefix(d.tokens, seq.pending)
                if n > best:
                    best, donor = n, d
        if donor is not None:
            copy_prefix(donor, r, best)

    def _set_caps(self) -> None:
        running = [s for s in self.active if s.pending is None]
        live = [s for s in running if s.adaptive]
        caps = self.budget.caps(live) if self.budget is not None and len(running) > 1 else {}
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
