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
    from ..frontend.options import add_model_args, add_suffix_cache_args

    p = subparsers.add_parser(
        "serve", help="serve the target through an OpenAI-compatible HTTP API",
        description="Serve POST /v1/completions and /v1/chat/completions (streaming or not), "
                    "GET /v1/models, /health and /metrics. Up to --max-batch sequences share each "
                    "target forward (continuous batching); output is the target's own (lossless "
                    "speculative decoding), identical alone or in a batch. A request may override the "
                    'policy with {"adaspec": {"policy": NAME, "policy_args": {...}}}.')
    add_model_args(p)
    add_suffix_cache_args(p, persist=True)  # one cache per served model, shared by every request
    p.set_defaults(draft="auto")
    p.add_argument("--policy", default="auto",
                   help="default drafting policy (default auto: context over the default draft plus "
                        "the n-gram source, see `adaspec generate --help`)")
    p.add_argument("--policy-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="default policy argument, repeatable (e.g. --policy-arg k=5)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait for a batch slot; more get 429 (default 16)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="sequences generated together, one target forward per step (default 8)")
    p.add_argument("--batch-budget", choices=["on", "off"], default="on",
                   help="cap adaptive policies' draft lengths by the batch-level budget (expected "
                        "accepted tokens per measured cost of extra rows; default on); 'fixed' "
                        "policies always keep their K")
    p.add_argument("--prefill-chunk", type=int, default=64, metavar="ROWS",
                   help="prompt rows fed per step while other requests are generating (chunked "
                        "prefill: their tokens keep coming while a long prompt is read; default 64)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $ADASPEC_API_KEY, else none)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="request body limit; larger bodies get 413 (default 1 MiB)")
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
    import os

    from ..cli import build_generator
    from ..errors import InvalidArgumentError

    for name in ("max_queue", "max_batch", "max_body_bytes", "prefill_chunk"):
        low = 0 if name == "max_queue" else 1
        value = getattr(args, name)
        if value < low:
            raise InvalidArgumentError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    api_key = args.api_key or os.environ.get("ADASPEC_API_KEY") or None

    gen = build_generator(args)
    app = create_app(gen, model_name=args.served_model_name or args.target, max_queue=args.max_queue,
                     runtime=args.runtime, max_batch=args.max_batch, api_key=api_key,
                     max_body=args.max_body_bytes, batch_budget=args.batch_budget == "on",
                     prefill_chunk=args.prefill_chunk, engine_thread=False)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    print(f"adaspec: serving {args.served_model_name or args.target!r} (policy {gen.policy_name}, "
          f"draft {gen.draft_name}; {gen.runtime_note}; batch <= {args.max_batch}"
          f"{'; API key required' if api_key else ''}) on http://{args.host}:{args.port}/v1", file=sys.stderr)
    _serve_on_main_thread(app, uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                                             log_level=args.log_level)))
    return 0


def _serve_on_main_thread(app: Any, server: Any) -> None:
    """HTTP (uvicorn) in a thread, the engine loop on the main thread: the compiled kernels'
    OpenMP teams run a forward ~3x slower when launched from a thread other than the one
    that loaded the models. SIGINT / SIGTERM stop uvicorn gracefully (its shutdown stops the
    engine loop); the loop also ends if the HTTP thread dies."""
    import signal
    import threading

    scheduler = app.state.server.scheduler
    web = threading.Thread(target=server.run, name="adaspec-http", daemon=True)

    def stop(*_: Any) -> None:
        server.should_exit = True

    def watch() -> None:
        web.join()
        scheduler.shutdown()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    web.start()
    threading.Thread(target=watch, name="adaspec-http-watch", daemon=True).start()
    try:
        scheduler.run()
    finally:
        stop()
        web.join(10)
