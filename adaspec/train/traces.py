"""``adaspec collect``: verification traces for training the predictors.

The engine runs each prompt with a recording policy that always drafts ``k`` tokens
(default 8) and reads every feature the predictors use. Output directory::

    meta.json                    format, model pair, k, sampling, feature schema, shard list
    shard-00000.safetensors      one shard per ``shard_size`` prompts (written atomically)
    target_embed.safetensors     the target's input embedding matrix "embed" [V, d_t] (fp16),
                                 used to fold the ldlp head's embedding layer

Per drafted token (N rows): ``tok_hidden`` [N, d_draft] fp16 (draft last hidden state),
``tok_scalars`` [N, F] fp32 (``meta.features.scalars`` order), ``tok_match`` [N] uint8
(x_i == argmax p_i: accepted under greedy given the draft prefix, the hard label),
``tok_tried`` [N] uint8 (i <= accepted + 1: verified conditionally on an accepted prefix),
``tok_soft`` [N] fp32 (min(1, p_i(x_i) / q_i(x_i)), the soft label), ``tok_qx`` [N] fp32
(q_i(x_i)), ``tok_pos`` [N] int32 (1-based position), ``tok_round`` [N] int64 (row in
the round arrays).

Per round (R rows): ``round_prompt`` [R] int64 (prompt index), ``round_index`` [R] int32,
``round_k`` / ``round_accepted`` [R] int32, ``round_draft_s`` / ``round_verify_s`` [R]
fp32, ``round_draft_forwards`` [R] int32, ``round_hidden`` [R, d_t] fp16 (target hidden
state that produced the committed extra token), ``round_token`` [R] int64 (that token).
The ldlp label of a round is the next round's accepted length for the same prompt.

Resumable: a restart with the same arguments skips the prompts of finished shards. Shards
are written to a temporary name and renamed, and ``meta.json`` records each one's size,
row counts and sha256; on resume a shard that is missing, truncated or altered is dropped
together with every later one, and its prompts are collected again (a shard is never
trusted on its name alone), and :func:`load_traces` refuses such a shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from ..checkpoints.loader import LoadedModel, vocab_fingerprint
from ..errors import InvalidArgumentError, ensure_writable_dir
from ..predictors.features import SCALAR_FEATURES
from ..runtime import restore_eager_weights
from .recorder import RecorderPolicy

TRACE_FORMAT = "adaspec-traces/1"


def pair_info(target: LoadedModel, draft: LoadedModel) -> dict:
    """Model-pair fingerprint stored with traces and predictors."""
    return {
        "target": target.name, "draft": draft.name,
        "target_hidden": int(target.model.config.hidden_size),
        "draft_hidden": int(draft.model.config.hidden_size),
        "vocab_size": int(target.vocab_size),
        "vocab_sha256": vocab_fingerprint(target.tokenizer) if target.tokenizer is not None else None,
    }


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def collect(
    target: LoadedModel,
    draft: LoadedModel,
    prompts: list[list[int]],
    out: Path,
    *,
    k: int = 8,
    max_new_tokens: int = 128,
    shard_size: int = 16,
    attention: bool = False,
    source: str = "",
    progress: bool = True,
    runtime: str = "auto",
    replay: bool = False,
    batch_size: int = 16,
) -> dict:
    """Record traces of ``prompts`` (token ids) under ``out``, one shard per ``shard_size``
    prompts (resumed where an earlier run stopped).

    The engine runs each prompt (``runtime``: how its forwards run, see
    :mod:`adaspec.runtime`); with ``replay``, fixed-K rounds are replayed over the target's
    batched greedy continuations instead (``batch_size`` prompts per generation; the
    teacher-forced passes run on the engine's runners for ``runtime``; see
    :mod:`adaspec.train.replay`).

    Returns the final meta dict. Raises InvalidArgumentError when ``out`` holds traces of
    another pair or other arguments.
    """
    from tqdm import tqdm

    if k < 1 or shard_size < 1 or max_new_tokens < 1 or batch_size < 1:
        raise InvalidArgumentError("collect: k, shard_size, batch size and max_new_tokens must be >= 1")
    args = {"k": k, "max_new_tokens": max_new_tokens, "shard_size": shard_size, "attention": attention,
            "n_prompts": len(prompts), "source": source, "sampling": "greedy"}
    if replay:
        args["replay"] = True
    meta, done = open_trace_dir(target, draft, out, args)
    rec = RecorderPolicy(k=k, attention=attention)
    bar = tqdm(total=len(prompts), initial=done, disable=not progress, unit="prompt",
               desc="collect --replay" if replay else "collect")
    if replay:
        from .replay import replay_prompts

        def record(start: int, end: int) -> None:
            replay_prompts(target, draft, prompts, start, end, rec, k=k, max_new_tokens=max_new_tokens,
                           attention=attention, batch_size=batch_size, runtime=runtime,
                           tick=bar.update)
    else:
        from ..api import SpeculativeGenerator

        gen = SpeculativeGenerator(target, draft, rec, runtime=runtime)

        def record(start: int, end: int) -> None:
            for i in range(start, end):
                rec.prompt_index = i
                gen.generate(prompts[i], max_new_tokens=max_new_tokens)
                bar.update(1)

    for start in range(done, len(prompts), shard_size):
        end = min(start + shard_size, len(prompts))
        rec.clear()
        record(start, end)
        write_shard(out, meta, rec, start, end)
    bar.close()
    meta["complete"] = True
    _atomic_json(out / "meta.json", meta)
    return meta


def open_trace_dir(target: LoadedModel, draft: LoadedModel, out: Path, args: dict) -> tuple[dict, int]:
    """Create (or reopen, to resume) a trace directory.

    Returns its meta (finished shards included) and the number of prompts those shards cover.

    Raises InvalidArgumentError when ``out`` holds traces of another pair or other ``args``.
    """
    from safetensors.torch import save_file

    ensure_writable_dir(out, "trace directory (--out)")
    meta = {"format": TRACE_FORMAT, "pair": pair_info(target, draft), "args": args,
            "features": {"hidden": "draft_last_hidden", "scalars": list(SCALAR_FEATURES),
                         "attention": bool(args["attention"])},
            "shards": [], "complete": False}
    meta_path = out / "meta.json"
    if meta_path.is_file():
        old = _read_meta(meta_path)
        if old.get("pair") != meta["pair"] or old.get("args") != args:
            raise InvalidArgumentError(
                f"{out} holds traces of another model pair or other arguments; use a new --out")
        meta["shards"] = _valid_prefix(out, old.get("shards", []))
        if len(meta["shards"]) < len(old.get("shards", [])):
            _atomic_json(meta_path, meta)
    for stale in out.glob("*.tmp"):  # left by an interrupted write
        stale.unlink()
    emb_path = out / "target_embed.safetensors"
    if not emb_path.is_file():
        restore_eager_weights(target.model)  # a compiled runtime may have released them
        emb = target.model.get_input_embeddings().weight.detach().to(torch.float16).cpu().contiguous()
        save_file({"embed": emb}, str(emb_path))
    return meta, sum(sh["prompts"][1] - sh["prompts"][0] for sh in meta["shards"])


def write_shard(out: Path, meta: dict, rec: RecorderPolicy, start: int, end: int) -> None:
    """Write ``rec``'s rows for prompts [start, end) as the next shard (atomically) and
    record it in ``meta.json``."""
    from safetensors.torch import save_file

    name = f"shard-{len(meta['shards']):05d}.safetensors"
    tensors = rec.tensors()
    save_file(tensors, str(out / (name + ".tmp")))
    os.replace(out / (name + ".tmp"), out / name)
    meta["shards"].append({"file": name, "prompts": [start, end],
                           "tokens": int(tensors["tok_match"].numel()),
                           "rounds": int(tensors["round_k"].numel()),
                           "sha256": _sha256(out / name)})
    _atomic_json(out / "meta.json", meta)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_meta(meta_path: Path) -> dict:
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgumentError(f"corrupt {meta_path} ({exc}); delete that directory and collect "
                                   "again, or use a new --out") from None
    if not isinstance(meta, dict):
        raise InvalidArgumentError(f"corrupt {meta_path}: not a JSON object")
    return meta


def shard_problem(path: Path, shard: dict) -> str | None:
    """Why the shard file ``shard`` (a ``meta.json`` entry) cannot be trusted, or None."""
    from safetensors import safe_open

    f = path / shard.get("file", "?")
    if not f.is_file():
        return "missing"
    want = shard.get("sha256")
    if want and _sha256(f) != want:
        return "truncated or altered (sha256 differs from meta.json)"
    try:
        with safe_open(str(f), framework="pt") as st:
            rows = {k: st.get_slice(k).get_shape()[0] for k in ("tok_match", "round_k")}
    except Exception as exc:  # safetensors raises several types on a damaged file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"unreadable ({first})"
    if rows != {"tok_match": shard.get("tokens"), "round_k": shard.get("rounds")}:
        return "row counts differ from meta.json"
    return None


def _valid_prefix(out: Path, shards: list[dict]) -> list[dict]:
    """The leading shards that check out; the first bad one and every later one are dropped
    (their files deleted) so that their prompts are collected again."""
    for i, shard in enumerate(shards):
        problem = shard_problem(out, shard)
        if problem:
            print(f"collect: shard {shard.get('file')} is {problem}; collecting prompts "
                  f"{shard.get('prompts', ['?'])[0]}.. again", file=sys.stderr)
            for later in shards[i:]:
                (out / later.get("file", "?")).unlink(missing_ok=True)
            return shards[:i]
    return shards


def load_traces(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read every shard of a trace directory; returns (meta, concatenated tensors) with
    ``tok_round`` re-indexed into the concatenated round arrays."""
    from safetensors.torch import load_file

    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise InvalidArgumentError(f"{path} has no meta.json: not a trace directory (run `adaspec collect`)")
    meta = _read_meta(meta_path)
    if meta.get("format") != TRACE_FORMAT or not meta.get("shards"):
        raise InvalidArgumentError(f"{path} holds no adaspec traces (format {meta.get('format')!r})")
    for s in meta["shards"]:
        problem = shard_problem(path, s)
        if problem:
            raise InvalidArgumentError(
                f"trace shard {path / s.get('file', '?')} is {problem}; rerun the same `adaspec collect` "
                "command to collect its prompts again")
    parts: dict[str, list[torch.Tensor]] = {}
    offset = 0
    for s in meta["shards"]:
        t = load_file(str(path / s["file"]))
        t["tok_round"] = t["tok_round"] + offset
        offset += t["round_k"].numel()
        for key, val in t.items():
            parts.setdefault(key, []).append(val)
    return meta, {k: torch.cat(v) for k, v in parts.items()}
