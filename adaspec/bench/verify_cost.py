"""Verify cost as a function of the number of tokens (tree size) on this machine.

``python -m adaspec.bench.verify_cost [--target default] [--context 200] [--threads 1]``

Times one target forward of ``n`` new tokens (a chain; a token tree of ``n`` nodes costs
the same matmuls plus a mask) on a cache of ``--context`` tokens, for n in ``--sizes``,
interleaving sizes within each repeat (the machine is shared and noisy) and reporting the
median, the ratio to one token and the marginal cost per extra token. On GPUs the curve is
flat for small n; on CPUs it is not, which is why ``context``'s tree rule and online
threshold use the measured slope instead of assuming free verification.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


@torch.inference_mode()
def measure(model: torch.nn.Module, sizes: list[int], context: int = 200, repeats: int = 7,
            vocab: int = 1000, seed: int = 0) -> dict[int, float]:
    """Median seconds of a forward of ``n`` new tokens after ``context`` cached ones, per n."""
    from transformers import DynamicCache

    from ..kv import crop_cache

    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ctx = torch.randint(10, vocab, (1, context), generator=g).to(device)
    cache = DynamicCache(config=getattr(model, "config", None))
    model(ctx, past_key_values=cache, use_cache=True)
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for rep in range(repeats + 1):  # the first pass warms up
        for n in sizes:
            x = torch.randint(10, vocab, (1, n), generator=g).to(device)
            t0 = time.perf_counter()
            model(x, past_key_values=cache, use_cache=True)
            dt = time.perf_counter() - t0
            crop_cache(cache, context)
            if rep:
                times[n].append(dt)
    return {n: statistics.median(v) for n, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    from ..models import load_model

    p = argparse.ArgumentParser(prog="python -m adaspec.bench.verify_cost",
                                description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--target", default="default")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--context", type=int, default=200)
    p.add_argument("--sizes", default="1,2,3,4,6,8,12,16")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    if not sizes or sizes[0] < 1:
        p.error("--sizes must be positive integers")
    target = load_model(args.target, dtype=args.dtype, role="target")
    med = measure(target.model, sizes, args.context, args.repeats, target.vocab_size)
    base = med[sizes[0]]
    rows = [{"tokens": n, "ms": round(1000 * med[n], 2), "ratio": round(med[n] / base, 3)} for n in sizes]
    if len(sizes) > 1:
        slope = (med[sizes[-1]] - base) / (sizes[-1] - sizes[0])
    else:
        slope = 0.0
    summary = {"target": target.name, "dtype": str(target.dtype), "context": args.context,
               "threads": torch.get_num_threads(), "rows": rows,
               "marginal_per_token_ratio": round(slope / base, 4)}
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"{target.name} ({target.dtype}, {torch.get_num_threads()} threads), cache {args.context}:")
        print("| tokens | ms | x one token |\n|---:|---:|---:|")
        for r in rows:
            print(f"| {r['tokens']} | {r['ms']:.1f} | {r['ratio']:.2f} |")
        print(f"marginal cost per extra token: {summary['marginal_per_token_ratio']:.3f} x one-token forward")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
