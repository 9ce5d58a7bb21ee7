"""A corpus of the target's own greedy continuations, as compact resumable token shards.

``python -m adaspec.train.corpus --out /work/work-data/corpus --minutes 90``

Training data need not be exact (only verification must be): the target runs in bf16 on CPUs
with native bf16 matrix instructions (AMX / AVX-512 BF16; :func:`.corpus_speed.pick_dtype`),
in large batches (:func:`.fastgen.greedy_static`: a KV cache allocated once, rows that reach EOS
leave the batch).

Prompts (:func:`corpus_prompts`), train buckets of the one split rule of :mod:`adaspec.bench.datasets`
only, so no dev / test / evaluation prompt is ever continued:

1. every train prompt of :data:`.draft_data.DEFAULT_SOURCES` (chat sets through the chat
   template, standard-library signature + docstring as raw code), interleaved by
   :data:`.draft_data.SOURCE_WEIGHTS` (about 60 % code);
2. then more states from the same train rows: a chat prompt plus the first third of its
   reference answer (the target continues mid-answer), and the first lines of a
   standard-library function's source (the target continues the code), alternating.

Shards (``DIR/shard-00000.npz``): ``tokens`` uint16 (prompt then continuation, rows
concatenated), ``offsets`` int64 [n + 1], ``prompt_lens`` int32 [n], ``keys`` str [n].
``DIR/progress.json`` counts the prompts done (the prompt list is fixed, so a restart resumes
by count), tokens and wall time; ``DIR/log.txt`` has one line per shard with tokens/s.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..bench.datasets import Prompt, load_dataset
from .draft_data import (
    _BENCH_SET,
    DEFAULT_SOURCES,
    interleave,
    load_prompts,
    prompt_text,
    stdlib_in_split,
)


def _answer_prefix(reference: str, frac: float = 1 / 3) -> str:
    """The first ``frac`` of ``reference``, cut at a whitespace boundary ('' when too short)."""
    ref = reference.strip()
    cut = ref.rfind(" ", 0, int(len(ref) * frac))
    cut = max(cut, ref.rfind("\n", 0, int(len(ref) * frac)))
    return ref[:cut] if cut >= 20 else ""


_SKIP_DIRS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages",
              "dist-packages", "pydoc_data", "__pycache__", "config-3"}


@functools.cache
def stdlib_defs(max_lines: int = 80) -> list[tuple[str, str]]:
    """(qualified name, dedented source) of every function and method defined in the Python
    standard library's own ``.py`` files (parsed with :mod:`ast`, nothing imported), sorted.

    Qualified names are ``module.Class.method`` / ``module.func``; their split follows
    :func:`.draft_data.stdlib_in_split` like the module-level functions of ``train-draft``.
    """
    import ast
    import sysconfig
    import textwrap

    root = Path(sysconfig.get_paths()["stdlib"])
    out: dict[str, str] = {}
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if any(part in _SKIP_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        try:
            text = f.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = text.splitlines()
        stack: list[tuple[ast.AST, str]] = [(tree, module)]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}.{child.name}"
                    stack.append((child, name))
                    n = (child.end_lineno or child.lineno) - child.lineno + 1
                    plain = not isinstance(child, ast.ClassDef) and not child.decorator_list
                    if plain and 4 <= n <= max_lines:
                        src = "\n".join(lines[child.lineno - 1: child.end_lineno])
                        out.setdefault(name, textwrap.dedent(src))
    return sorted(out.items())


def prefix_prompts(data_dir: Path, tokenizer: Any, split: str = "train") -> list[Prompt]:
    """Tier-2 prompts: mid-answer chat states and standard-library source prefixes (raw text).

    Chat: the chat-templated prompt of a ``split`` row of a chat set plus the first third of
    its reference answer. Code: for every ``split`` function or method of the standard
    library (:func:`stdlib_defs`), its first ``max(2, n // 3)`` source lines (n lines; the
    signature and the start of the docstring or body), cut only before a non-blank line.
    """
    per: dict[str, list[Prompt]] = {"chat": [], "code": []}
    for src in ("codegen", "gsm8k", "roleplay", "self_instruct"):
        for p in load_dataset(_BENCH_SET[src], split, root=data_dir):
            head = _answer_prefix(p.reference or "")
            if head:
                text = prompt_text(Prompt(p.id, p.category, p.turns), tokenizer) + head
                per["chat"].append(Prompt(f"mid/{p.id}", p.category, [text], raw=True, source=src))
    for qn, src in stdlib_defs():
        lines = src.splitlines()
        k = max(2, len(lines) // 3)
        if stdlib_in_split(qn, split) and len(lines) > k + 2 and lines[k].strip():
            per["code"].append(Prompt(f"stdpre/{qn}", "code", ["\n".join(lines[:k]) + "\n"], raw=True,
                                      source="stdlib_prefix"))
    return interleave(per)


def corpus_prompts(data_dir: Path, tokenizer: Any, split: str = "train") -> list[Prompt]:
    """The fixed, ordered prompt list of the corpus: tier 1 (every ``split`` prompt of the draft's
    default sources) then tier 2 (:func:`prefix_prompts`). Only ``train`` is ever generated."""
    return load_prompts(list(DEFAULT_SOURCES), data_dir, split) + prefix_prompts(data_dir, tokenizer, split)


@dataclass
class CorpusRow:
    """One corpus row: ``ids`` (prompt then the target's continuation) and the prompt length."""

    key: str
    ids: np.ndarray  # uint16 [n]
    prompt_len: int


class CorpusDir:
    """Shards + ``progress.json`` (prompts done, continuation tokens, shards, seconds) + ``log.txt``."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.dir, self.state_file = path, path / "progress.json"
        self.state = {"prompts": 0, "tokens": 0, "shards": 0, "seconds": 0.0}
        if self.state_file.is_file():
            self.state.update(json.loads(self.state_file.read_text()))

    def write(self, rows: list[CorpusRow], n_prompts: int, seconds: float) -> None:
        """Append one shard of ``rows`` (none: no shard); ``n_prompts`` more prompts are done."""
        if rows:
            offsets = np.cumsum([0] + [len(r.ids) for r in rows]).astype(np.int64)
            name = self.dir / f"shard-{self.state['shards']:05d}.npz"
            tmp = self.dir / f"shard-{self.state['shards']:05d}.tmp.npz"
            np.savez(tmp, tokens=np.concatenate([r.ids for r in rows]).astype(np.uint16), offsets=offsets,
                     prompt_lens=np.array([r.prompt_len for r in rows], dtype=np.int32),
                     keys=np.array([r.key for r in rows]))
            tmp.rename(name)
            self.state["shards"] += 1
            self.state["tokens"] += sum(len(r.ids) - r.prompt_len for r in rows)
        self.state["prompts"] += n_prompts
        self.state["seconds"] = round(self.state["seconds"] + seconds, 1)
        tmp_state = self.state_file.with_suffix(".tmp")
        tmp_state.write_text(json.dumps(self.state))
        tmp_state.rename(self.state_file)

    def log(self, msg: str) -> None:
        with (self.dir / "log.txt").open("a") as f:
            f.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")


def reference_rows(tokenizer: Any, data_dir: Path | None = None, split: str = "train", max_tokens: int = 512,
                   ) -> list[CorpusRow]:
    """Text a teacher pass labels (no generation): the ``split`` rows of the chat sets as chat
    prompt + reference answer + EOS (loss on the answer), and the source of every ``split``
    standard-library function and method (:func:`stdlib_defs`; loss everywhere)."""
    from .draft_data import reference_examples, resolve_data_dir

    root = data_dir if data_dir is not None else resolve_data_dir(None)
    chat = [s for s in DEFAULT_SOURCES if s not in ("stdlib_code", "stdlib_chat")]
    out = [CorpusRow(e.key, np.array((e.prompt + e.response)[:max_tokens], dtype=np.uint16), len(e.prompt))
           for e in reference_examples(chat, root, tokenizer, split) if len(e.prompt) < max_tokens - 8]
    for qn, src in stdlib_defs():
        if stdlib_in_split(qn, split):
            ids = tokenizer.encode(src, add_special_tokens=False)[:max_tokens]
            out.append(CorpusRow(f"ref/stddef/{qn}", np.array(ids, dtype=np.uint16), 0))
    return out


def load_corpus(path: Path) -> list[CorpusRow]:
    """Every row of every shard under ``path`` (and its ``part-*`` directories), in shard order."""
    out: list[CorpusRow] = []
    for f in sorted(path.rglob("shard-[0-9]*.npz")):
        with np.load(f) as z:
            toks, off, plen, keys = z["tokens"], z["offsets"], z["prompt_lens"], z["keys"]
        out.extend(CorpusRow(str(k), toks[off[i]: off[i + 1]], int(plen[i])) for i, k in enumerate(keys))
    return out


def _generate_chunk(model: Any, tokenizer: Any, prompts: list[Prompt], batch_size: int,
                    max_new_tokens: int, max_prompt_tokens: int) -> list[CorpusRow]:
    """Greedy continuations of ``prompts`` (length-sorted batches, left-padded)."""
    from .fastgen import greedy_static

    enc = [(p, tokenizer.encode(prompt_text(p, tokenizer), add_special_tokens=False)) for p in prompts]
    enc = sorted([e for e in enc if 0 < len(e[1]) <= max_prompt_tokens], key=lambda e: len(e[1]))
    rows: list[CorpusRow] = []
    for b in range(0, len(enc), batch_size):
        batch = enc[b: b + batch_size]
        width = max(len(i) for _, i in batch)
        ids = torch.tensor([[0] * (width - len(i)) + i for _, i in batch])
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for _, i in batch])
        out = greedy_static(model, ids, mask, max_new_tokens, tokenizer.eos_token_id)
        for (p, i), resp in zip(batch, out, strict=True):
            rows.append(CorpusRow(p.id, np.array(i + resp, dtype=np.uint16), len(i)))
    return rows


def build(model: Any, tokenizer: Any, prompts: list[Prompt], out: Path, *, minutes: float,
          batch_size: int = 64, chunk: int = 256, max_new_tokens: int = 192, max_prompt_tokens: int = 256,
          progress: bool = True) -> dict[str, Any]:
    """Continue ``prompts`` greedily into shards under ``out`` until done or ``minutes`` pass.

    One shard per ``chunk`` prompts; resumes after the prompts ``progress.json`` counts.
    Returns the final progress state.
    """
    from tqdm import tqdm

    if model.config.vocab_size > 65536:
        raise ValueError(f"vocabulary of {model.config.vocab_size} ids does not fit uint16 shards")
    corpus = CorpusDir(out)
    deadline = time.monotonic() + minutes * 60
    bar = tqdm(total=len(prompts), initial=corpus.state["prompts"], unit="prompt", desc="corpus",
               disable=not progress)
    while corpus.state["prompts"] < len(prompts) and time.monotonic() < deadline:
        start = corpus.state["prompts"]
        group = prompts[start: start + chunk]
        t0, c0 = time.monotonic(), time.process_time()
        rows = _generate_chunk(model, tokenizer, group, batch_size, max_new_tokens, max_prompt_tokens)
        dt, cpu = time.monotonic() - t0, time.process_time() - c0
        corpus.write(rows, len(group), dt)
        n_new = sum(len(r.ids) - r.prompt_len for r in rows)
        s = corpus.state
        rate = s["tokens"] / max(s["seconds"], 1e-9)
        corpus.log(f"{s['prompts']}/{len(prompts)} prompts, {s['tokens']} continuation tokens, "
                   f"this shard {n_new / max(dt, 1e-9):.0f} tok/s "
                   f"({n_new / max(cpu, 1e-9):.0f} per CPU-second; wall time includes pauses), "
                   f"overall {rate:.0f} tok/s")
        bar.update(len(group))
        bar.set_postfix(tokens=s["tokens"])
    bar.close()
    return corpus.state


def _part(text: str) -> tuple[int, int]:
    """``--part`` value ``"I/N"`` -> ``(I, N)`` with ``0 <= I < N`` (argparse reports anything else)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like I/N (e.g. 0/2), got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"{text}: need 0 <= I < N")
    return i, n


