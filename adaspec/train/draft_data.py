"""Prompts and self-distillation data for draft training.

Prompt sources (read in place, never copied into the repository):

| name                | where                                   | license          | style |
|---------------------|-----------------------------------------|------------------|-------|
| ``gsm8k``           | ``<data>/gsm8k/train.jsonl``            | MIT              | chat  |
| ``codegen``         | ``<data>/gpteacher_codegen/...json``    | MIT (GPT-4 text) | chat  |
| ``roleplay``        | ``<data>/gpteacher_roleplay/...json``   | MIT (GPT-4 text) | chat  |
| ``self_instruct``   | ``<data>/self_instruct_seed/...jsonl``  | Apache-2.0       | chat  |
| ``code_alpaca``     | ``<data>/code_alpaca/...json``          | CC BY-NC 4.0     | chat  |
| ``stdlib_code``     | Python standard library (``inspect``)   | PSF-2.0          | raw   |
| ``stdlib_chat``     | Python standard library (``inspect``)   | PSF-2.0          | chat  |

``<data>`` is ``--data-dir``, else ``$ADASPEC_DATA``, else ``../shared/data`` next to the
repository root. ``code_alpaca`` is non-commercial and is not in :data:`DEFAULT_SOURCES`.

Splits: the one rule of :mod:`adaspec.bench.datasets` (sha256 buckets 0-5 ``train``, 6-7 ``dev``,
8-9 ``test``; instruction rows bucketed exactly as the benchmark buckets them, stdlib
functions on ``stdlib:<qualname>``). Training reads ``train`` only, the held-out evaluation
``dev``; ``test`` rows are never read, so no benchmark test prompt (or its answer) is trained on.

Chat prompts go through the target's chat template (``add_generation_prompt=True``); raw
prompts are a Python signature plus docstring, fed as-is (the way HumanEval is fed).
The target then writes greedy continuations (self-distillation: exactly the tokens a
greedy verifier accepts), stored as token-id shards ``shard_*.pt`` in a cache directory.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import pkgutil
import re
import sys
import time
import warnings
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..bench.datasets import Prompt, bucket_of, data_root, in_split, load_dataset
from ..errors import InvalidArgumentError

ALL_SOURCES = ("gsm8k", "codegen", "roleplay", "self_instruct", "code_alpaca", "stdlib_code", "stdlib_chat")
DEFAULT_SOURCES = ("stdlib_code", "stdlib_chat", "codegen", "gsm8k", "roleplay", "self_instruct")
# Relative weight of each source in the interleaved generation order.
SOURCE_WEIGHTS = {"stdlib_code": 4, "stdlib_chat": 1, "codegen": 3, "gsm8k": 2, "roleplay": 2,
                  "self_instruct": 1, "code_alpaca": 2}
CODE_SOURCES = ("stdlib_code",)

_SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc_data",
                 "lib2to3", "ensurepip", "venv", "test", "__main__", "xxsubtype", "msilib", "winreg",
                 "winsound", "_winapi", "nt", "webbrowser", "pty", "tty", "crypt", "nis", "spwd",
                 "readline", "curses", "ctypes", "idle", "sre_compile", "sre_parse", "sre_constants"}


_BENCH_SET = {"gsm8k": "gsm8k", "codegen": "gpteacher_codegen", "roleplay": "gpteacher_roleplay",
              "self_instruct": "self_instruct_seed", "code_alpaca": "code_alpaca"}
_CALC = re.compile(r"<<[^>]*>>")


def resolve_data_dir(arg: str | None) -> Path:
    """``--data-dir`` > ``$ADASPEC_DATA`` > ``<repo>/../shared/data``
    (:func:`adaspec.bench.datasets.data_root`)."""
    return data_root(arg)


def parse_sources(spec: str) -> list[str]:
    """``"default"``, ``"all"`` or a comma list of :data:`ALL_SOURCES` -> list of names."""
    if spec in ("default", ""):
        return list(DEFAULT_SOURCES)
    if spec == "all":
        return list(ALL_SOURCES)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in ALL_SOURCES]
    if bad or not names:
        raise InvalidArgumentError(
            f"unknown data source(s) {bad or spec!r}; choose from {', '.join(ALL_SOURCES)}")
    return names


def _instruction_prompts(source: str, data_dir: Path, split: str) -> list[Prompt]:
    """Rows of an instruction set in ``split`` (the benchmark's buckets), keyed ``source/row``.

    Keys keep the form earlier caches used (``codegen/12``, ``self_instruct/seed_task_3/0``),
    so generated continuations are reused on resume.
    """
    out = []
    for p in load_dataset(_BENCH_SET[source], split, root=data_dir):
        row = p.id.rsplit("/", 1)[1]
        key = f"{source}/{row}/0" if source == "self_instruct" else f"{source}/{row}"
        reference = p.reference
        if source == "gsm8k" and reference:
            reference = _CALC.sub("", reference).replace("####", "The answer is")
        out.append(Prompt(key, p.category, p.turns, reference=reference, source=source))
    return out


def stdlib_in_split(qualname: str, split: str) -> bool:
    """The split of a standard-library function: the one bucket rule on ``stdlib:<qualname>``."""
    return in_split(bucket_of("stdlib:" + qualname), split)


def prompt_text(prompt: Prompt, tokenizer: Any) -> str:
    """The string fed to the tokenizer: the raw text, or the chat template with a generation prompt."""
    if prompt.raw:
        return prompt.turns[0]
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt.turns[0]}], tokenize=False,
                                         add_generation_prompt=True)


def _submodules(name: str) -> list[pkgutil.ModuleInfo]:
    """Direct submodules of stdlib package ``name`` (empty for plain modules)."""
    spec = importlib.util.find_spec(name) if "." not in name else None
    if spec is None or not spec.submodule_search_locations:
        return []
    return list(pkgutil.iter_modules(spec.submodule_search_locations))


def stdlib_functions(max_source_chars: int = 4000) -> list[tuple[str, str, str, str]]:
    """(qualified name, ``def`` line, cleaned docstring, source) for public stdlib functions.

    Only pure-Python, public, module-level functions with a source under ``max_source_chars``.
    """
    out: list[tuple[str, str, str, str]] = []
    seen: set[str] = set()
    names = sorted(getattr(sys, "stdlib_module_names", ()))
    names += [f"{n}.{m.name}" for n in list(names) if n not in _SKIP_MODULES and not n.startswith("_")
              for m in _submodules(n) if not m.name.startswith("_") and m.name not in _SKIP_MODULES]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mod_name in names:
            if mod_name.startswith("_") or mod_name.split(".")[0] in _SKIP_MODULES:
                continue
            try:
                mod = importlib.import_module(mod_name)
            except Exception:  # noqa: BLE001 - platform-specific modules fail in many ways
                continue
            for name, obj in sorted(vars(mod).items()):
                if name.startswith("_") or not inspect.isfunction(obj) or obj.__module__ != mod_name:
                    continue
                if f"{mod_name}.{name}" in seen:
                    continue
                try:
                    sig = str(inspect.signature(obj))
                    src = inspect.getsource(obj)
                except (TypeError, ValueError, OSError):
                    continue
                if len(src) > max_source_chars:
                    continue
                seen.add(f"{mod_name}.{name}")
                out.append((f"{mod_name}.{name}", f"def {name}{sig}:", inspect.getdoc(obj) or "", src))
    return out


def _doc_ok(doc: str, max_doc_chars: int = 900) -> bool:
    return 40 <= len(doc) <= max_doc_chars


def _raw_code_prompt(mod: str, def_line: str, doc: str) -> str:
    """HumanEval-style raw prompt: imports, signature, indented docstring, open body."""
    body = "\n".join(("    " + ln) if ln else "" for ln in doc.splitlines())
    with_import = int(hashlib.sha1(mod.encode()).hexdigest(), 16) % 2 == 0
    header = f"import {mod.split('.')[0]}\n\n\n" if with_import else ""
    return f'{header}{def_line}\n    """{body.lstrip()}\n    """\n'


def load_prompts(sources: list[str], data_dir: Path, split: str = "train", max_prompt_chars: int = 2000,
                 ) -> list[Prompt]:
    """Every prompt of ``sources`` in ``split`` (the one bucket rule of :mod:`adaspec.bench.datasets`),
    interleaved by :data:`SOURCE_WEIGHTS`. ``train`` feeds training, ``dev`` the held-out eval.

    Raises:
        InvalidArgumentError: a data file is missing or no prompt was produced.
    """
    per_source: dict[str, list[Prompt]] = {}
    std = stdlib_functions() if {"stdlib_code", "stdlib_chat"} & set(sources) else []
    for src in sources:
        items: list[Prompt] = []
        if src == "stdlib_code":
            for qn, def_line, doc, _ in std:
                if _doc_ok(doc) and stdlib_in_split(qn, split):
                    items.append(Prompt(f"std/{qn}", "code", [_raw_code_prompt(qn, def_line, doc)], raw=True,
                                        source=src))
        elif src == "stdlib_chat":
            for qn, def_line, doc, _ in std:
                if not _doc_ok(doc) or not stdlib_in_split(qn, split):
                    continue
                first = doc.split("\n\n")[0]
                msg = f"Write a Python function `{def_line[4:-1]}`.\n\n{first}"
                items.append(Prompt(f"stdchat/{qn}", "code", [msg], source=src))
        else:
            items = [p for p in _instruction_prompts(src, data_dir, split)
                     if p.turns[0].strip() and len(p.turns[0]) <= max_prompt_chars]
        # deterministic shuffle by key hash
        items.sort(key=lambda p: hashlib.sha1(p.id.encode()).hexdigest())
        per_source[src] = items
    out = interleave(per_source)
    if not out and split == "train":
        raise InvalidArgumentError("no training prompts: every selected data source is empty")
    return out


def interleave(per_source: dict[str, list[Prompt]]) -> list[Prompt]:
    """Weighted round-robin over sources so any prefix of the list is a balanced mix."""
    out: list[Prompt] = []
    pos = {s: 0 for s in per_source}
    while any(pos[s] < len(v) for s, v in per_source.items()):
        for s, v in per_source.items():
            for _ in range(SOURCE_WEIGHTS.get(s, 1)):
                if pos[s] < len(v):
                    out.append(v[pos[s]])
                    pos[s] += 1
    return out


def reference_examples(sources: list[str], data_dir: Path, tokenizer: Any, split: str = "train",
                       ) -> list[Example]:
    """The data sets' own answers (and stdlib function sources) of ``split`` as plain LM text.

    Cheap auxiliary data: no target compute. Chat sets become chat prompt + reference
    answer + EOS; ``stdlib_code`` becomes the source code of the stdlib functions in
    ``split``. ``code_alpaca`` is included only if it is in ``sources``.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    enc = lambda t: tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    out: list[Example] = []
    for src in sources:
        if src == "stdlib_code":
            for qn, _, _, code in stdlib_functions():
                if stdlib_in_split(qn, split):
                    out.append(Example([], enc(code), "ref:stdlib_code", f"ref/std/{qn}"))
            continue
        if src == "stdlib_chat":
            continue
        for p in _instruction_prompts(src, data_dir, split):
            if p.reference and p.reference.strip():
                out.append(Example(enc(prompt_text(p, tokenizer)), enc(p.reference) + eos, f"ref:{src}",
                                   f"ref/{p.id}"))
    return out


@dataclass
class Example:
    """One distillation example: ``prompt`` ids [P] then the target's greedy ``response`` ids [R]."""

    prompt: list[int]
    response: list[int]
    source: str
    key: str


def load_shards(cache: Path) -> list[Example]:
    """Read every ``shard_*.pt`` under ``cache`` (list of dicts) into :class:`Example` objects."""
    out: list[Example] = []
    for f in sorted(cache.glob("shard_*.pt")):
        for d in torch.load(f, weights_only=True):
            out.append(Example(d["prompt"], d["response"], d["source"], d["key"]))
    return out


@torch.inference_mode()
def greedy_batch(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 eos: int | Collection[int] | None, hidden: list[list[torch.Tensor]] | None = None,
                 ) -> list[list[int]]:
    """Greedy continuations of a left-padded batch, with a KV cache.

    Args:
        input_ids: ``[B, P]`` left-padded prompt ids.
        attention_mask: ``[B, P]``, 1 on real tokens.
        eos: end-of-sequence id(s); a row stops after producing one.
        hidden: if given, filled with ``B`` lists of float16 ``[n, d]`` blocks: the target's last
            hidden states (after its final norm) at the row's real prompt positions, then at
            every generated token that was fed back (all but the row's last one). Nothing is
            computed twice: they come from the same forwards.
    Returns:
        ``B`` lists of new ids; a list ends with an EOS id if the model produced one.

    About 3x the tokens/s of ``model.generate`` on CPU here: rows that reached EOS leave the
    batch (their cache rows are dropped), and nothing else runs per step.
    """
    from transformers import DynamicCache

    from ..runtime.eager import cache_kwargs

    cache = DynamicCache()
    mask = attention_mask.long()
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # [B, P] positions that skip the left padding

    def forward(ids: torch.Tensor, m: torch.Tensor, p: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if hidden is None:
            return model(input_ids=ids, attention_mask=m, position_ids=p, **cache_kwargs(model, cache),
                         use_cache=True, logits_to_keep=1).logits[:, -1], None
        h = model.model(input_ids=ids, attention_mask=m, position_ids=p, **cache_kwargs(model.model, cache),
                        use_cache=True).last_hidden_state  # [B, T, d]
        return model.get_output_embeddings()(h[:, -1]), h

    logits, h = forward(input_ids, mask, pos)
    if hidden is not None:
        hidden[:] = [[h[i][mask[i].bool()].to(torch.float16)] for i in range(h.shape[0])]
    out: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    eos_ids = torch.tensor(sorted({eos} if isinstance(eos, int) else set(eos or ())), dtype=torch.long)
    alive = torch.arange(input_ids.shape[0])  # original row of each live batch row
    last = pos[:, -1]
    for _ in range(max_new_tokens):
        nxt = logits.argmax(-1)  # [b]
        done = torch.zeros_like(nxt, dtype=torch.bool)
        for r, t in zip(alive.tolist(), nxt.tolist()):
            out[r].append(t)
        if eos_ids.numel():
            done = torch.isin(nxt, eos_ids.to(nxt.device))
        if len(out[int(alive[0])]) >= max_new_tokens or bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero().flatten()
            cache.batch_select_indices(keep)
            alive, nxt, mask, last = alive[keep], nxt[keep], mask[keep], last[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        last = last + 1
        logits, h = forward(nxt[:, None], mask, last[:, None])
        if hidden is not None:
            for r, row in zip(alive.tolist(), h[:, -1].to(torch.float16), strict=True):
                hidden[r].append(row[None])
    return out


@torch.no_grad()
def generate_shards(model: Any, tokenizer: Any, prompts: list[Prompt], cache: Path, *,
                    batch_size: int = 32, max_new_tokens: int = 128, max_prompt_tokens: int = 160,
                    deadline: float | None = None, log: Any = print) -> int:
    """Write the target's greedy continuations of ``prompts`` as shards under ``cache``.

    Batches are formed from chunks of ``4 * batch_size`` prompts sorted by length (less
    padding); prompts are left-padded; prompts longer than ``max_prompt_tokens`` are skipped.
    Resumable: keys already in a shard are skipped.
    Stops early at ``deadline`` (``time.time()`` value). Returns the number of new examples.
    """
    cache.mkdir(parents=True, exist_ok=True)
    done = {ex.key for ex in load_shards(cache)}
    todo = [p for p in prompts if p.id not in done]
    # Long prompts cost as much per token as generated ones; skip them (never truncate:
    # a cut chat prompt would lose its generation prompt).
    if not todo:
        return 0
    text = {p.id: prompt_text(p, tokenizer) for p in todo}
    lens = [len(ids) for ids in tokenizer([text[p.id] for p in todo], add_special_tokens=False)["input_ids"]]
    todo = [p for p, n in zip(todo, lens, strict=True) if n <= max_prompt_tokens]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.eos_token_id
    n_new, n_tok, t0 = 0, 0, time.time()
    shard_id = len(list(cache.glob("shard_*.pt")))
    chunk = 4 * batch_size
    for c in range(0, len(todo), chunk):
        group = sorted(todo[c:c + chunk], key=lambda p: len(text[p.id]))
        for b in range(0, len(group), batch_size):
            if deadline is not None and time.time() > deadline:
                return n_new
            batch = group[b:b + batch_size]
            enc = tokenizer([text[p.id] for p in batch], return_tensors="pt", padding=True,
                            add_special_tokens=False)
            enc = enc.to(next(model.parameters()).device)
            out = greedy_batch(model, enc.input_ids, enc.attention_mask, max_new_tokens, eos)
            rows = []
            for i, p in enumerate(batch):
                prompt = enc.input_ids[i][enc.attention_mask[i].bool()].cpu().tolist()
                resp = out[i]  # ends with EOS when the target ended: predicting the end is drafting
                rows.append({"prompt": prompt, "response": resp, "source": p.source, "key": p.id})
                n_tok += len(resp)
            tmp = cache / f".shard_{shard_id:05d}.tmp"
            torch.save(rows, tmp)
            tmp.rename(cache / f"shard_{shard_id:05d}.pt")
            shard_id += 1
            n_new += len(rows)
            dt = time.time() - t0
            log(f"gen: {len(done) + n_new}/{len(prompts)} prompts, {n_tok} new tokens, "
                f"{n_tok / max(dt, 1e-9):.0f} tok/s, {dt / 60:.1f} min")
    return n_new
