"""``adaspec serve``: run the OpenAI-compatible server (needs the ``[serve]`` extra).

Imports of the web stack are deferred to :func:`run_serve`, so ``adaspec --help`` works
without it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from ..errors import AdaspecError


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    from ..cli_args import add_model_args, add_suffix_cache_args

    p = subparsers.add_parser(
        "serve", help="serve the target through an OpenAI-compatible HTTP API",
        description="Serve POST /v1/completions and /v1/chat/completions (streaming or not), "
                    "GET /v1/models, /health and /metrics. One sequence at a time; output is the "
                    "target's own (lossless speculative decoding). A request may override the policy "
                    'with {"adaspec": {"policy": NAME, "policy_args": {...}}}.')
    add_model_args(p)
    add_suffix_cache_args(p)  # one cache per served model, shared by every request
    p.set_defaults(draft="auto")
    p.add_argument("--policy", default="auto",
                   help="default drafting policy (default auto: context over the default draft plus "
                        "the n-gram source, see `adaspec generate --help`)")
    p.add_argument("--policy-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="default policy argument, repeatable (e.g. --policy-arg k=5)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait behind the running one; more get 429 (default 16)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the --target value)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run_serve)
    return p


def run_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import create_app
    except ModuleNotFoundError as exc:
        raise AdaspecError(f"adaspec serve needs the web stack ({exc.name} is missing): "
                           "pip install 'adaspec[serve]'") from None
    from ..cli import build_generator

    gen = build_generator(args)
    app = create_app(gen, model_name=args.served_model_name or args.target, max_queue=args.max_queue,
                     runtime=args.runtime)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    print(f"adaspec: serving {args.served_model_name or args.target!r} (policy {gen.policy_name}, "
          f"draft {gen.draft_name}; "
          f"{gen.runtime_note}) on http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
