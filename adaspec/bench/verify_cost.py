"""Verify cost as a function of the number of tokens (tree size) on this machine.

``python -m adaspec.bench.verify_cost [--runtime compiled,compiled-fp32,eager] [--context 200] [--json OUT]``

Times one target forward of ``n`` new tokens (a chain; a token tree of ``n`` nodes costs
the same matmuls plus a mask) on a cache of ``--context`` tokens, for n in ``--sizes``
and for every runtime named, all in one process, interleaving runtimes and sizes within
each repeat (the machine is shared and noisy), and reports the median, the ratio to one
token and the marginal cost per extra token. On GPUs the curve is flat for small n; on
CPUs the eager (BLAS) path is not, which is why the compiled runtime exists and why
``context``'s tree rule and online threshold use the measured slope.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from ..errors import AdaspecError, InvalidArgumentError


@torch.inference_mode()
def measure(model: torch.nn.Module, sizes: list[int], context: int = 200, repeats: int = 7,
            vocab: int = 1000, seed: int = 0, runtimes: tuple[str, ...] = ("eager",)
            ) -> dict[str, dict[int, float]]:
    """Median seconds of a forward of ``n`` new tokens after ``context`` cached ones,
    per runtime and n (runners of :mod:`adaspec.runtime`, measured interleaved)."""
    from ..runtime import make_runner

    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(10, vocab, (context,), generator=g).tolist()
    runners = {rt: make_runner(model, rt) for rt in runtimes}
    for r in runners.values():
        r.reset()
        r.prefill(ctx)
    times: dict[str, dict[int, list[float]]] = {rt: {n: [] for n in sizes} for rt in runtimes}
    for rep in range(repeats + 1):  # the first pass warms up
        for rt, runner in runners.items():
            # one untimed forward first: the other runtime's thread pool may still be spinning
            runner.forward(ctx + [11], 1)
            runner.rollback(ctx)
            for n in sizes:
                x = torch.randint(10, vocab, (n,), generator=g).tolist()
                t0 = time.perf_counter()
                runner.forward(ctx + x, n)
                dt = time.perf_counter() - t0
                runner.rollback(ctx)
                if rep:
                    times[rt][n].append(dt)
    return {rt: {n: statistics.median(v) for n, v in per.items()} for rt, per in times.items()}


def machine() -> dict[str, object]:
    """CPU model, core count, torch threads and versions of this measurement."""
    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "simd": simd, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    from ..checkpoints.loader import load_model
    from ..frontend.options import add_model_args
    from ..runtime import RUNTIMES, resolve_runtime

    p = argparse.ArgumentParser(prog="python -m adaspec.bench.verify_cost",
                                description=(__doc__ or "").split("\n\n")[0])
    add_model_args(p, ("target", "dtype", "threads"))
    p.add_argument("--runtime", default="compiled,compiled-fp32,eager",
                   help="comma list of runtimes to compare in one process (default: all three)")
    p.add_argument("--context", type=int, default=200)
    p.add_argument("--sizes", default="1,2,3,4,6,8,12,16")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="OUT",
                   help="write JSON ({'runtimes': {rt: {n: ms}}, 'machine': ...}) to OUT (- = stdout)")
    args = p.parse_args(argv)
    try:
        if args.threads:
            from ..runtime import set_threads

            set_threads(args.threads)
        sizes = sorted({int(s) for s in args.sizes.split(",")})
        if not sizes or sizes[0] < 1:
            raise InvalidArgumentError("--sizes must be positive integers")
        names = [r.strip() for r in args.runtime.split(",") if r.strip()]
        if not names or any(r not in RUNTIMES for r in names):
            raise InvalidArgumentError(f"--runtime takes a comma list of {', '.join(RUNTIMES)}")
        load_rt = next((r for r in ("compiled", "auto", "compiled-fp32") if r in names), "eager")
        target = load_model(args.target, dtype=args.dtype, role="target", runtime=load_rt)
        runtimes = tuple(dict.fromkeys(resolve_runtime(name, target.model)[0] for name in names))
        med = measure(target.model, sizes, args.context, args.repeats, target.vocab_size, runtimes=runtimes)
    except AdaspecError as exc:
        print(f"verify_cost: error: {exc}")
        return 2
    result = {"target": target.name, "dtype": str(target.dtype).removeprefix("torch."),
              "context": args.context, "repeats": args.repeats, "machine": machine(),
              "runtimes": {rt: {str(n): round(1000 * v, 3) for n, v in per.items()}
                           for rt, per in med.items()},
              "ratio_to_one_token": {rt: {str(n): round(v / per[sizes[0]], 3) for n, v in per.items()}
                                     for rt, per in med.items()}}
    for other in ("eager", "compiled-fp32"):
        if other in med and "compiled" in med:
            result[f"compiled_over_{other.replace('-', '_')}"] = {
                str(n): round(med["compiled"][n] / med[other][n], 3) for n in sizes}
    if "compiled" in med:
        from ..runtime.qkernels import wide_default

        result["kernels"] = "512-bit (AVX-512F)" if wide_default() else "256-bit (AVX2)"
    if args.json:
        text = json.dumps(result, indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(text + "\n")
    if args.json != "-":
        print(f"{target.name} ({result['dtype']}, {torch.get_num_threads()} threads), cache {args.context}, "
              f"median of {args.repeats}:")
        print("| runtime | " + " | ".join(f"{n} tok" for n in sizes) + " |")
        print("|---|" + "---:|" * len(sizes))
        for rt, per in med.items():
            print(f"| {rt} ms | " + " | ".join(f"{1000 * per[n]:.1f}" for n in sizes) + " |")
            print(f"| {rt} x 1 tok | " + " | ".join(f"{per[n] / per[sizes[0]]:.2f}" for n in sizes) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
