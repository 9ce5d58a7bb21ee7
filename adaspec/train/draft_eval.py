"""Measure a trained draft: step cost against the target, subset coverage, agreement, tau.

    python -m adaspec.train.draft_eval --draft adaspec/assets/default-draft \\
        --heldout ~/.cache/adaspec/train-draft/<hash>/heldout --engine 8

* step cost: one-token forward with a KV cache of ``--ctx`` tokens, bf16, median of repeats;
* coverage / agreement / simulated tau: teacher forcing on the held-out target continuations
  written by ``train-draft`` (see :func:`agreement_stats`);
* ``--engine N``: N held-out prompts per category through ``SpeculativeGenerator`` with fixed
  K=5 (greedy, 128 new tokens) and through plain decoding, for measured tau (pooled over the
  prompts) and speed-up (mean over prompts of the per-prompt ratio).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ..frontend.options import add_model_args
from ..metrics import RunMetrics
from ..runtime import set_threads
from .draft_data import CODE_SOURCES, load_shards
from .draft_model_init import agreement_stats, coverage


@torch.no_grad()
def step_ms(model: torch.nn.Module, ctx: int = 200, n: int = 30, vocab: int = 49152) -> float:
    """Median ms of a one-token forward after a ``ctx``-token prefill (fresh DynamicCache)."""
    from transformers import DynamicCache

    from ..runtime.eager import cache_kwargs

    times = []
    for _ in range(3):
        cache = DynamicCache()
        model(torch.randint(0, vocab, (1, ctx)), **cache_kwargs(model, cache), use_cache=True)
        tok = torch.randint(0, vocab, (1, 1))
        t0 = time.perf_counter()
        for _ in range(n):
            model(tok, **cache_kwargs(model, cache), use_cache=True)
        times.append((time.perf_counter() - t0) / n * 1000)
    return statistics.median(times)


def heldout_sets(path: Path) -> dict[str, list[tuple[list[int], list[int]]]]:
    """Held-out (prompt ids, target response ids) split into ``code`` and ``chat``."""
    sets: dict[str, list[tuple[list[int], list[int]]]] = {"code": [], "chat": []}
    for ex in load_shards(path):
        sets["code" if ex.source in CODE_SOURCES else "chat"].append((ex.prompt, ex.response))
    return sets


def engine_run(draft: str, sets: dict[str, list[tuple[list[int], list[int]]]], n: int, dtype: str,
               ) -> dict[str, Any]:
    """Fixed K=5 speculative vs plain greedy decoding on ``n`` prompts per category."""
    from ..api import SpeculativeGenerator

    spec = SpeculativeGenerator("default", draft, "fixed", {"k": 5}, dtype=dtype)
    plain = SpeculativeGenerator(spec.target, None, "fixed", {"k": 5})
    spec.generate(sets["chat"][0][0], max_new_tokens=8)  # warm-up
    plain.generate(sets["chat"][0][0], max_new_tokens=8)
    out: dict[str, Any] = {}
    for cat, seqs in sets.items():
        speedups, same, pooled = [], 0, RunMetrics()
        for prompt, _ in seqs[:n]:
            a = plain.generate(prompt, max_new_tokens=128)
            b = spec.generate(prompt, max_new_tokens=128)
            pooled = pooled + b.stats  # counts pooled over prompts (a position may never come up in one)
            speedups.append(b.stats.tokens_per_s / max(a.stats.tokens_per_s, 1e-9))
            same += int(a.token_ids == b.token_ids)
        per_position = (pooled.per_position_acceptance + [0.0] * 5)[:5]
        out[cat] = {"prompts": len(speedups), "tau": round(pooled.tau, 3),
                    "speedup": round(statistics.mean(speedups), 3), "identical": same,
                    "per_position": [round(x, 3) for x in per_position]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, ("draft", "threads"), threads="torch CPU threads (default 1)")
    ap.set_defaults(threads=1)
    ap.add_argument("--heldout", required=True, help="held-out shard dir written by train-draft")
    ap.add_argument("--ctx", type=int, default=200)
    ap.add_argument("--engine", type=int, default=0, help="prompts per category for engine runs")
    ap.add_argument("--engine-dtype", default="fp32")
    ap.add_argument("--skip-cost", action="store_true")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    from ..checkpoints.loader import load_model, vocab_fingerprint

    target = load_model("default", dtype="bf16")
    draft = load_model(args.draft, dtype="bf16", role="draft")
    meta = draft.model.config.adaspec_draft
    same_vocab = meta["target_vocab_sha256"] == vocab_fingerprint(target.tokenizer)
    res: dict[str, Any] = {"fingerprint_ok": same_vocab, "threads": args.threads}
    if not args.skip_cost:
        t_ms, d_ms = step_ms(target.model, args.ctx, n=10), step_ms(draft.model, args.ctx)
        res["cost"] = {"target_ms": round(t_ms, 2), "draft_ms": round(d_ms, 2),
                       "ratio": round(d_ms / t_ms, 4)}
        print(json.dumps(res["cost"]), flush=True)
    sets = heldout_sets(Path(args.heldout).expanduser())
    subset = draft.model.lm_head.token_ids
    fp32 = load_model(args.draft, dtype="fp32", role="draft").model
    for cat, seqs in sets.items():
        st = agreement_stats(fp32, seqs, k=5)
        st["coverage"] = coverage([r for _, r in seqs], subset)
        res[cat] = {k: (round(v, 4) if isinstance(v, float) else
                        [round(x, 3) for x in v] if isinstance(v, list) else v) for k, v in st.items()}
        print(cat, json.dumps(res[cat]), flush=True)
    if args.engine:
        res["engine"] = engine_run(args.draft, sets, args.engine, args.engine_dtype)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
