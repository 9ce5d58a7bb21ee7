"""`adaspec serve` with continuous batching: operator features, load and soak (loopback, tiny models).

- concurrent requests share batch steps and each gets the text it gets alone;
- --api-key: 401 without / with a wrong Bearer token (constant-time compare), 200 with it;
- request body limit: 413 (declared length and chunked bodies);
- a too-long prompt is a 400 at once even when the queue is full;
- /metrics: batch-size and queue-wait histograms, time to first token;
- load: 64 concurrent clients against --max-queue 16: every request answers 200, 400 or
  429 within the time bound, none hangs, the server stays healthy;
- soak: 200 requests; the process's resident memory grows <= 5 %.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import loaded, make_model, perturbed

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from test_serve import NAME, Running  # noqa: E402

from adaspec.api import SpeculativeGenerator  # noqa: E402
from adaspec.serve.app import create_app  # noqa: E402

PROMPTS = ["def f(x):", "hello world", "The quick brown fox", "1, 2, 3,", "abc", "Once upon", "x = [",
           "To be"]


@pytest.fixture(scope="module")
def pair(tokenizer):
    target = make_model("llama", seed=0)
    return loaded(target, tokenizer, NAME), loaded(perturbed(target, 0.05, seed=3), tokenizer, "tiny-draft")


@pytest.fixture(scope="module")
def server(pair):
    app = create_app(SpeculativeGenerator(*pair, "heuristic"), model_name=NAME, max_queue=16, max_batch=8,
                     api_key="s3cret", max_body=4096)
    running = Running(app)
    running.app = app
    yield running
    running.stop()


AUTH = {"Authorization": "Bearer s3cret"}


def _post(url: str, body: dict, headers: dict | None = None, timeout: float = 60) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json=body, headers=AUTH if headers is None else headers,
                      timeout=timeout)


def _metric(text: str, name: str) -> float:
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name + " "))


def test_batched_requests_identical_to_alone(server, pair):
    ref = SpeculativeGenerator(*pair, "heuristic")
    want = [ref.generate(p, max_new_tokens=24).text for p in PROMPTS]
    body = {"max_tokens": 24, "temperature": 0}
    for _burst in range(3):  # on a loaded machine a burst's requests may still arrive one by one
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda p: _post(server.url, {"prompt": p, **body}), PROMPTS))
        assert [r.status_code for r in got] == [200] * 8
        assert [r.json()["choices"][0]["text"] for r in got] == want
        text = httpx.get(server.url + "/metrics", timeout=30).text
        if _metric(text, "adaspec_batch_size_sum") > _metric(text, "adaspec_batch_size_count"):
            break
    # batches of more than one sequence ran: the mean batch size is above 1
    assert _metric(text, "adaspec_batch_size_sum") > _metric(text, "adaspec_batch_size_count") > 0
    assert _metric(text, "adaspec_queue_wait_seconds_count") >= 8
    assert _metric(text, "adaspec_time_to_first_token_seconds_count") >= 8


def test_api_key(server):
    body = {"prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                    {"Authorization": "Basic s3cret"}):
        r = _post(server.url, body, headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
    assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 401
    assert _post(server.url, body).status_code == 200
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200  # open, as in vLLM


def test_body_limit_413(server):
    r = _post(server.url, {"prompt": "x" * 5000, "max_tokens": 2})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    chunked = (b"{\"prompt\": \"" + b"y" * 1000 for _ in range(5))  # no Content-Length
    r = httpx.post(server.url + "/v1/completions", content=chunked, headers=AUTH, timeout=30)
    assert r.status_code == 413


def test_prompt_too_long_is_400_at_once(server):
    t0 = time.monotonic()
    r = _post(server.url, {"prompt": "z" * 300, "max_tokens": 2})  # the tiny model's context is 256
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert time.monotonic() - t0 < 5


def test_load_64_clients(server):
    """64 concurrent clients (some with prompts that are too long) against --max-queue 16."""
    def one(i: int) -> int:
        prompt = "w" * 300 if i % 16 == 5 else PROMPTS[i % len(PROMPTS)]
        body = {"prompt": prompt, "max_tokens": 16, "temperature": 0}
        return _post(server.url, body, timeout=120).status_code

    # the engine holds its first step until the queue is full, so some clients must get a 429
    # however fast the server drains (the tiny model generates in milliseconds)
    batch = server.app.state.server.scheduler.batch
    step, release = batch.step, threading.Event()

    def held_step():
        release.wait(60)
        return step()

    batch.step = held_step
    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(64) as pool:
            futures = [pool.submit(one, i) for i in range(64)]
            while not any(f.done() and f.result() == 429 for f in futures):
                assert time.monotonic() - t0 < 60, "the queue never filled"
                time.sleep(0.05)
            release.set()
            codes = [f.result() for f in futures]
    finally:
        release.set()
        batch.step = step
    assert time.monotonic() - t0 < 120
    assert set(codes) <= {200, 400, 429} and len(codes) == 64
    assert codes.count(400) == 4 and codes.count(200) >= 16 + 1 and codes.count(429) > 0
    health = httpx.get(server.url + "/health", timeout=30).json()
    assert health["status"] == "ok"
    deadline = time.monotonic() + 30
    while health["running"] or health["queue_depth"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
        health = httpx.get(server.url + "/health", timeout=30).json()
    assert _post(server.url, {"prompt": "hi", "max_tokens": 4}).status_code == 200


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) * 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
def test_soak_rss(server):
    def burst(n: int) -> list[int]:
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda i: _post(server.url, {"prompt": PROMPTS[i % 8] * (1 + i % 3),
                                                              "max_tokens": 12, "stream": i % 2 == 0,
                                                              "temperature": 0.7, "seed": i}).status_code,
                                 range(n)))

    burst(40)  # warm up: caches, allocator arenas, compiled kernels
    gc.collect()
    before = _rss()
    codes = burst(200)
    gc.collect()
    after = _rss()
    assert codes == [200] * 200
    assert after <= before * 1.05, f"RSS grew {before / 2**20:.1f} -> {after / 2**20:.1f} MiB"


def test_serve_load_bench_runs(tmp_path, tokenizer, monkeypatch):
    """The load benchmark end to end on a tiny saved model: real server subprocess, openai client."""
    from adaspec.bench import serve_load

    model = make_model("llama", seed=0, max_pos=1024)  # byte-level tokens: prompts of ~500
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    monkeypatch.setenv("ADASPEC_RUNS", str(tmp_path))
    out = tmp_path / "load.json"
    rc = serve_load.main(["--target", str(tmp_path / "m"), "--draft", "none", "--concurrency", "1,3",
                          "--requests", "3", "--max-new", "6", "--json", str(out), "--threads", "1"])
    assert rc == 0
    import json

    levels = json.loads(out.read_text())
    assert [(x["server"], x["concurrency"]) for x in levels] == [("adaspec", 1), ("adaspec", 3)]
    assert all(x["tokens_per_s"] > 0 and x["p95_latency"] >= x["p50_latency"] > 0 for x in levels)
    assert levels[1]["identical"] is True


def test_failing_sequence_ends_only_itself(pair):
    """A sequence whose drafter raises mid-generation gets a 500; the sequences batched with
    it finish with their own texts, and the server keeps serving."""
    class Flaky(SpeculativeGenerator):
        def new_engine(self, policy):
            engine = super().new_engine(policy)
            propose = engine.drafter.propose_steps

            def maybe_fail(context, *args, **kwargs):
                if bytes(context[:4]) == b"FAIL" and len(context) > 12:
                    raise RuntimeError("drafter broke")
                return propose(context, *args, **kwargs)

            engine.drafter.propose_steps = maybe_fail
            return engine

    ref = SpeculativeGenerator(*pair, "fixed", {"k": 3})
    running = Running(create_app(Flaky(*pair, "fixed", {"k": 3}), model_name=NAME, max_batch=4))
    try:
        prompts = ["FAIL now", *PROMPTS[:3]]
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda p: _post(running.url, {"prompt": p, "max_tokens": 20,
                                                              "temperature": 0}, headers={}), prompts))
        assert got[0].status_code == 500 and "drafter broke" in got[0].json()["error"]["message"]
        assert [r.json()["choices"][0]["text"] for r in got[1:]] == \
            [ref.generate(p, max_new_tokens=20).text for p in PROMPTS[:3]]
        assert httpx.get(running.url + "/health", timeout=30).json()["status"] == "ok"
    finally:
        running.stop()


def test_one_event_loop_wakeup_per_step():
    """A step's events and metrics reach the event loop in one call_soon_threadsafe (in order),
    not one wake-up per token and client."""
    from adaspec.serve.scheduler import Scheduler, Text

    class Loop:
        def __init__(self):
            self.calls = []

        def call_soon_threadsafe(self, fn, *args):
            self.calls.append((fn, args))

    class FakeJob:
        def __init__(self, loop):
            self.loop, self.got = loop, []
            self.events = type("Q", (), {"put_nowait": self.got.append})()

    loop = Loop()
    sched = Scheduler.__new__(Scheduler)  # no engine thread: only the outbox
    sched._outbox, sched._event_loop = {}, loop
    jobs = [FakeJob(loop) for _ in range(3)]
    seen = []
    sched._observe(seen.append, 3)
    for i, job in enumerate(jobs):
        sched._emit(job, Text(f"t{i}"))
        sched._emit(job, Text(f"u{i}"))
    assert loop.calls == []
    sched._flush()
    assert len(loop.calls) == 1
    fn, args = loop.calls[0]
    fn(*args)
    assert seen == [3]
    assert [[e.text for e in j.got] for j in jobs] == [["t0", "u0"], ["t1", "u1"], ["t2", "u2"]]
    sched._flush()
    assert len(loop.calls) == 1  # nothing new: no wake-up


def test_cli_server_engine_on_main_thread_stops_on_sigterm(tmp_path, tokenizer):
    """``adaspec serve`` (engine loop on the main thread, HTTP in a thread) answers, then stops
    on SIGTERM within seconds with exit code 0."""
    import subprocess
    import sys

    from adaspec.bench.serve_load import _free_port

    make_model("llama", seed=0).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    port = _free_port()
    cmd = [sys.executable, "-m", "adaspec.cli", "serve", "--target", str(tmp_path / "m"), "--draft", "none",
           "--threads", "1", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        r = httpx.post(url + "/v1/completions", json={"model": str(tmp_path / "m"), "prompt": "hello",
                                                      "max_tokens": 4, "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
        t0 = time.monotonic()
        proc.terminate()
        assert proc.wait(15) == 0, proc.stderr.read().decode()
        assert time.monotonic() - t0 < 15
    finally:
        if proc.poll() is None:
            proc.kill()
