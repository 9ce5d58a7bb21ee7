"""`adaspec serve`: a real server on 127.0.0.1 and the real `openai` client, tiny models.

Greedy output over HTTP (streamed or not, completions or chat) must equal
``SpeculativeGenerator.generate()`` token for token; bad input answers OpenAI error JSON;
concurrent clients queue and all get complete, identical answers; a disconnect frees the
engine; beyond the queue bound the server answers 429; a failing request does not take
the server down.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import loaded, make_model, perturbed

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from adaspec.api import SpeculativeGenerator  # noqa: E402
from adaspec.engine import VerifyCall  # noqa: E402
from adaspec.serve.app import create_app  # noqa: E402
from adaspec.serve.protocol import StopTrimmer  # noqa: E402

NAME = "tiny"
PROMPTS = ["def f(x):", "hello world", "The quick brown fox", "1, 2, 3,"]
GREEDY = {"temperature": 0, "max_tokens": 20}


class Running:
    """A uvicorn server on a free 127.0.0.1 port, in a daemon thread."""

    def __init__(self, app) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(api_key="none", base_url=self.url + "/v1", max_retries=0, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def pair(tokenizer):
    target = make_model("llama", seed=0)
    draft = perturbed(target, 0.05, seed=3)  # agrees often, not always: both verify paths run
    return loaded(target, tokenizer, NAME), loaded(draft, tokenizer, "tiny-draft")


@pytest.fixture(scope="module")
def ref(pair):
    """The reference: generate() with the server's configuration (only used while the server is idle)."""
    return SpeculativeGenerator(*pair, "fixed", {"k": 3})


@pytest.fixture(scope="module")
def server(pair):
    running = Running(create_app(SpeculativeGenerator(*pair, "fixed", {"k": 3}), model_name=NAME))
    yield running
    running.stop()


def _expected(ref, prompt, chat=False, **kw):
    return ref.generate(prompt, max_new_tokens=GREEDY["max_tokens"], chat=chat, **kw)


def _chat(prompt):
    return [{"role": "user", "content": prompt}]


def test_completions_equal_generate(server, ref):
    client = server.client()
    for prompt in PROMPTS[:2]:
        want = _expected(ref, prompt)
        resp = client.completions.create(model=NAME, prompt=prompt, **GREEDY)
        assert resp.choices[0].text == want.text
        assert resp.choices[0].finish_reason == "length"
        assert resp.usage.completion_tokens == len(want.token_ids)
        assert resp.usage.prompt_tokens == len(ref.encode(prompt))
        stats = resp.model_extra["adaspec"]
        assert stats["policy"] == "fixed" and stats["tau"] >= 1 and 0 <= stats["acceptance_rate"] <= 1
        assert {"draft_s", "verify_s", "target_forwards"} <= set(stats)

        chunks = list(client.completions.create(model=NAME, prompt=prompt, stream=True, **GREEDY))
        assert "".join(c.choices[0].text for c in chunks) == want.text
        assert len(chunks) > 2  # streamed, not one block
        assert chunks[-1].choices[0].finish_reason == "length"
        assert chunks[-1].usage.completion_tokens == len(want.token_ids)
        assert chunks[-1].model_extra["adaspec"]["tau"] >= 1


