"""One sequence at a time: a bounded FIFO queue in front of the engine.

Every request becomes a :class:`Job`. An asyncio task per job waits for the engine (a FIFO
lock), then drives :meth:`SpeculativeGenerator.stream` one step at a time on a single
worker thread, so models, KV caches and tokenizers are only ever touched by that thread.
Events go to the job's queue: :class:`Text` chunks, then one :class:`Final` or one
:class:`Failure`. A cancelled job (its client went away) stops before the next step, and
the stream generator is closed, which frees the engine; any exception ends only its own
job.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from ..api import SpeculativeGenerator
from ..errors import AdaspecError, InvalidArgumentError
from ..policies import Policy, make_policy
from .metrics import Metrics
from .protocol import ApiError, GenerationRequest, StopTrimmer, adaspec_stats, finish_reason, usage

log = logging.getLogger("adaspec.serve")
T = TypeVar("T")
PolicyKey = tuple[str, tuple[tuple[str, str], ...]] | None  # None = the server's own generator


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Final:
    """End of a generation: OpenAI finish reason, usage and the ``adaspec`` stats object."""

    finish_reason: str
    usage: dict
    stats: dict


@dataclass(frozen=True)
class Failure:
    error: ApiError


Event = Text | Final | Failure


class Job:
    """A submitted request: its events queue and a cancellation flag read between rounds."""

    def __init__(self, request: GenerationRequest, key: PolicyKey, policy: Policy | None) -> None:
        self.request, self.key, self.policy = request, key, policy
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled = True


def _policy_key(request: GenerationRequest) -> PolicyKey:
    if request.policy is None:
        return None
    return request.policy, tuple(sorted((k, repr(v)) for k, v in request.policy_args.items()))


class Scheduler:
    """Runs jobs one at a time on a worker thread; at most ``max_queue`` wait behind the running one.

    Args:
        generator: the served generator (target, draft, default policy).
        metrics: where finished generations are counted.
        max_queue: waiting jobs beyond which :meth:`submit` answers 429.
        cache_size: generators kept for per-request policy overrides (each holds its own KV caches).
        runtime: the runtime name for those override generators (as given to the served one).
    """

    def __init__(self, generator: SpeculativeGenerator, metrics: Metrics, max_queue: int = 16,
                 cache_size: int = 4, runtime: str = "auto") -> None:
        if max_queue < 0:
            raise InvalidArgumentError(f"max_queue must be >= 0, got {max_queue}")
        self.generator = generator
        self.metrics = metrics
        self.max_queue = max_queue
        self.cache_size = cache_size
        self.runtime = runtime
        self.waiting = 0
        self.running = False
        self._lock = asyncio.Lock()  # FIFO: waiters acquire in arrival order
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adaspec-engine")
        self._generators: OrderedDict[PolicyKey, SpeculativeGenerator] = OrderedDict()
        self._tasks: set[asyncio.Task] = set()

    def policy_name(self, key: PolicyKey) -> str:
        return key[0] if key else getattr(self.generator.policy, "name", type(self.generator.policy).__name__)

    def submit(self, request: GenerationRequest) -> Job:
        """Queue ``request``; its policy override is validated here.

        Raises:
            ApiError: 400 for a bad policy or policy argument, 429 when the queue is full.
        """
        key = _policy_key(request)
        policy = None
        if key is not None and key not in self._generators:
            try:
                policy = make_policy(request.policy, request.policy_args)
            except AdaspecError as exc:
                raise ApiError(400, str(exc), param="adaspec") from None
        if self.waiting + self.running > self.max_queue:  # one runs, max_queue wait
            raise ApiError(429, f"the server is busy: {self.waiting} requests are already queued "
                                f"(limit {self.max_queue}); retry later",
                           type="rate_limit_exceeded", code="queue_full")
        job = Job(request, key, policy)
        self.waiting += 1
        task = asyncio.get_running_loop().create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    def gauges(self) -> dict[str, float]:
        return {"adaspec_queue_depth": self.waiting, "adaspec_running": int(self.running)}

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def _run(self, job: Job) -> None:
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1
        self.running = True
        try:
            if not job.cancelled:
                await self._generate(job)
        except AdaspecError as exc:
            job.events.put_nowait(Failure(ApiError(400, str(exc))))
        except Exception as exc:  # a bug or a broken model: fail this request, keep serving
            log.exception("request failed")
            job.events.put_nowait(Failure(ApiError(500, f"internal error: {type(exc).__name__}: {exc}",
                                                   type="server_error")))
        finally:
            self.running = False
            self._lock.release()

    async def _generate(self, job: Job) -> None:
        req = job.request
        gen = await self._call(self._generator_for, job.key, job.policy, req.policy_args)
        ids = await self._call(self._prompt_ids, gen, req)
        budget = req.max_tokens or gen.target.max_context  # the engine clips to the context
        stream = await self._call(gen.stream, ids, max_new_tokens=budget, temperature=req.temperature,
                                  top_k=req.top_k, top_p=req.top_p, seed=req.seed,
                                  stop=list(req.stop) or None)
        chunks = iter(stream)
        trim = StopTrimmer(req.stop)
        while True:
            if job.cancelled:  # the client went away: stop at this round, free the engine
                await self._call(getattr(chunks, "close", lambda: None))
                return
            chunk = await self._call(next, chunks, None)
            if chunk is None:
                break
            text = trim.feed(chunk)
            if text:
                job.events.put_nowait(Text(text))
        rest = trim.flush()
        if rest:
            job.events.put_nowait(Text(rest))
        stats = stream.result.stats
        use = usage(stats.prompt_tokens, stats.new_tokens)
        self.metrics.generation_done(stats.prompt_tokens, stats.new_tokens, stats.tau)
        job.events.put_nowait(Final(finish_reason(stats.stop_reason, trim.stopped), use,
                                    adaspec_stats(stats.to_dict(), self.policy_name(job.key),
                                                  getattr(gen, "draft_name", None))))

    # --- worker thread only -------------------------------------------------------------

    def _generator_for(self, key: PolicyKey, policy: Policy | None,
                       args: dict[str, Any]) -> SpeculativeGenerator:
        """The served generator, or a cached one sharing its models with another policy."""
        if key is None:
            return self.generator
        if key in self._generators:
            self._generators.move_to_end(key)
            return self._generators[key]
        base = self.generator
        policy = policy or make_policy(key[0], args)  # evicted since submit
        # the same draft model and model-free sources (e.g. n-gram) as the served generator
        draft = ([base.draft] if base.draft else []) + list(base.draft_sources) \
            if base.draft_sources else base.draft
        gen = SpeculativeGenerator(base.target, draft, policy, runtime=self.runtime)
        self._generators[key] = gen
        while len(self._generators) > self.cache_size:
            self._generators.popitem(last=False)
        return gen

    @staticmethod
    def _prompt_ids(gen: SpeculativeGenerator, req: GenerationRequest) -> list[int]:
        if req.messages is not None:
            tok = gen.tokenizer
            if not getattr(tok, "chat_template", None):
                raise InvalidArgumentError(f"model {gen.target.name!r} has no chat template; "
                                           "use /v1/completions")
            try:
                text = tok.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # e.g. a template that rejects this sequence of roles
                raise InvalidArgumentError(f"the chat template rejected the messages: {exc}") from None
            return list(tok(text, add_special_tokens=False)["input_ids"])
        if isinstance(req.prompt, list) and max(req.prompt) >= gen.target.vocab_size:
            raise InvalidArgumentError(f"token id {max(req.prompt)} is outside the vocabulary "
                                       f"(size {gen.target.vocab_size})")
        return gen.encode(req.prompt)
