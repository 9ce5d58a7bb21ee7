"""Teacher-forced target features for training a feature head (``adaspec train-head``).

One batched target pass over a text labels every position at once: the target's last
hidden state (after its final norm) at each position is both the head's input (for the
next position) and its regression target, and the target's own next-token distribution
follows from it through the (frozen) LM head. Prefill is the efficient regime on a CPU,
so this is far cheaper than generating the target's continuations token by token.

Texts (train split of the benchmark's single split rule only, so no evaluation prompt
is ever seen): chat prompt + reference answer + EOS for the instruction sets, and the
source code of Python standard-library functions as raw code.

Shards on disk (``DIR/shard-00000.pt``): ``tokens`` int32 [N, T] (pad = -1),
``feats`` float16 [N, T, d].
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidArgumentError

CHAT_SOURCES = ("gsm8k", "gpteacher_codegen", "gpteacher_roleplay", "self_instruct_seed")
CODE_SOURCES = ("stdlib_code",)
DEFAULT_SOURCES = CHAT_SOURCES + CODE_SOURCES


def _stable(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


def training_texts(tokenizer: Any, sources: tuple[str, ...] = DEFAULT_SOURCES, split: str = "train",
                   max_tokens: int = 512) -> list[tuple[str, list[int]]]:
    """(source, token ids) of every training text, interleaved so any prefix is a mix.

    Chat sets: chat-templated prompt + the set's reference answer + EOS, from the
    benchmark loader's ``split`` (buckets 0-5 for ``train``). ``stdlib_code``: the source of
    public pure-Python standard-library functions. Texts are cut to ``max_tokens``.
    """
    from ..bench.datasets import load_dataset
    from .draft_data import stdlib_functions

    eos = tokenizer.eos_token_id
    per: dict[str, list[tuple[str, list[int]]]] = {}
    for src in sources:
        rows: list[tuple[str, list[int]]] = []
        if src == "stdlib_code":
            for qn, _, _, code in stdlib_functions():
                ids = tokenizer.encode(code, add_special_tokens=False)
                rows.append((_stable(qn), ids[:max_tokens]))
        elif src in CHAT_SOURCES:
            for p in load_dataset(src, split):
                if not p.reference:
                    continue
                text = tokenizer.apply_chat_template([{"role": "user", "content": p.turns[0]}],
                                                     tokenize=False, add_generation_prompt=True)
                ids = tokenizer.encode(text + p.reference.strip(), add_special_tokens=False)
                if eos is not None:
                    ids.append(eos)
                rows.append((_stable(p.id), ids[:max_tokens]))
        else:
            raise InvalidArgumentError(f"unknown head data source {src!r}; "
                                       f"choose from {', '.join(DEFAULT_SOURCES)}")
        rows.sort()
        per[src] = rows
    out: list[tuple[str, list[int]]] = []
    pos = dict.fromkeys(per, 0)
    while any(pos[s] < len(v) for s, v in per.items()):
        for s, v in per.items():
            if pos[s] < len(v):
                out.append((s, v[pos[s]][1]))
                pos[s] += 1
    if not out:
        raise InvalidArgumentError("no training texts: every selected source is empty")
    return out


def _batches(texts: list[list[int]], batch_tokens: int) -> Iterator[list[list[int]]]:
    """Length-sorted batches of about ``batch_tokens`` tokens (less padding)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    cur: list[list[int]] = []
    for i in order:
        t = texts[i]
        if cur and (len(cur) + 1) * len(t) > batch_tokens:
            yield cur
            cur = []
        cur.append(t)
    if cur:
        yield cur


