"""Command-line interface: a thin layer over the public API.

User mistakes (an :class:`~adaspec.errors.AdaspecError`) print one line to stderr and
exit with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable

from . import __version__
from .errors import AdaspecError, InvalidArgumentError
from .frontend.options import add_model_args, add_suffix_cache_args, persisted_suffix_cache
from .policies import parse_policy_args

# Subcommands that live with their feature: (module, function that registers the parser)
_SUBCOMMANDS: list[tuple[str, str]] = [
    ("adaspec.bench.cli", "add_bench_parser"),
    ("adaspec.train.draft", "add_train_draft_parser"),
    ("adaspec.train.head", "add_train_head_parser"),
    ("adaspec.train.distill", "add_distill_parser"),
    ("adaspec.train.predictor_cli", "add_collect_parser"),
    ("adaspec.train.predictor_cli", "add_train_predictor_parser"),
    ("adaspec.serve.cli", "add_serve_parser"),
]


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="generate text with speculative decoding",
        description="Generate a continuation of PROMPT. Output is token-identical to plain decoding "
                    "of the target under greedy, and distributed exactly like it under sampling.")
    p.add_argument("prompt", help="prompt text ('-' reads standard input)")
    add_model_args(p)
    add_suffix_cache_args(p, persist=True)
    p.set_defaults(draft="auto")
    p.add_argument("--policy", default="auto",
                   help="drafting policy: auto, fixed, heuristic, confidence, entropy, specdecpp, "
                        "context, ldlp, oracle (default auto: context with the predictor trained for "
                        "the pair, or with predictor=online for a pair without one); --draft defaults "
                        "to auto = the default draft plus the n-gram source (model+ngram)")
    p.add_argument("--policy-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="policy argument, repeatable (e.g. --policy-arg k=5)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None, help="RNG seed for sampling")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--stop", action="append", default=[], help="stop string, repeatable")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the target's chat template")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object {text, token_ids, stats} instead of streaming text")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt
    if prompt == "-":
        data = sys.stdin.buffer.read()
        try:
            prompt = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidArgumentError(f"standard input is not UTF-8 text (byte {exc.start})") from None
    gen = build_generator(args)
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop or None,
                  chat=args.chat)
    if args.json:
        result = gen.generate(prompt, **kwargs)
        print(json.dumps({**result.to_dict(), "policy": gen.policy_name, "draft": gen.draft_name,
                          "runtime": gen.runtime_note}))
        return 0
    stream = gen.stream(prompt, **kwargs)
    for chunk in stream:
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")
    s = stream.result.stats
    print(f"[{s.new_tokens} tokens in {s.wall_s:.2f}s, {s.tokens_per_s:.1f} tok/s, tau {s.tau:.2f}, "
          f"acceptance {s.acceptance_rate:.2f}, {s.target_forwards} target / {s.draft_forwards} draft "
          f"forwards, stop: {s.stop_reason}; policy {gen.policy_name}, draft {gen.draft_name}; "
          f"{gen.runtime_note}]", file=sys.stderr)
    return 0


def build_generator(args: argparse.Namespace):
    """The generator for generate / serve options; a default that had to fall back (no
    trained predictor for this pair) is said once, in one line on stderr."""
    import warnings

    from .api import SpeculativeGenerator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gen = SpeculativeGenerator(args.target, None if args.draft == "none" else args.draft,
                                   args.policy, parse_policy_args(args.policy_arg), dtype=args.dtype,
                                   device=args.device, threads=args.threads, runtime=args.runtime,
                                   suffix_cache=persisted_suffix_cache(args))
    if gen.default_note:
        print(f"adaspec: {gen.default_note}", file=sys.stderr)
    return gen


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adaspec",
        description="Lossless speculative decoding with context-aware adaptive drafting.",
        epilog="Run 'adaspec COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"adaspec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_generate_parser(sub)
    for module, func in _SUBCOMMANDS:
        mod = importlib.import_module(module)
        register: Callable[[argparse._SubParsersAction], None] = getattr(mod, func)
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .checkpoints.loader import quiet_transformers

    try:
        with quiet_transformers():  # a command's terminal shows adaspec's output, not transformers' chatter
            return int(args.func(args) or 0)
    except AdaspecError as exc:
        print(f"adaspec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("adaspec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
