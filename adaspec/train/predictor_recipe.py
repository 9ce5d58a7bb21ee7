"""The shipped predictors' recipe as one re-runnable command (retrain after a new draft).

``python -m adaspec.train.predictor_recipe --draft default --out adaspec/assets/predictors``
runs, and prints before each step, the exact ``adaspec`` commands:

1. ``collect --replay`` on the train buckets of every source set (``SOURCES``, at most
   ``--limit`` prompts each): greedy traces, resumable (rerun to continue);
2. ``collect --replay`` on their dev buckets (``--dev-limit`` each): held-out traces;
3. ``train-predictor`` for ``context`` and ``specdecpp`` (Platt-calibrated, reported on the
   held-out traces, overall and per source) and ``ldlp``.

Every step resumes or overwrites, so an interrupted run is finished by running it again.
"""

from __future__ import annotations

import argparse
import shlex

SOURCES = ("humaneval", "code_alpaca", "gpteacher_codegen", "gpteacher_roleplay", "gsm8k",
           "self_instruct_seed", "copy")


def commands(draft: str, traces: str, dev_traces: str, out: str, limit: int, dev_limit: int,
             threads: int) -> list[list[str]]:
    """The recipe's ``adaspec`` argument lists, in order."""
    collect = ["collect", "--draft", draft, "--threads", str(threads), "--k", "10", "--attention", "--replay",
               "--batch-size", "16", "--max-new-tokens", "128"]
    steps = [collect + ["--limit", str(limit), "--shard-size", "16",
                        *[a for s in SOURCES for a in ("--dataset", f"{s}:train")], "--out", traces],
             collect + ["--limit", str(dev_limit), "--shard-size", "8",
                        *[a for s in SOURCES for a in ("--dataset", f"{s}:dev")], "--out", dev_traces]]
    for kind in ("context", "specdecpp"):
        steps.append(["train-predictor", "--kind", kind, "--calibrate", "platt", "--traces", traces,
                      "--eval-traces", dev_traces, "--threads", str(threads), "--out", f"{out}/{kind}"])
    steps.append(["train-predictor", "--kind", "ldlp", "--traces", traces, "--threads", str(threads),
                  "--out", f"{out}/ldlp"])
    return steps


def main(argv: list[str] | None = None) -> int:
    from .. import cli
    from ..frontend.options import add_model_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, ("draft", "threads"), threads="torch CPU threads of every step (default 2)")
    ap.set_defaults(threads=2)
    ap.add_argument("--traces", default="runs/pred/traces-all")
    ap.add_argument("--dev-traces", default="runs/pred/traces-dev")
    ap.add_argument("--out", default="adaspec/assets/predictors")
    ap.add_argument("--limit", type=int, default=64, help="train prompts per source (default 64)")
    ap.add_argument("--dev-limit", type=int, default=8, help="dev prompts per source (default 8)")
    ap.add_argument("--skip-collect", action="store_true", help="train on the traces already collected")
    args = ap.parse_args(argv)
    steps = commands(args.draft, args.traces, args.dev_traces, args.out, args.limit, args.dev_limit,
                     args.threads)
    for step in steps[2:] if args.skip_collect else steps:
        print("$ adaspec " + shlex.join(step), flush=True)
        code = cli.main(step)
        if code:
            return code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