@torch.inference_mode()
def target_features(model: Any, batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded batch -> (tokens int32 [N, T] with pad -1, features float16 [N, T, d]).

    Features are the target's last hidden states after its final norm (what the runners
    return as ``hidden``).
    """
    n, t = len(batch), max(len(b) for b in batch)
    ids = torch.zeros((n, t), dtype=torch.long)
    mask = torch.zeros((n, t), dtype=torch.long)
    for i, b in enumerate(batch):
        ids[i, : len(b)] = torch.tensor(b)
        mask[i, : len(b)] = 1
    hid = model.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [N, T, d]
    toks = torch.where(mask.bool(), ids, torch.full_like(ids, -1)).to(torch.int32)
    return toks, hid.to(torch.float16)


def _stack(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks (tokens int32 [n_i, T_i] pad -1, feats float16 [n_i, T_i, d]) -> one right-padded
    pair (tokens [N, T] pad -1, feats [N, T, d]) with T = max T_i."""
    width = max(t.shape[1] for t, _ in parts)
    toks = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-1) for t, _ in parts])
    feats = torch.cat([torch.nn.functional.pad(f, (0, 0, 0, width - f.shape[1])) for _, f in parts])
    return toks, feats


class _ShardDir:
    """A directory of feature shards (``shard-00000.pt``: ``tokens``, ``feats``) and its resume
    state ``progress.txt``: texts done (shards keep the input order), tokens, shards."""

    def __init__(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.dir, self.state = out_dir, out_dir / "progress.txt"
        self.texts = self.tokens = self.shards = 0
        if self.state.is_file():
            self.texts, self.tokens, self.shards = (int(x) for x in self.state.read_text().split())

    def write(self, parts: list[tuple[torch.Tensor, torch.Tensor]], n_texts: int) -> None:
        """One shard of ``parts`` (blocks as :func:`_stack` takes; none: no shard), then
        ``n_texts`` more input texts count as done."""
        if parts:
            toks, feats = _stack(parts)
            tmp = self.dir / f"shard-{self.shards:05d}.pt.tmp"
            torch.save({"tokens": toks, "feats": feats}, tmp)
            tmp.rename(self.dir / f"shard-{self.shards:05d}.pt")
            self.shards += 1
            self.tokens += int((toks >= 0).sum())
        self.texts += n_texts
        self.state.write_text(f"{self.texts} {self.tokens} {self.shards}\n")


def extract(model: Any, texts: list[list[int]], out_dir: Path, *, minutes: float, batch_tokens: int = 2048,
            shard_tokens: int = 65536, progress: bool = True) -> int:
    """Write feature shards for ``texts`` into ``out_dir`` until done or ``minutes`` pass.

    Resumable: texts already in existing shards (counted in ``progress.txt``) are skipped.
    Returns the number of tokens in all shards.
    """
    from tqdm import tqdm

    shards = _ShardDir(out_dir)
    todo = texts[shards.texts:]
    deadline = time.monotonic() + minutes * 60
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    pending_tok = pending_texts = 0
    bar = tqdm(total=sum(len(t) for t in todo), unit="tok", desc="target features", disable=not progress)
    # shards keep text order (resume by count): batch within fixed windows of the list
    window = 256
    for w0 in range(0, len(todo), window):
        chunk = todo[w0: w0 + window]
        for batch in _batches(chunk, batch_tokens):
            pending.append(target_features(model, batch))
            n_tok = sum(len(b) for b in batch)
            pending_tok += n_tok
            bar.update(n_tok)
        pending_texts += len(chunk)
        if pending_tok >= shard_tokens:
            shards.write(pending, pending_texts)
            pending, pending_tok, pending_texts = [], 0, 0
        if time.monotonic() > deadline:
            break
    if pending:
        shards.write(pending, pending_texts)
    bar.close()
    return shards.tokens


def greedy_extract(model: Any, tokenizer: Any, prompts: list[Any], out_dir: Path, *, minutes: float,
                   batch_size: int = 32, max_new_tokens: int = 128, max_prompt_tokens: int = 256,
                   shard_tokens: int = 65536, progress: bool = True) -> int:
    """On-policy shards: the target's own greedy continuations of ``prompts``, with features.

    Each text is a prompt followed by the target's greedy continuation (up to
    ``max_new_tokens``, ending at EOS); its features come from the generating forwards
    themselves (:func:`~adaspec.train.draft_data.greedy_batch` with ``hidden``), so no
    second pass runs. The text stops one token before the continuation's end: the
    feature of its last position already predicts that final token (often EOS).
    Same shard format and resume rule (``progress.txt``, by prompt count) as :func:`extract`;
    prompts longer than ``max_prompt_tokens`` are skipped (never cut: a cut chat prompt
    would lose its generation prompt). Returns the number of tokens in all shards.
    """
    from tqdm import tqdm

    from .draft_data import greedy_batch, prompt_text

    shards = _ShardDir(out_dir)
    deadline = time.monotonic() + minutes * 60
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    pending_tok = pending_prompts = 0
    bar = tqdm(total=len(prompts), initial=shards.texts, unit="prompt", desc="target continuations",
               disable=not progress)
    eos = tokenizer.eos_token_id
    todo = prompts[shards.texts:]
    for b0 in range(0, len(todo), batch_size):
        if time.monotonic() > deadline:
            break
        batch = todo[b0: b0 + batch_size]
        ids = [tokenizer.encode(prompt_text(p, tokenizer), add_special_tokens=False) for p in batch]
        keep = [i for i in ids if len(i) <= max_prompt_tokens]
        if keep:
            width = max(map(len, keep))  # left-padded: greedy_batch's positions skip the padding
            input_ids = torch.tensor([[0] * (width - len(i)) + i for i in keep])
            mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in keep])
            hidden: list[list[torch.Tensor]] = []
            out = greedy_batch(model, input_ids, mask, max_new_tokens, eos, hidden=hidden)
            for prompt, resp, h in zip(keep, out, hidden, strict=True):
                text = prompt + resp[:-1]
                pending.append((torch.tensor([text], dtype=torch.int32), torch.cat(h)[None]))
                pending_tok += len(text)
        pending_prompts += len(batch)
        bar.update(len(batch))
        bar.set_postfix(tokens=shards.tokens + pending_tok)
        if pending_tok >= shard_tokens:
            shards.write(pending, pending_prompts)
            pending, pending_tok, pending_prompts = [], 0, 0
    if pending or pending_prompts:
        shards.write(pending, pending_prompts)
    bar.close()
    return shards.tokens


