"""``python -m adaspec.bench.suffix_replay``: ``context:draft=model+ngram`` with and without
the suffix cache, replayed in order against recorded greedy outputs with a clean cost clock.

On a shared machine wall times of single prompts stall; this replay has none of that noise.
The target is a stand-in whose argmax at every position is the token a greedy benchmark run
recorded (``--results DIR``: a ``bench`` folder with an ``ar`` row or a row identical to it),
and whose forward over n tokens sleeps the compiled runtime's measured verify time v(n)
(``--verify-ms``: n:ms pairs, linear in between, +1.4 ms a token past the last). Drafters,
the ``context`` policy (its choices read those times) and the cache are the real ones;
greedy acceptance is then exact, and every replayed output is checked equal to the record.
Prefill is not timed. Prints one JSON line per method and one with the per-prompt ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ..runtime.eager import ForwardOut
from .datasets import load_dataset
from .report import read_results
from .runner import encode_turn

# the native Q4_1 runtime's verify curve (verify_cost on an idle machine, session 8)
DEFAULT_VERIFY_MS = "1:5.0,2:6.0,3:7.0,4:7.9,5:9.1,8:12.9"


class StandInTarget:
    """A target runner whose argmax is ``full[p + 1]`` at every position p on the recorded
    path (``full``: prompt + recorded output) and whose forward sleeps ``v(n)``."""

    device = torch.device("cpu")

    def __init__(self, vocab: int, verify_ms: dict[int, float], capacity: int = 1 << 20) -> None:
        self.vocab, self.verify_ms, self.capacity, self.full = vocab, verify_ms, capacity, []

    def reset(self) -> None: ...

    def rollback(self, committed: list[int]) -> None: ...

    def prefill(self, seq: list[int], hidden: bool = False) -> None:
        return None

    def cost_ms(self, n: int) -> float:
        ks = sorted(self.verify_ms)
        if n >= ks[-1]:
            return self.verify_ms[ks[-1]] + 1.4 * (n - ks[-1])
        lo = max(k for k in ks if k <= n) if n >= ks[0] else ks[0]
        hi = min(k for k in ks if k >= n)
        w = 0.0 if hi == lo else (n - lo) / (hi - lo)
        return self.verify_ms[lo] + w * (self.verify_ms[hi] - self.verify_ms[lo])

    def forward(self, seq: list[int], n: int, hidden: bool = False, attentions: bool = False) -> ForwardOut:
        """Logits [n, V]: one-hot at the recorded next token while ``seq`` is on the record."""
        time.sleep(self.cost_ms(n) / 1e3)
        full, logits = self.full, torch.zeros(n, self.vocab)
        d = 0
        while d < len(seq) and d < len(full) and seq[d] == full[d]:
            d += 1
        for j in range(n):
            p = len(seq) - n + j
            if p < d and p + 1 < len(full):
                logits[j, full[p + 1]] = 1.0
        return ForwardOut(logits, None, None)


def replay(gen: Any, prompts: list, outputs: dict[str, list[list[int]]]) -> tuple[list[float], dict]:
    """Run ``gen`` over the prompts in order against the recorded outputs; per-prompt tokens/s
    (prefill excluded) and counts per generated token."""
    tok, per, counts, total = gen.tokenizer, [], defaultdict(float), 0
    for p in prompts:
        answers: list[str] = []
        seconds = tokens = 0.0
        for turn, out in enumerate(outputs[p.id]):
            ids = encode_turn(tok, p, turn, answers, not p.raw)
            gen.engine.target.full = ids + out
            res = gen.generate(ids, max_new_tokens=len(out))
            if res.token_ids != out:
                raise AssertionError(f"{p.id}: the replay left the recorded output")
            s = res.stats
            seconds += s.wall_s - s.prefill_s
            tokens += s.new_tokens
            for k in ("target_forwards", "draft_forwards", "drafted_tokens", "accepted_tokens"):
                counts[k] += getattr(s, k)
            answers.append(tok.decode(out, skip_special_tokens=True))
        per.append(tokens / seconds)
        total += tokens
    return per, {k: round(v / total, 4) for k, v in counts.items()}


def recorded(results: Path) -> dict[str, list[list[int]]]:
    rows = read_results(results / "results.jsonl")
    by_method: dict[str, dict] = defaultdict(dict)
    for r in rows:
        by_method[r["method"]][r["prompt_id"]] = r["token_ids"]
    return by_method.get("ar") or by_method["context:draft=model+ngram:cache=off"]


def replay_parser(doc: str) -> argparse.ArgumentParser:
    """The options every replay of recorded outputs takes: the prompts and the bench folder."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--split", default="dev")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--results", required=True, help="a greedy `adaspec bench` folder of the same prompts")
    return p


def main(argv: list[str] | None = None) -> int:
    from ..api import SpeculativeGenerator
    from ..drafters.suffix import SuffixCache

    p = replay_parser(__doc__)
    p.add_argument("--verify-ms", default=DEFAULT_VERIFY_MS)
    p.add_argument("--prior", type=float, default=1.0, help="SuffixCache(prior=...) (default 1)")
    args = p.parse_args(argv)
    outputs = recorded(Path(args.results))
    prompts = [q for q in load_dataset(args.dataset, args.split)[:args.limit] if q.id in outputs]
    verify = {int(k): float(v) for k, v in (x.split(":") for x in args.verify_ms.split(","))}
    base = SpeculativeGenerator("default", None, "fixed", threads=1)
    per = {}
    for name, cache in (("cache", SuffixCache(prior=args.prior)), ("no cache", False)):
        gen = SpeculativeGenerator(base.target, ["default", "ngram"], "context", suffix_cache=cache)
        gen.engine.target = StandInTarget(gen.target.vocab_size, verify)
        per[name], counts = replay(gen, prompts, outputs)
        print(json.dumps({"method": name, "tokens_per_s": round(statistics.fmean(per[name]), 2), **counts}))
    ratios = [a / b for a, b in zip(per["cache"], per["no cache"], strict=True)]
    groups: dict[str, list[float]] = defaultdict(list)
    for q, r in zip(prompts, ratios, strict=True):
        groups[q.id.split("/")[1] if q.id.startswith("templated/") else q.category].append(r)
    print(json.dumps({"prompts": len(prompts), "cache_over_no_cache_mean": round(statistics.fmean(ratios), 3),
                      "median": round(statistics.median(ratios), 3),
                      "median_by_group": {g: round(statistics.median(v), 3) for g, v in groups.items()},
                      "plain_tokens_per_s": round(1e3 / verify[1], 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