def test_chat_equal_generate(server, ref):
    client = server.client()
    prompt = PROMPTS[2]
    want = _expected(ref, prompt, chat=True)
    resp = client.chat.completions.create(model=NAME, messages=_chat(prompt), **GREEDY)
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == want.text
    assert resp.usage.completion_tokens == len(want.token_ids)

    chunks = list(client.chat.completions.create(model=NAME, messages=_chat(prompt), stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_stop_strings(server, ref):
    client = server.client()
    prompt = PROMPTS[3]
    full = _expected(ref, prompt).text
    # a printable two-character stop string from the middle of the greedy output
    i = next(i for i in range(3, len(full) - 1) if full[i:i + 2].isascii() and full[i:i + 2].isprintable())
    stop = full[i:i + 2]
    want = full[:full.find(stop)]
    assert _expected(ref, prompt, stop=[stop]).text.startswith(want)  # the engine stops there too
    for stops in ([stop], [stop, "\x00never"]):
        resp = client.completions.create(model=NAME, prompt=prompt, stop=stops, **GREEDY)
        assert resp.choices[0].text == want and resp.choices[0].finish_reason == "stop"
        chunks = list(client.completions.create(model=NAME, prompt=prompt, stop=stops, stream=True, **GREEDY))
        assert "".join(c.choices[0].text for c in chunks) == want
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_trimmer_holds_back_partial_matches():
    trim = StopTrimmer(("END", "xy"))
    out = [trim.feed(c) for c in ("abc E", "N", "D tail")]
    assert out == ["abc ", "", ""] and trim.stopped
    trim = StopTrimmer(("END",))
    assert trim.feed("a EN") + trim.feed("x") + trim.flush() == "a ENx"


def test_policy_override(server, ref):
    client = server.client()
    want = _expected(ref, PROMPTS[0])
    for policy, args in (("heuristic", {"k": 2}), ("fixed", {"k": "6"}), ("entropy", {})):
        resp = client.completions.create(model=NAME, prompt=PROMPTS[0], **GREEDY,
                                         extra_body={"adaspec": {"policy": policy, "policy_args": args}})
        assert resp.choices[0].text == want.text, policy
        assert resp.model_extra["adaspec"]["policy"] == policy


BAD = [
    ({"temperature": -1}, "temperature"), ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 1.5}, "max_tokens"),
    ({"n": 2}, "n"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": ""}, "stop"),
    ({"logprobs": 5}, "logprobs"), ({"echo": True}, "echo"), ({"prompt": ""}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"), ({"seed": "x"}, "seed"), ({"stream": "yes"}, "stream"),
    ({"adaspec": {"policy": "nope"}}, "adaspec"),
    ({"adaspec": {"policy": "fixed", "policy_args": {"kk": 3}}}, "adaspec"),
    ({"adaspec": {"policy": "fixed", "policy_args": {"k": "many"}}}, "adaspec"),
    ({"adaspec": {"policy_args": {"k": 3}}}, "adaspec.policy"),
    ({"adaspec": {"polcy": "fixed"}}, "adaspec"),
]


@pytest.mark.parametrize("change,param", BAD, ids=[p for _, p in BAD])
def test_bad_parameters_400(server, change, param):
    body = {"model": NAME, "prompt": "hi", "max_tokens": 4, **change}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"] and err["param"] == param


def test_error_shapes(server):
    url = server.url
    r = httpx.post(url + "/v1/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    for body in ({"model": NAME, "prompt": [999999]},  # outside the vocabulary: found at run time
                 {"model": NAME, "prompt": "x" * 300}):  # longer than the tiny model's context
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["message"], r.text
    r = httpx.post(url + "/v1/chat/completions", json={"model": NAME, "messages": []}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.get(url + "/v1/nothing", timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    client = server.client()
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert info.value.status_code == 404 and "gpt-4" in info.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=_chat("hi"), temperature=5)


def test_models_health_metrics(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [NAME]
    health = httpx.get(server.url + "/health", timeout=30).json()
    assert health["status"] == "ok" and health["model"] == NAME and health["queue_depth"] == 0
    client.completions.create(model=NAME, prompt="hi", **GREEDY)
    r = httpx.get(server.url + "/metrics", timeout=30)
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'adaspec_requests_total{endpoint="/v1/completions",status="ok"}' in text
    assert "adaspec_tau_bucket{le=\"+Inf\"}" in text and "adaspec_queue_depth 0" in text
    assert "adaspec_request_latency_seconds_count" in text
    completion = [ln for ln in text.splitlines() if ln.startswith("adaspec_completion_tokens_total")]
    assert int(completion[0].split()[1]) > 0


def test_concurrent_clients_identical_to_single(server, ref):
    wants = {p: _expected(ref, p).text for p in PROMPTS}
    chat_want = _expected(ref, PROMPTS[1], chat=True).text

    def client_loop(c: int) -> list[tuple[str, str]]:
        client, out = server.client(), []
        for r in range(3):  # bounded loop per client
            prompt = PROMPTS[(c + r) % len(PROMPTS)]
            if (c + r) % 3 == 0:
                chunks = client.completions.create(model=NAME, prompt=prompt, stream=True, **GREEDY)
                out.append((wants[prompt], "".join(ch.choices[0].text for ch in chunks)))
            elif (c + r) % 3 == 1:
                resp = client.completions.create(model=NAME, prompt=prompt, **GREEDY)
                out.append((wants[prompt], resp.choices[0].text))
            else:
                resp = client.chat.completions.create(model=NAME, messages=_chat(PROMPTS[1]), **GREEDY)
                out.append((chat_want, resp.choices[0].message.content))
        return out

    with ThreadPoolExecutor(8) as pool:
        results = [pair for out in pool.map(client_loop, range(8)) for pair in out]
    assert len(results) == 24
    assert all(got == want for want, got in results)


# --- an engine that can be held mid-generation, or made to fail ---------------------------


class GatedGenerator(SpeculativeGenerator):
    """Its sequences wait for ``gate`` before every forward after their first chunk; ``fail``
    makes a new sequence's engine fail to build."""

    def __init__(self, *args, **kwargs) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False
        self.ends: list[str] = []  # per sequence: "done" (exhausted) or "closed" (abandoned)
        super().__init__(*args, **kwargs)
        self.ends.clear()

    def new_engine(self, policy):
        if self.fail:
            raise RuntimeError("injected failure")
        engine = super().new_engine(policy)
        rounds = engine.rounds

        def gated(*args, **kwargs):
            inner, end, chunks, sent = rounds(*args, **kwargs), "closed", 0, None
            try:
                while True:
                    try:
                        item = inner.send(sent)
                    except StopIteration:
                        end = "done"
                        return
                    if not isinstance(item, VerifyCall):
                        chunks += 1
                    elif chunks:
                        assert self.gate.wait(20)
                    sent = yield item
            finally:
                self.ends.append(end)

        engine.rounds = gated
        return engine


@pytest.fixture()
def gated(pair):
    gen = GatedGenerator(*pair, "fixed", {"k": 3})
    running = Running(create_app(gen, model_name=NAME, max_queue=1, max_batch=1))
    yield running, gen
    gen.gate.set()
    running.stop()


def _metric(url: str, line_start: str) -> int:
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(line_start):
            return int(line.split()[-1])
    return 0


def _until(cond, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_disconnect_frees_engine_and_queue_bound(gated, ref):
    running, gen = gated
    url, cancelled = running.url, 'adaspec_requests_total{endpoint="/v1/completions",status="cancelled"}'
    want = _expected(ref, PROMPTS[1]).text
    gen.gate.clear()
    # A: a long stream; read its first chunk, then the engine is held mid-generation
    http = httpx.Client(timeout=30)
    body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0, "stream": True}
    with http.stream("POST", url + "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        first = next(line for line in resp.iter_lines() if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["text"]
        # B waits in the queue (limit 1) ...
        with ThreadPoolExecutor(1) as pool:
            b = pool.submit(lambda: running.client().completions.create(model=NAME, prompt=PROMPTS[1],
                                                                        **GREEDY))
            _until(lambda: httpx.get(url + "/health").json()["queue_depth"] == 1, "B to queue")
            # ... so C is turned away with 429 in OpenAI's error shape
            r = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "x"}, timeout=30)
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
            assert r.headers["retry-after"] == "1"
            with pytest.raises(openai.RateLimitError):
                running.client().completions.create(model=NAME, prompt="x", max_tokens=2)
            # A disconnects mid-stream
            resp.close()
            http.close()
            _until(lambda: _metric(url, cancelled) == 1, "the disconnect to be seen")
            gen.gate.set()
            assert b.result(timeout=30).choices[0].text == want  # the engine was freed for B
    assert gen.ends == ["closed", "done"]  # A's generation stopped early, B's ran to the end
    health = httpx.get(url + "/health").json()
    assert not health["running"] and health["queue_depth"] == 0


def test_failing_request_keeps_server_up(gated, ref):
    running, gen = gated
    client = running.client()
    gen.fail = True
    with pytest.raises(openai.InternalServerError) as info:
        client.completions.create(model=NAME, prompt=PROMPTS[0], **GREEDY)
    assert "injected failure" in info.value.message
    gen.fail = False
    assert client.completions.create(model=NAME, prompt=PROMPTS[1], **GREEDY).choices[0].text == \
        _expected(ref, PROMPTS[1]).text
    assert _metric(running.url, 'adaspec_requests_total{endpoint="/v1/completions",status="500"}') == 1


def test_sampling_parameters_pass_through(server, ref):
    client = server.client()
    kw = dict(max_tokens=20, temperature=0.8, top_p=0.9, seed=7)
    want = ref.generate(PROMPTS[0], max_new_tokens=20, temperature=0.8, top_p=0.9, seed=7).text
    texts = [client.completions.create(model=NAME, prompt=PROMPTS[0], **kw).choices[0].text for _ in range(2)]
    assert texts == [want, want]
    other = client.completions.create(model=NAME, prompt=PROMPTS[0], **{**kw, "seed": 8}).choices[0].text
    assert other != want


def test_disconnect_while_waiting_non_streamed(gated, ref):
    running, gen = gated
    url, cancelled = running.url, 'adaspec_requests_total{endpoint="/v1/completions",status="cancelled"}'
    gen.gate.clear()
    body = json.dumps({"model": NAME, "prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0}).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:  # a raw client, to hang up at will
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        _until(lambda: httpx.get(url + "/health").json()["running"], "the request to run")
    _until(lambda: _metric(url, cancelled) == 1, "the disconnect to be seen")
    gen.gate.set()
    resp = running.client().completions.create(model=NAME, prompt=PROMPTS[1], **GREEDY)
    assert resp.choices[0].text == _expected(ref, PROMPTS[1]).text
    assert gen.ends == ["closed", "done"]
