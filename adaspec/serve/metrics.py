"""Server metrics in the Prometheus text exposition format (version 0.0.4).

Counters and histograms are updated from the event loop only, so no locking is needed;
gauges (queue depth, running) are read from the scheduler when ``/metrics`` is scraped.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TAU_BUCKETS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0)
GAUGE_HELP = {"adaspec_queue_depth": "Requests waiting for the engine.",
              "adaspec_running": "Sequences being generated (in the batch)."}
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _fmt(value: float) -> str:
    return repr(float(value)) if value != int(value) else str(int(value))


class Histogram:
    """Cumulative-bucket histogram: ``observe(x)``; ``lines(name)`` renders it."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # last slot = +Inf only
        self.sum = 0.0

    def observe(self, x: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, x)] += 1
        self.sum += x

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, count in zip(self.bounds, self.counts):
            total += count
            out.append(f'{name}_bucket{{le="{_fmt(bound)}"}} {total}')
        total += self.counts[-1]
        out += [f'{name}_bucket{{le="+Inf"}} {total}', f"{name}_sum {self.sum!r}", f"{name}_count {total}"]
        return out


class Metrics:
    """Request counts by endpoint and status, token counts, tau and latency histograms."""

    def __init__(self, gauges: Callable[[], dict[str, float]] | None = None) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.tau = Histogram(TAU_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.queue_wait = Histogram(WAIT_BUCKETS)
        self.gauges = gauges or (lambda: {})

    def request_done(self, endpoint: str, status: str, seconds: float | None = None) -> None:
        """Count one finished request; status: ok, cancelled, 400, 404, 429, 500..."""
        self.requests[(endpoint, status)] += 1
        if seconds is not None:
            self.latency.observe(seconds)

    def generation_done(self, prompt_tokens: int, completion_tokens: int, tau: float) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        if tau > 0:
            self.tau.observe(tau)

    def render(self) -> str:
        lines = ["# HELP adaspec_requests_total Finished requests by endpoint and status.",
                 "# TYPE adaspec_requests_total counter"]
        for (endpoint, status), n in sorted(self.requests.items()):
            lines.append(f'adaspec_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
        for name, value, text in (
                ("adaspec_prompt_tokens_total", self.prompt_tokens, "Prompt tokens processed."),
                ("adaspec_completion_tokens_total", self.completion_tokens, "Tokens generated.")):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} counter", f"{name} {value}"]
        for name, hist, text in (
                ("adaspec_tau", self.tau, "Tokens committed per target forward, per request."),
                ("adaspec_request_latency_seconds", self.latency, "Request latency (received to last byte)."),
                ("adaspec_time_to_first_token_seconds", self.ttft, "Time to the first generated text."),
                ("adaspec_batch_size", self.batch_size, "Sequences per batch step (one target forward)."),
                ("adaspec_queue_wait_seconds", self.queue_wait, "Time from arrival to a batch slot.")):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram", *hist.lines(name)]
        for name, value in self.gauges().items():
            lines += [f"# HELP {name} {GAUGE_HELP.get(name, name)}", f"# TYPE {name} gauge",
                      f"{name} {_fmt(value)}"]
        return "\n".join(lines) + "\n"
