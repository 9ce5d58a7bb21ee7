"""Continuous batching: a bounded FIFO queue in front of one :class:`~adaspec.serve.batch.BatchEngine`.

Every request becomes a :class:`Job`, checked on arrival (policy override, prompt length:
a 400 at once, not after the wait) and queued (429 beyond ``max_queue`` waiting). One
engine thread runs the loop: admit waiting jobs into free batch slots (up to
``max_batch``), drop the sequences of jobs whose client went away, run one batch step
(one target forward for every running sequence), and hand each job its events:
:class:`Text` chunks, then one :class:`Final` or one :class:`Failure`. Models, KV caches
and generation only ever run on that thread; events and metrics reach the event loop
through ``call_soon_threadsafe``. An exception ends only its own sequence.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections import deque
from typing import Any

from ..api import IncrementalText, SpeculativeGenerator
from ..drafters.registry import check_policy
from ..engine import StopRules
from ..errors import AdaspecError, InvalidArgumentError
from ..policies import Policy, make_policy
from ..runtime import set_threads
from ..runtime.batched import batchable_runner
from ..sampling import SamplingConfig
from .batch import PREFILL_CHUNK, BatchEngine, DraftBudget, Sequence
from .metrics import Metrics
from .protocol import ApiError, GenerationRequest, StopTrimmer, adaspec_stats, finish_reason, usage

log = logging.getLogger("adaspec.serve")


class Text:
    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


class Final:
    """End of a generation: OpenAI finish reason, usage and the ``adaspec`` stats object."""

    __slots__ = ("finish_reason", "stats", "usage")

    def __init__(self, finish_reason: str, usage: dict, stats: dict) -> None:
        self.finish_reason, self.usage, self.stats = finish_reason, usage, stats


class Failure:
    __slots__ = ("error",)

    def __init__(self, error: ApiError) -> None:
        self.error = error


Event = Text | Final | Failure


class Job:
    """A submitted request: prompt ids, its policy, its events queue and a cancellation flag
    read between rounds."""

    def __init__(self, request: GenerationRequest, ids: list[int], policy: Policy, policy_name: str,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.request, self.ids, self.policy, self.policy_name = request, ids, policy, policy_name
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.text: IncrementalText | None = None
        self.trim = StopTrimmer(request.stop)

    def cancel(self) -> None:
        self.cancelled = True

    def emit(self, event: Event) -> None:
        """Queue an event for the request's handler (from any thread; the scheduler posts
        its events in one batch per step instead, see ``Scheduler._post``)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Scheduler:
    """Admits jobs into a batch of up to ``max_batch`` sequences; at most ``max_queue`` wait.

    Args:
        generator: the served generator (target, draft, default policy).
        metrics: where requests, batch sizes and queue waits are counted.
        max_queue: waiting jobs beyond which :meth:`submit` answers 429.
        max_batch: sequences generated together (one target forward per step).
        runtime: unused (kept for callers of the one-at-a-time scheduler).
        batch_budget: cap adaptive policies' drafts by the batch-level budget.
        prefill_chunk: prompt rows fed per step while other sequences decode.
        engine_thread: run the engine loop in a thread of its own (else the caller runs
            :meth:`run`: ``adaspec serve`` runs it on the main thread, because the compiled
            kernels' OpenMP teams are ~3x slower launched from any other thread).
    """

    def __init__(self, generator: SpeculativeGenerator, metrics: Metrics, max_queue: int = 16,
                 max_batch: int = 8, runtime: str = "auto", batch_budget: bool = True,
                 prefill_chunk: int = PREFILL_CHUNK, engine_thread: bool = True) -> None:
        if max_queue < 0:
            raise InvalidArgumentError(f"max_queue must be >= 0, got {max_queue}")
        self.generator = generator
        self.metrics = metrics
        self.max_queue = max_queue
        self.max_context = generator.engine.max_context
        # BatchEngine checks max_batch and prefill_chunk
        self.batch = BatchEngine(generator.new_engine, max_batch, DraftBudget() if batch_budget else None,
                                 prefill_chunk)
        self.batch.warm_up()
        self._pending: deque[Job] = deque()
        self._jobs: dict[int, Job] = {}  # id(Sequence) -> job
        self._wake = threading.Condition()
        self._stop = False
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[Any, tuple]]] = {}  # engine thread only
        self._thread = None
        if engine_thread:
            self._thread = threading.Thread(target=self._loop, name="adaspec-engine", daemon=True)
            self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self.batch.active)

    def policy_name(self, job: Job | None) -> str:
        return job.policy_name if job else getattr(self.generator.policy, "name", "?")

    def submit(self, request: GenerationRequest) -> Job:
        """Check and queue ``request`` (on the event loop).

        Raises:
            ApiError: 400 for a bad policy, policy argument or prompt (too long, outside the
                vocabulary, no chat template), 429 when the queue is full.
        """
        policy, name = self._policy(request)
        try:
            ids = self._prompt_ids(request)
        except AdaspecError as exc:
            raise ApiError(400, str(exc), param="messages" if request.messages is not None else "prompt") \
                from None
        if len(ids) >= self.max_context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens but the model's context is "
                                f"{self.max_context}", param="prompt", code="context_length_exceeded")
        if len(self._pending) >= self.max_queue + self.batch.free:  # free slots take them at once
            raise ApiError(429, f"the server is busy: {len(self._pending)} requests are already queued "
                                f"(limit {self.max_queue}); retry later",
                           type="rate_limit_exceeded", code="queue_full")
        job = Job(request, ids, policy, name, asyncio.get_running_loop())
        self._event_loop = job.loop
        with self._wake:
            self._pending.append(job)
            self._wake.notify()
        return job

    def gauges(self) -> dict[str, float]:
        return {"adaspec_queue_depth": self.waiting, "adaspec_running": self.running}

    def run(self) -> None:
        """The engine loop in the calling thread, until :meth:`shutdown` (``engine_thread=False``)."""
        self._loop()

    def shutdown(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)

    def _policy(self, request: GenerationRequest) -> tuple[Policy, str]:
        gen = self.generator
        if request.policy is None:
            return copy.deepcopy(gen.policy), getattr(gen.policy, "name", "?")
        try:
            policy = make_policy(request.policy, request.policy_args)
            check_policy(policy, gen.draft_spec)
            policy.check_pair(gen.target, gen.draft)
        except AdaspecError as exc:
            raise ApiError(400, str(exc), param="adaspec") from None
        return policy, request.policy

    def _prompt_ids(self, req: GenerationRequest) -> list[int]:
        gen = self.generator
        if req.messages is not None:
            return gen.encode_messages(req.messages)
        if isinstance(req.prompt, list) and max(req.prompt) >= gen.target.vocab_size:
            raise InvalidArgumentError(f"token id {max(req.prompt)} is outside the vocabulary "
                                       f"(size {gen.target.vocab_size})")
        return gen.encode(req.prompt)

    # --- engine thread only ---------------------------------------------------------------

    def _loop(self) -> None:
        if batchable_runner(self.generator.engine.target):
            # the models run in the compiled kernels' own threads; torch only does small
            # per-row work here (verify, sampling), where a second thread pool only contends
            set_threads(None, torch_threads=1)
        while True:
            with self._wake:
                while not self._stop and not self._pending and not self.batch.active:
                    self._wake.wait()
                if self._stop:
                    return
            try:
                self._admit()
                self._drop_cancelled()
                if self.batch.active:
                    self._observe(self.metrics.batch_size.observe, len(self.batch.active))
                    for ev in self.batch.step():
                        self._deliver(ev.seq, ev.committed, ev.finished)
            except Exception:  # a bug in the loop itself: fail the running jobs, keep serving
                log.exception("batch step failed")
                for seq in list(self.batch.active):
                    self._finish_failed(seq, RuntimeError("batch step failed"))
                    self.batch.remove(seq)
            finally:
                self._flush()

    def _observe(self, fn: Any, *args: Any) -> None:
        """Run a metrics update on the event loop (metrics are not locked)."""
        if self._event_loop is not None:
            self._post(self._event_loop, fn, *args)

    def _post(self, loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
        """Run ``fn(*args)`` on ``loop`` after this step (see :meth:`_flush`)."""
        self._outbox.setdefault(loop, []).append((fn, args))

    def _flush(self) -> None:
        """Hand the step's events and metrics to the event loop in ONE wake-up per loop (a
        wake-up per token and client would take CPU from the kernels' threads every step)."""
        outbox, self._outbox = self._outbox, {}
        for loop, calls in outbox.items():
            loop.call_soon_threadsafe(_run_all, calls)

    def _emit(self, job: Job, event: Event) -> None:
        self._post(job.loop, job.events.put_nowait, event)

    def _admit(self) -> None:
        while self.batch.free:
            with self._wake:
                if not self._pending:
                    return
                job = self._pending.popleft()
            if job.cancelled:
                continue
            self._observe(self.metrics.queue_wait.observe, time.perf_counter() - job.submitted)
            req, gen = job.request, self.generator
            stops = req.stop
            rules = StopRules(req.max_tokens or self.max_context, gen.target.eos_ids, stops,
                              gen._decode if stops else None)
            sampling = SamplingConfig(req.temperature, req.top_k, req.top_p, req.seed)
            try:
                seq = self.batch.add(id(job), job.ids, sampling, rules, job.policy)
            except Exception as exc:
                self._fail(job, exc)
                continue
            job.text = IncrementalText(gen._decode)
            self._jobs[id(seq)] = job

    def _drop_cancelled(self) -> None:
        for seq in list(self.batch.active):
            job = self._jobs.get(id(seq))
            if job is not None and job.cancelled:
                self.batch.remove(seq)
                self._jobs.pop(id(seq), None)

    def _deliver(self, seq: Sequence, committed: list[int], finished: bool) -> None:
        job = self._jobs.get(id(seq))
        if job is None:
            return
        if seq.error is not None:
            self._finish_failed(seq, seq.error)
            return
        if committed:
            text = job.trim.feed(job.text.feed(committed))
            if text:
                self._emit(job, Text(text))
        if not finished:
            return
        self._jobs.pop(id(seq), None)
        result = self.generator._finish(seq.new, seq.stats, job.request.stop, seq.engine)
        rest = job.trim.feed(job.text.rest(result.text)) + job.trim.flush()
        if rest:
            self._emit(job, Text(rest))
        stats = seq.stats
        self._observe(self.metrics.generation_done, stats.prompt_tokens, stats.new_tokens, stats.tau)
        self._emit(job, Final(finish_reason(stats.stop_reason, job.trim.stopped),
                       usage(stats.prompt_tokens, stats.new_tokens),
                       adaspec_stats(stats.to_dict(), job.policy_name,
                                     getattr(self.generator, "draft_name", None))))

    def _finish_failed(self, seq: Sequence, exc: BaseException) -> None:
        job = self._jobs.pop(id(seq), None)
        if job is not None:
            self._fail(job, exc)

    def _fail(self, job: Job, exc: BaseException) -> None:
        if isinstance(exc, AdaspecError):
            self._emit(job, Failure(ApiError(400, str(exc))))
            return
        log.error("request failed: %s: %s", type(exc).__name__, exc)
        error = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
        self._emit(job, Failure(error))


def _run_all(calls: list[tuple[Any, tuple]]) -> None:
    """Run posted (fn, args) pairs in order (on the event loop)."""
    for fn, args in calls:
        fn(*args)
