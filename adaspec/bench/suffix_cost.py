"""``python -m adaspec.bench.suffix_cost``: the suffix cache's lookup and update cost at a
given fill, against one decode step of the target, side by side in one process.

The cache is filled with synthetic texts (Zipf-distributed token ids, ``--text-tokens`` per
text) up to ``--tokens``; then it times lookups whose suffix occurs in the cache (a hit that
copies ``--budget`` tokens with their probabilities), lookups that find nothing, and the
insertion of one finished text (amortised per token: a step commits at least one). The
target's step is the mean of plain greedy decode steps (prefill excluded) of ``--target``.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from ..drafters.suffix import SuffixCache
from ..frontend.options import add_model_args


def fill(cache: SuffixCache, tokens: int, text_tokens: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Add synthetic texts until ``tokens`` have been added; returns them ([tokens] int64)."""
    rng = np.random.default_rng(seed)
    data = np.minimum(rng.zipf(1.3, size=tokens), vocab - 1).astype(np.int64)
    for i in range(0, tokens, text_tokens):
        cache.add(data[i:i + text_tokens].tolist())
    return data


def time_cache(cache: SuffixCache, data: np.ndarray, text_tokens: int, budget: int,
               reps: int = 2000, seed: int = 1) -> dict[str, float]:
    """Mean µs of a hit lookup, a miss lookup and one text insertion (and per token)."""
    rng = np.random.default_rng(seed)
    tail = data[-cache.tokens // 2:]  # still cached
    starts = rng.integers(200, len(tail) - budget, reps)
    hits = [tail[s - 200:s].tolist() for s in starts]
    misses = [rng.integers(0, 1 << 30, 200).tolist() for _ in range(reps)]
    out: dict[str, float] = {}
    for name, ctxs in (("lookup_hit_us", hits), ("lookup_miss_us", misses)):
        t = time.perf_counter()
        copied = sum(len(cache.match(c, budget).tokens) for c in ctxs)
        out[name] = (time.perf_counter() - t) / reps * 1e6
        out[name.replace("_us", "_copied")] = copied / reps
    texts = [rng.integers(0, 50_000, text_tokens).tolist() for _ in range(200)]
    t = time.perf_counter()
    for x in texts:
        cache.add(x)
    out["update_us_per_text"] = (time.perf_counter() - t) / len(texts) * 1e6
    out["update_us_per_token"] = out["update_us_per_text"] / text_tokens
    return out


def step_ms(target: str, tokens: int = 64, threads: int | None = None) -> float:
    """Mean ms of one plain greedy decode step of ``target`` (prefill excluded)."""
    from ..api import SpeculativeGenerator

    gen = SpeculativeGenerator(target, None, "fixed", threads=threads)
    ids = gen.encode("Write a short story about a robot who learns to paint.", chat=True)
    gen.generate(ids, max_new_tokens=8)  # warm-up (kernel compilation, caches)
    res = gen.generate(ids, max_new_tokens=tokens)
    s = res.stats
    return (s.wall_s - s.prefill_s) / max(s.rounds, 1) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1_000_000, help="cache fill (default 1M)")
    p.add_argument("--text-tokens", type=int, default=256, help="tokens per cached text (default 256)")
    p.add_argument("--budget", type=int, default=16, help="tokens a lookup may copy (default 16)")
    p.add_argument("--min-path-prob", type=float, default=0.05,
                   help="the cache's path floor (default 0.05; 0: every hit copies the whole budget)")
    add_model_args(p, ("target", "threads"), target="target whose decode step is the yardstick")
    args = p.parse_args(argv)
    cache = SuffixCache(max(args.tokens + args.tokens // 16, 64), min_path_prob=args.min_path_prob)
    t = time.perf_counter()
    data = fill(cache, args.tokens, args.text_tokens, 49_152)
    res = {"cached_tokens": cache.tokens, "cache_mb": round(cache.nbytes / 2**20, 1),
           "fill_s": round(time.perf_counter() - t, 2)}
    res.update({k: round(v, 2) for k, v in time_cache(cache, data, args.text_tokens, args.budget).items()})
    step = step_ms(args.target, threads=args.threads)
    per_step_us = res["lookup_hit_us"] + res["update_us_per_token"]
    res.update(step_ms=round(step, 3), cache_share_of_step=round(per_step_us / (step * 1e3), 4))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
