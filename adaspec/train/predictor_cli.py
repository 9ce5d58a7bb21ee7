"""CLI subcommands ``adaspec collect`` and ``adaspec train-predictor`` (wired in by adaspec.cli)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import InvalidArgumentError
from ..frontend.options import add_model_args


def _prompts(gen, args: argparse.Namespace) -> tuple[list[list[int]], str]:
    """Token ids of the prompts named by --dataset (NAME[:SPLIT], repeatable) / --prompts FILE."""
    from ..bench.datasets import default_chat, load_dataset

    out: list[list[int]] = []
    names = []
    for spec in args.dataset or []:
        name, _, split = spec.partition(":") if not spec.startswith("jsonl:") else (spec, "", "all")
        split = split or "train"
        if split == "test":
            raise InvalidArgumentError("collect refuses the test split: predictors must never see it")
        rows = load_dataset(name, split)[: args.limit or None]
        for row in rows:
            chat = default_chat(name) and not row.raw
            out.append(gen.encode(row.turns[0], chat=chat))
        names.append(f"{name}:{split}[{len(rows)}]")
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise InvalidArgumentError(f"--prompts file {path} does not exist")
        try:
            lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except UnicodeDecodeError as exc:
            raise InvalidArgumentError(f"--prompts file {path} is not UTF-8 (byte {exc.start})") from None
        for no, ln in enumerate(lines[: args.limit or None], 1):
            try:
                text = json.loads(ln)["prompt"] if ln.lstrip().startswith("{") else ln
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InvalidArgumentError(f"{path}: prompt {no} is not a JSON object with 'prompt'") \
                    from None
            out.append(gen.encode(text, chat=args.chat))
        names.append(f"file:{path.name}")
    if not out:
        raise InvalidArgumentError("collect needs prompts: --dataset NAME[:SPLIT] and/or --prompts FILE")
    return out, ",".join(names)


def run_collect(args: argparse.Namespace) -> int:
    from ..api import SpeculativeGenerator
    from .traces import collect

    gen = SpeculativeGenerator(args.target, args.draft, "fixed", dtype=args.dtype, device=args.device,
                               threads=args.threads)
    if gen.draft is None:
        raise InvalidArgumentError("collect needs a draft model (--draft)")
    prompts, source = _prompts(gen, args)
    kw = dict(k=args.k, max_new_tokens=args.max_new_tokens, shard_size=args.shard_size,
              attention=args.attention, source=source, progress=not args.quiet, runtime=args.runtime,
              replay=args.replay, batch_size=args.batch_size)
    if args.replay and gen.head is not None:
        raise InvalidArgumentError("collect --replay teacher-forces a draft model; a feature head drafts "
                                   "from the target's features: collect without --replay")
    if args.replay and args.runtime == "compiled":
        raise InvalidArgumentError("collect --replay runs teacher-forced batched passes of the HF "
                                   "modules; use --runtime auto or eager with it")
    try:
        meta = collect(gen.target, gen.draft, prompts, Path(args.out), **kw)
    except KeyboardInterrupt:
        print(f"adaspec: interrupted; finished shards are kept in {args.out}: rerun the same command to "
              "resume", file=sys.stderr)
        return 130
    tokens = sum(s["tokens"] for s in meta["shards"])
    rounds = sum(s["rounds"] for s in meta["shards"])
    print(f"wrote {len(meta['shards'])} shards, {rounds} rounds, {tokens} drafted tokens to {args.out}")
    return 0


def add_collect_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("collect", help="record verification traces for predictor training",
                       description="Run speculative decoding with a fixed draft length over a prompt set "
                                   "and write per-token features and labels (see adaspec.train.traces).")
    add_model_args(p)
    p.add_argument("--dataset", action="append", default=[], metavar="NAME[:SPLIT]",
                   help="bench dataset and split (default split train; test is refused), repeatable")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line (or JSONL with 'prompt')")
    p.add_argument("--chat", action="store_true", help="chat-template the --prompts lines")
    p.add_argument("--limit", type=int, default=0, help="max prompts per source (0 = all)")
    p.add_argument("--k", type=int, default=8, help="draft length while recording (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--shard-size", type=int, default=16, help="prompts per shard (resume granularity)")
    p.add_argument("--attention", action="store_true",
                   help="also record the draft's last-layer attention concentration (slower drafting)")
    p.add_argument("--replay", action="store_true",
                   help="greedy traces by replaying fixed-K rounds over the target's batched greedy "
                        "continuations (no engine run; records tried positions only; ~10x cheaper)")
    p.add_argument("--batch-size", type=int, default=16, help="--replay: prompts per batched generation")
    p.add_argument("--out", required=True, help="trace directory (resumed if it exists)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_collect)


def run_train(args: argparse.Namespace) -> int:
    from ..runtime import set_threads
    from .predictor import train_predictor

    if args.threads:
        set_threads(args.threads)
    pred = train_predictor(Path(args.traces), args.kind, Path(args.out), epochs=args.epochs, lr=args.lr,
                           batch=args.batch, patience=args.patience, rejection_weight=args.rejection_weight,
                           calibrate=args.calibrate, width=args.width, seed=args.seed,
                           weight_decay=args.weight_decay,
                           eval_traces=Path(args.eval_traces) if args.eval_traces else None)
    m = pred.meta["metrics"]
    summary = m.get("calibrated") or m.get("raw") or {k: v for k, v in m.items() if k != "fit"}
    print(f"wrote {args.kind} predictor to {args.out}: {json.dumps(summary)}")
    held = m.get("heldout")
    if held:
        print(f"held-out traces {held['traces']}: AUC {held['auc']:.3f}, ECE {held['ece']:.3f}, "
              f"Brier {held['brier']:.3f} over {held['n']} tokens")
        for name, r in (held.get("by_source") or {}).items():
            print(f"  {name}: AUC {r['auc']:.3f}, ECE {r['ece']:.3f} ({r['n']} tokens)")
    return 0


def add_train_predictor_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-predictor", help="fit a drafting predictor on traces",
                       description="Fit a specdecpp / context acceptance head or an ldlp length head on "
                                   "traces from `adaspec collect`; writes model.safetensors, "
                                   "predictor.json and a calibration report.")
    p.add_argument("--kind", required=True, choices=["specdecpp", "context", "ldlp"])
    p.add_argument("--traces", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--rejection-weight", type=float, default=None,
                   help="BCE weight of rejected tokens (default 6 for specdecpp, 1 for context)")
    p.add_argument("--calibrate", choices=["platt", "none"], default=None,
                   help="Platt scaling fitted on the dev split (default none: with a few thousand dev "
                        "tokens it did not lower the ECE)")
    p.add_argument("--width", type=int, default=0,
                   help="hidden width (0 = kind default: specdecpp d, context 8, ldlp 32)")
    p.add_argument("--weight-decay", type=float, default=0.5,
                   help="AdamW weight decay (default 0.5: the heads overfit the d-dim hidden state)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-traces", default=None,
                   help="also report AUC / ECE on this trace directory (e.g. `collect` on the dev "
                        "buckets: prompts the training traces never held), overall and per source")
    add_model_args(p, ("threads",))
    p.set_defaults(func=run_train)