def load_shards(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """All shards of ``data_dir`` -> (tokens int32 [N, T], feats float16 [N, T, d])."""
    files = sorted(data_dir.glob("shard-*.pt"))
    if not files:
        raise InvalidArgumentError(f"no feature shards in {data_dir}")
    return _stack([(d["tokens"], d["feats"]) for d in map(torch.load, files)])


#: share of each source in any prefix of the mixed list (code first: the head's main use)
SOURCE_SHARE = {"stdlib_code": 0.3, "gpteacher_codegen": 0.3, "gsm8k": 0.2, "gpteacher_roleplay": 0.15,
                "self_instruct_seed": 0.05}


def mix_texts(texts: list[tuple[str, list[int]]], seed: int = 0) -> list[tuple[str, list[int]]]:
    """A fixed random order in which every prefix holds the sources in ~:data:`SOURCE_SHARE`
    proportions (by tokens) until a source runs out."""
    rng = random.Random(seed)
    per: dict[str, list[tuple[str, list[int]]]] = {}
    for src, ids in texts:
        per.setdefault(src, []).append((src, ids))
    for rows in per.values():
        rng.shuffle(rows)
    used = dict.fromkeys(per, 0)
    pos = dict.fromkeys(per, 0)
    out = []
    while True:
        live = [s for s in per if pos[s] < len(per[s])]
        if not live:
            return out
        # the live source furthest below its share of the tokens so far
        total = sum(used.values()) + 1
        src = min(live, key=lambda s: used[s] / total - SOURCE_SHARE.get(s, 0.1))
        row = per[src][pos[src]]
        pos[src] += 1
        used[src] += len(row[1])
        out.append(row)