def main(argv: list[str] | None = None) -> int:
    """CLI: build or extend a corpus (see the module docstring)."""
    from ..checkpoints.loader import load_model
    from ..frontend.options import add_model_args
    from ..runtime import set_threads
    from .corpus_speed import pick_dtype
    from .draft_data import resolve_data_dir

    p = argparse.ArgumentParser(prog="python -m adaspec.train.corpus", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="shard directory (outside the repository)")
    add_model_args(p, ("target", "dtype", "threads"), threads="torch CPU threads (default 2)",
                   dtype="auto (default: bf16 with native bf16 matmuls, else fp32) | fp32 | bf16 | fp16")
    p.set_defaults(threads=2)
    p.add_argument("--data-dir", default=None, help="prompt data (default $ADASPEC_DATA or ../shared/data)")
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunk", type=int, default=256, help="prompts per shard")
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--max-prompt-tokens", type=int, default=256)
    p.add_argument("--part", type=_part, default=None, metavar="I/N",
                   help="one of N processes (1 thread each uses 2 cores without thread barriers): takes "
                        "every N-th prompt, from I, of those OUT itself has not done, into OUT/part-I-of-N")
    args = p.parse_args(argv)
    set_threads(args.threads)
    dtype = pick_dtype() if args.dtype == "auto" else args.dtype
    target = load_model(args.target, dtype=dtype)
    prompts = corpus_prompts(resolve_data_dir(args.data_dir), target.tokenizer, "train")
    out = Path(args.out)
    if args.part:
        i, n = args.part
        prompts = prompts[CorpusDir(out).state["prompts"]:][i::n]
        out = out / f"part-{i}-of-{n}"
    corpus = CorpusDir(out)
    corpus.log(f"start: {len(prompts)} prompts, dtype {target.dtype}, batch {args.batch_size}, "
               f"threads {args.threads}")
    state = build(target.model, target.tokenizer, prompts, out, minutes=args.minutes,
                  batch_size=args.batch_size, chunk=args.chunk, max_new_tokens=args.max_new_tokens,
                  max_prompt_tokens=args.max_prompt_tokens)
    print(json.dumps(state))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
