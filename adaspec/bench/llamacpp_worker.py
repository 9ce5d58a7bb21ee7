"""The llama.cpp peer engine's child process (``python -m adaspec.bench.llamacpp_worker``).

llama.cpp is C code: when it crashes (e.g. a build with AMX kernels on an AMX Xeon dies
with a segmentation fault in its first decode), it takes its process with it. The
benchmark therefore runs it here, in a child, and talks JSON lines over stdin/stdout:

- on start: ``{"ready": true, "version": ...}`` once the model is loaded, or
  ``{"error": "one line"}`` and exit 1;
- per request ``{"ids": [...], "max_new_tokens": N, "eos": [...]}`` (greedy decoding of
  the prompt ids) the reply ``{"tokens": [...], "wall_s": seconds}``; the wall time is
  that of the generation alone (prompt evaluation included), as for every method.

The protocol uses a duplicate of the original stdout; fd 1 itself is pointed at stderr
so that nothing the C library prints can corrupt it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, TextIO


def _reply(out: TextIO, obj: dict[str, Any]) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()


def _generate(llm: Any, req: dict[str, Any]) -> dict[str, Any]:
    """Greedy decoding of ``req["ids"]`` until an EOS id or ``max_new_tokens``."""
    eos = set(req.get("eos", []))
    limit = int(req["max_new_tokens"])
    new: list[int] = []
    t0 = time.perf_counter()
    for tok in llm.generate(req["ids"], top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        new.append(int(tok))
        if tok in eos or len(new) >= limit:
            break
    return {"tokens": new, "wall_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adaspec.bench.llamacpp_worker")
    # llama.cpp's own parameters (n_ctx, n_threads), set by the parent from its --threads
    p.add_argument("--gguf", required=True)
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--n-threads", type=int, default=2)
    args = p.parse_args(argv)
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        import llama_cpp

        llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=args.n_ctx, n_threads=args.n_threads,
                              n_threads_batch=args.n_threads, verbose=False)
    except Exception as exc:  # any load failure is reported as one line to the parent
        _reply(out, {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]})
        return 1
    _reply(out, {"ready": True, "version": getattr(llama_cpp, "__version__", "?")})
    for line in sys.stdin:
        if line.strip():
            _reply(out, _generate(llm, json.loads(line)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
