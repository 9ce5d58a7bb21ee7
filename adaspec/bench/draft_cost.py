"""Cost of one draft step against one target step, measured in one process.

``python -m adaspec.bench.draft_cost --draft head:default [--draft default] [--context 200]``

For each draft named, times (interleaved, median of ``--repeats``) one target forward of
one new token on a cache of ``--context`` tokens and one draft step of one token on the
same context: a feature head's one-row step on its own estimate (what every drafted
token after the first costs), a draft model's one-token forward. Both run on the
runtime the generator picks (``--runtime``). The ratio is the figure the draft card
reports; absolute times drift with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ..errors import AdaspecError
from ..frontend.options import add_model_args
from ..runtime import set_threads


@torch.inference_mode()
def measure(draft: str, *, context: int = 200, repeats: int = 30, runtime: str = "auto",
            target: object = "default", seed: int = 0) -> dict[str, object]:
    """Median seconds of one target token and one draft token, and their ratio."""
    from ..api import SpeculativeGenerator

    gen = SpeculativeGenerator(target, draft, "fixed", {"k": 1}, runtime=runtime)
    eng, drafter = gen.engine, gen.engine.drafter
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(100, 10000, (context,), generator=g).tolist()
    eng.target.reset()
    drafter.reset()
    hid = eng.target.prefill(ctx, hidden=True)
    head = getattr(drafter, "needs_target_hidden", False)
    if head:
        drafter.observe_target(0, hid)
        sub, f, _ = drafter.core.step(ctx[1:], drafter.feats[: context - 1], 1)
        drafter.cached = context - 1
    else:
        drafter.runner.prefill(ctx)
    tt, td = [], []
    for rep in range(repeats + 1):
        x = int(torch.randint(100, 10000, (1,), generator=g))
        t0 = time.perf_counter()
        eng.target.forward(ctx + [x], 1)
        t1 = time.perf_counter()
        if head:
            drafter.core.step([x], f[None], context)
            drafter.core.crop(context - 1)
        else:
            drafter.runner.forward(ctx + [x], 1)
        t2 = time.perf_counter()
        eng.target.rollback(ctx)
        if not head:
            drafter.runner.rollback(ctx)
        if rep:
            tt.append(t1 - t0)
            td.append(t2 - t1)
    target_s, draft_s = statistics.median(tt), statistics.median(td)
    return {"draft": draft, "runtime": gen.runtime, "context": context, "repeats": repeats,
            "target_ms": round(1e3 * target_s, 3), "draft_ms": round(1e3 * draft_s, 3),
            "ratio": round(draft_s / target_s, 4), "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adaspec.bench.draft_cost",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--draft", action="append", help="draft spec (repeatable; default: head:default)")
    add_model_args(p, ("target", "threads", "runtime"))
    p.add_argument("--context", type=int, default=200)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    if args.threads:
        set_threads(args.threads)
    try:
        rows = [measure(d, context=args.context, repeats=args.repeats, runtime=args.runtime,
                        target=args.target) for d in (args.draft or ["head:default"])]
    except AdaspecError as exc:
        print(f"draft_cost: error: {exc}")
        return 2
    for r in rows:
        print(f"{r['draft']:>24}  target {r['target_ms']:.2f} ms  draft {r['draft_ms']:.3f} ms  "
              f"ratio {100 * r['ratio']:.1f} %  ({r['runtime']}, {r['threads']} threads)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
