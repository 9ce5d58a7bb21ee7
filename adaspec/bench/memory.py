"""Peak resident memory of a generation per runtime, each measured in a fresh process.

``python -m adaspec.bench.memory --runtime compiled [--target default --draft default]``
prints ``{"runtime": ..., "peak_rss_mb": ...}``: a new interpreter loads the pair, runs
one short greedy generation and reports its peak RSS (``VmHWM`` of /proc/self/status;
not ``ru_maxrss``, which Linux carries over from the parent across fork and exec), so
runtimes never share (or hide) each other's memory. The benchmark runs it once per runtime it used and
writes the figures to ``summary.json`` under ``meta.memory``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from typing import Any


def measure_in_subprocess(runtime: str, target: str, draft: str | None, dtype: str = "auto",
                          threads: int | None = None, timeout: float = 600) -> dict[str, Any]:
    """Run this module in a new interpreter; returns its JSON (or ``{"error": ...}``)."""
    cmd = [sys.executable, "-m", "adaspec.bench.memory", "--runtime", runtime, "--target", target,
           "--draft", draft or "none", "--dtype", dtype]
    if threads:
        cmd += ["--threads", str(threads)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"runtime": runtime, "error": f"timed out after {timeout:.0f} s"}
    if p.returncode != 0:
        lines = p.stderr.strip().splitlines()
        return {"runtime": runtime, "error": lines[-1] if lines else f"exit code {p.returncode}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (VmHWM; ru_maxrss where /proc is absent)."""
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    from ..api import SpeculativeGenerator
    from ..frontend.options import add_model_args

    p = argparse.ArgumentParser(prog="python -m adaspec.bench.memory", description=__doc__.split("\n\n")[0])
    add_model_args(p, ("target", "draft", "dtype", "threads", "runtime"))
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    gen = SpeculativeGenerator(args.target, None if args.draft == "none" else args.draft, "fixed",
                               {"k": 3}, dtype=args.dtype, runtime=args.runtime, threads=args.threads)
    gen.generate("def fibonacci(n):", max_new_tokens=args.max_new_tokens)
    peak = peak_rss_mb()
    print(json.dumps({"runtime": gen.runtime, "peak_rss_mb": round(peak, 1), "target": args.target,
                      "draft": args.draft, "max_new_tokens": args.max_new_tokens}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
