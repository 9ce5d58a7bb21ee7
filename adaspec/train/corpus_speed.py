"""How fast can this CPU make training data? ``python -m adaspec.train.corpus_speed``

Measures, for the target in fp32 and in bf16 (AMX / AVX-512 BF16 where present, emulated
elsewhere), the tokens/s of

* **generation**: batched greedy decoding with a KV cache (B rows, one new token per row
  per forward, after a short prefill): ``B * steps / time``;
* **teacher-forced passes**: one forward over ``[B, T]`` tokens returning the last hidden
  states (the features a head or a distilled draft learns from): ``B * T / time``.

Each cell runs a warm-up forward then times a few forwards; the table is Markdown.
:func:`pick_dtype` is the rule the corpus job uses: bf16 where the CPU has native bf16
matrix instructions, fp32 otherwise.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from ..checkpoints.loader import cpu_has_fast_bf16

#: the clock the cells are timed with: wall time, or this process's CPU time (threads summed),
#: which a machine shared with other jobs distorts far less (``--clock cpu``)
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def pick_dtype() -> torch.dtype:
    """bf16 on CPUs with native bf16 matmuls (AMX / AVX-512 BF16), else fp32 (bf16 is emulated
    and slower than fp32 on AVX2-only CPUs)."""
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


@torch.inference_mode()
def generation_speed(model: Any, batch: int, steps: int = 8, prompt_len: int = 32) -> float:
    """Tokens/s of batched greedy decoding: ``batch`` rows, ``steps`` timed one-token forwards
    after a ``prompt_len`` prefill (random ids) and one warm-up step."""
    from transformers import DynamicCache

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, prompt_len))
    cache = DynamicCache()
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    nxt = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
    logits = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits  # warm-up
    t0 = _clock()
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        logits = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits
    return batch * steps / (_clock() - t0)


@torch.inference_mode()
def feature_speed(model: Any, batch: int, seq: int = 128, reps: int = 2) -> float:
    """Tokens/s of teacher-forced passes: ``[batch, seq]`` tokens -> last hidden states."""
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    model.model(input_ids=ids)  # warm-up
    t0 = _clock()
    for _ in range(reps):
        model.model(input_ids=ids)
    return batch * seq * reps / (_clock() - t0)


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    """Print the Markdown table (rows: batch; columns: generation and features, fp32 / bf16)."""
    from ..checkpoints.loader import load_model
    from ..frontend.options import add_model_args
    from ..runtime import set_threads

    p = argparse.ArgumentParser(prog="python -m adaspec.train.corpus_speed",
                                description=__doc__.split("\n\n")[0])
    add_model_args(p, ("target", "threads"), threads="torch CPU threads (default 2)")
    p.set_defaults(threads=2)
    p.add_argument("--batches", default="1,4,16,64,256")
    p.add_argument("--feature-batches", default="1,4,16,64",
                   help="rows of 128 tokens per teacher-forced pass")
    p.add_argument("--steps", type=int, default=8, help="timed decode steps per generation cell")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                   help="cpu: tokens per CPU-second of this process (robust on a shared machine)")
    args = p.parse_args(argv)
    global _clock
    _clock = CLOCKS[args.clock]
    set_threads(args.threads)
    target = load_model(args.target, dtype="float32")
    models = {"fp32": target.model}
    models["bf16"] = load_model(args.target, dtype="bf16").model
    print(f"{_cpu_name()}; native bf16: {cpu_has_fast_bf16()}; threads {args.threads}; "
          f"corpus dtype here: {pick_dtype()}; clock {args.clock}\n", flush=True)
    print("| batch | gen fp32 tok/s | gen bf16 tok/s | features fp32 tok/s | features bf16 tok/s |")
    print("|---:|---:|---:|---:|---:|")
    gen_b = [int(b) for b in args.batches.split(",")]
    feat_b = [int(b) for b in args.feature_batches.split(",")]
    for b in sorted(set(gen_b) | set(feat_b)):
        cells = []
        for kind, sizes in (("gen", gen_b), ("feat", feat_b)):
            for name in ("fp32", "bf16"):
                if b not in sizes:
                    cells.append("")
                    continue
                fn = generation_speed if kind == "gen" else feature_speed
                kw = {"steps": args.steps} if kind == "gen" else {}
                cells.append(f"{fn(models[name], b, **kw):,.0f}")
        print(f"| {b} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
