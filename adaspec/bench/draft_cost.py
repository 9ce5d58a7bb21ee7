"""Cost of one draft step against one target step, measured in one process.

``python -m adaspec.bench.draft_cost --draft head:default [--draft default] [--context 200]``

For each draft named, times (interleaved, median of ``--repeats``) one target forward of
one new token on a cache of ``--context`` tokens and one draft step of one token on the
same context: a feature head's one-row step on its own estimate (what every drafted
token after the first costs), a draft model's one-token forward. Both run on the
runtime the generator picks (``--runtime``). The ratio is the figure the draft card
reports; absolute times drift with the machine's load.

``--steps`` times whole draft steps instead: a round of ``--k`` tokens through the
drafter's ``propose`` (forward, argmax, the step object and the policy's per-token
decision: ``--policy fixed`` decides nothing, ``--policy context`` computes the default
policy's prediction for every token), per token. ``--baseline DIR`` imports another
checkout's ``adaspec`` package (DIR/adaspec, e.g. an exported older commit) beside this
one and times both, interleaved, in this one process: the ratio is this tree's draft step
over the baseline's.
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


def import_baseline(root: str, name: str = "adaspec_baseline"):
    """The ``adaspec`` package of another checkout (``root``/adaspec), imported as ``name``."""
    import importlib.util
    import sys

    pkg = Path(root) / "adaspec"
    if not (pkg / "__init__.py").is_file():
        raise AdaspecError(f"--baseline {root}: no adaspec package there")
    spec = importlib.util.spec_from_file_location(name, pkg / "__init__.py",
                                                  submodule_search_locations=[str(pkg)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


class _StepRig:
    """One package's drafter, prefilled with a context, and a policy hook: :meth:`round`
    drafts ``k`` tokens through ``propose`` and rolls back."""

    def __init__(self, pkg: str, draft: str, policy: str, ctx: list[int], runtime: str, target: object):
        import importlib

        api = importlib.import_module(f"{pkg}.api")
        self.types = importlib.import_module(f"{pkg}.types")
        self.sampling = importlib.import_module(f"{pkg}.sampling")
        gen = api.SpeculativeGenerator(target, draft, "fixed", {"k": 1}, runtime=runtime)
        self.runtime, self.drafter, self.ctx = gen.runtime, gen.engine.drafter, ctx
        pol = importlib.import_module(f"{pkg}.policies").make_policy(policy, {})
        cont = self.types.Action.CONTINUE
        if policy == "fixed":
            self.decide = lambda step: cont
        else:  # pay for the policy's decision on every token, but draft all k of them
            def decide(step):
                pol.decide(step)
                return cont
            self.decide = decide
        self.pol, self.needs = pol, pol.needs
        self.drafter.reset()
        self.drafter.prefill(ctx[:-1])

    def round(self, k: int) -> float:
        """Seconds of one k-token draft round."""
        if hasattr(self.pol, "_prod"):
            self.pol._prod = 1.0
        drafter, ctx, decide, needs = self.drafter, self.ctx, self.decide, self.needs
        t = time.perf_counter()
        if hasattr(self.types, "DraftRequest"):
            d = drafter.propose(ctx, self.types.DraftRequest(k, decide=decide, needs=needs))
        else:  # the seven-parameter contract of older checkouts
            d = drafter.propose(ctx, k, decide, self.sampling.SamplingConfig(), None, needs)
        dt = time.perf_counter() - t
        assert len(d.tokens) == k, len(d.tokens)
        self.drafter.rollback(self.ctx)
        return dt


def measure_steps(draft: str, *, baseline: str | None = None, policy: str = "fixed", k: int = 8,
                  context: int = 200, repeats: int = 30, runtime: str = "auto", target: object = "default",
                  seed: int = 0) -> dict[str, object]:
    """Median seconds per drafted token of a ``k``-token propose round, for this tree and
    (interleaved, same context) the ``baseline`` checkout's package."""
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(100, 10000, (context,), generator=g).tolist()
    rigs = {"this": _StepRig("adaspec", draft, policy, ctx, runtime, target)}
    if baseline:
        rigs["baseline"] = _StepRig(import_baseline(baseline).__name__, draft, policy, ctx, runtime, target)
    times: dict[str, list[float]] = {name: [] for name in rigs}
    with torch.inference_mode():  # as the engine drafts (the rigs, policies included, are built outside)
        for rep in range(repeats + 2):
            for name, rig in (rigs.items() if rep % 2 else reversed(list(rigs.items()))):
                dt = rig.round(k)
                if rep >= 2:
                    times[name].append(dt / k)
    row: dict[str, object] = {"draft": draft, "policy": policy, "k": k, "runtime": rigs["this"].runtime,
                              "context": context, "repeats": repeats, "threads": torch.get_num_threads()}
    for name, ts in times.items():
        row[f"{name}_step_ms"] = round(1e3 * statistics.median(ts), 4)
    if baseline:
        row["ratio"] = round(row["this_step_ms"] / row["baseline_step_ms"], 4)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adaspec.bench.draft_cost",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--draft", action="append", help="draft spec (repeatable; default: head:default)")
    add_model_args(p, ("target", "threads", "runtime"))
    p.add_argument("--context", type=int, default=200)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--steps", action="store_true", help="time whole draft steps (propose), per token")
    p.add_argument("--policy", default="fixed", choices=("fixed", "context"),
                   help="with --steps: the per-token decision paid (default fixed: none)")
    p.add_argument("--k", type=int, default=8, help="with --steps: tokens per draft round (default 8)")
    p.add_argument("--baseline", help="with --steps: also time this checkout's adaspec (DIR/adaspec)")
    args = p.parse_args(argv)
    if args.threads:
        set_threads(args.threads)
    drafts = args.draft or ["head:default"]
    try:
        if args.steps:
            rows = [measure_steps(d, baseline=args.baseline, policy=args.policy, k=args.k,
                                  context=args.context, repeats=args.repeats, runtime=args.runtime,
                                  target=args.target) for d in drafts]
        else:
            rows = [measure(d, context=args.context, repeats=args.repeats, runtime=args.runtime,
                            target=args.target) for d in drafts]
    except AdaspecError as exc:
        print(f"draft_cost: error: {exc}")
        return 2
    if args.steps:
        for r in rows:
            base = (f"  baseline {r['baseline_step_ms']:.4f} ms  ratio {r['ratio']:.3f}x"
                    if "ratio" in r else "")
            print(f"{r['draft']:>24}  policy {r['policy']}  step {r['this_step_ms']:.4f} ms/token{base}  "
                  f"({r['runtime']}, {r['threads']} threads, k {r['k']}, context {r['context']})")
    for r in rows if not args.steps else []:
        print(f"{r['draft']:>24}  target {r['target_ms']:.2f} ms  draft {r['draft_ms']:.3f} ms  "
              f"ratio {100 * r['ratio']:.1f} %  ({r['runtime']}, {r['threads']} threads)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
