"""One compiled forward over the verify rows of many sequences (the batch engine's target step).

Every sequence keeps its own :class:`~adaspec.runtime.compiled_runner.CompiledRunner` (its own
static KV cache); all runners share one model's packed weights. :func:`run_calls` takes
the rounds' :class:`~adaspec.types.VerifyCall` s and, when they are compiled runners of
one model, runs them as **one** forward: every linear (the weight-bound part on a CPU)
runs over the rows of all sequences at once, so each weight is read once per step instead
of once per sequence; attention runs per sequence, over its own cache and its own fed
rows only. Rows of different sequences never meet, and each primitive computes a row the
same way whatever rows surround it (see :mod:`.kernels`), so a sequence's outputs are
bit-identical to its own :meth:`CompiledRunner.forward` (tested).

Calls that cannot share a forward (the eager runtime, one call, different models) run one
after another on their own runners: same results, no speed-up.

The layer loop composes the kernels' per-layer primitives in the same order as
``qkernels.forward_layers``; the weight multiply goes through :func:`matmul` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .compiled import _causal, tree_mask
from .eager import ForwardOut

_SLOT = {"wqkv": 0, "wo": 1, "wgu": 2, "wd": 3}  # a native layer's matrices: rows 4 l + slot of mats


def _native(lean: Any) -> bool:
    return hasattr(lean, "blob")


def matmul(lean: Any, name: str, layer: int | None, x: np.ndarray, out: np.ndarray) -> None:
    """out[M, N] = x[M, K] @ W^T for the weight ``name`` (of ``layer``, or the LM head when
    None) of ``lean``: the only weight multiply here. Native weights (``NativeWeights``: rows
    of ``mats`` into ``blob``) go through ``qkernels.qlinear``, packed fp32 ones
    (``LeanWeights``) through ``kernels.linear`` -- as their own forwards do."""
    if _native(lean):
        from .qkernels import qlinear

        row = lean.mats[4 * lean.layers if layer is None else 4 * layer + _SLOT[name]]
        qlinear(x, lean.blob, row, out, lean.wide)
        return
    from .kernels import linear

    w = getattr(lean, name)
    linear(x, w if layer is None else w[layer], out)


def width(lean: Any, name: str) -> int:
    """Output columns of weight ``name`` (panels of 16)."""
    if _native(lean):
        return int(lean.mats[4 * lean.layers if name == "lm" else _SLOT[name], 2]) * 16
    w = getattr(lean, name)
    return (w.shape[0] if name == "lm" else w.shape[1]) * 16


def embed(lean: Any, ids: np.ndarray) -> np.ndarray:
    """[T] ids -> [T, d] input rows."""
    if _native(lean):
        from .qkernels import qembed

        return qembed(ids, lean.blob, lean.mats[4 * lean.layers + 1])
    from .kernels import embed as fp32_embed

    return fp32_embed(ids, lean.emb, lean.emb_packed, lean.lm)


@dataclass
class Part:
    """One sequence's share of a batched forward.

    feed / pos: [T] int64 ids and rotary positions; start: cache slots already holding the
    sequence's prefix; mask: [T, T] uint8 visibility among its fed rows; n_out: rows whose
    outputs it needs (the last ones); kt / vc: its runner's cache arrays.
    """

    runner: Any
    feed: np.ndarray
    pos: np.ndarray
    start: int
    mask: np.ndarray
    n_out: int
    hidden: bool
    fed: list[int]


def prepare(call: Any) -> Part:
    """Bring the call's runner to its committed prefix and describe its fed rows (as
    ``CompiledRunner.forward`` / ``forward_tree`` do before their forward)."""
    r = call.runner
    if call.nodes is None:
        start = r._sync_prefix(call.seq, call.n_out, call.synced)
        fed = call.seq[start:]
        mask, pos = _causal(len(fed)), list(range(start, start + len(fed)))
    else:
        start = r._sync_prefix(call.seq, 1)
        linear = call.seq[start:]
        mask, depth = tree_mask(len(linear), call.parents)
        fed = linear + call.nodes
        pos = list(range(start, start + len(linear))) + [start + len(linear) - 1 + d for d in depth]
    r.kt, r.vc = r.lean.fit_cache(r.kt, r.vc, start + len(fed), start)
    return Part(r, np.asarray(fed, np.int64), np.asarray(pos, np.int64), start, mask, call.n_out,
                call.hidden, fed)


def batchable_runner(runner: Any) -> bool:
    """True when ``runner``'s forwards can be shared with other sequences' (and are
    batch-invariant: a row's outputs never depend on the rows fed with it)."""
    from .compiled import LeanWeights
    from .compiled_runner import CompiledRunner

    return type(runner) is CompiledRunner and (type(runner.lean) is LeanWeights or _native(runner.lean))


def batchable(calls: list[Any]) -> bool:
    """True when ``calls`` can share one compiled forward (distinct compiled runners of one model)."""
    if len(calls) < 2 or not all(batchable_runner(c.runner) for c in calls):
        return False
    lean = calls[0].runner.lean
    return all(c.runner.lean is lean for c in calls) and len({id(c.runner) for c in calls}) == len(calls)


def run_calls(calls: list[Any]) -> list[ForwardOut]:
    """The output of every call (in order): the calls on compiled runners of one model share
    one forward (:func:`forward_parts`); every other call runs on its own runner."""
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(calls):
        groups.setdefault(id(getattr(c.runner, "lean", c.runner)), []).append(i)
    outs: list[ForwardOut | None] = [None] * len(calls)
    for idx in groups.values():
        group = [calls[i] for i in idx]
        results = _shared(group) if batchable(group) else [c.run() for c in group]
        for i, out in zip(idx, results):
            outs[i] = out
    return outs  # type: ignore[return-value]


def _shared(calls: list[Any]) -> list[ForwardOut]:
    """One forward for calls on distinct compiled runners of one model."""
    parts = [prepare(c) for c in calls]
    lean = parts[0].runner.lean
    outs = forward_parts(lean, parts)
    results = []
    for part, (logits, hidden, conc) in zip(parts, outs):
        r = part.runner
        r.forwards += 1
        r._conc = conc
        r.tokens.extend(part.fed)
        out = torch.from_numpy(logits[:, : lean.n_logits])
        if lean.out_ids is not None and getattr(r, "full_vocab", True):  # as CompiledRunner._run
            full = out.new_full((out.shape[0], lean.vocab), float("-inf"))
            out = full.index_copy_(1, lean.out_ids, out)
        results.append(ForwardOut(out, torch.from_numpy(hidden) if part.hidden else None))
    return results


def forward_parts(lean: Any, parts: list[Part]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One forward of all parts' fed rows (``qkernels.forward_layers`` with a batch of caches):
    native weights in one compiled call (:func:`.batch_kernels.forward_parts_native`), packed
    fp32 ones composed here layer by layer.

    Returns per part (logits [n_out, P*16], hidden [n_out, d], conc [n_out]).
    """
    from .batch_kernels import PartsLayout, forward_parts_native

    lay = PartsLayout([(p.runner.kt, p.runner.vc) for p in parts], [p.start for p in parts],
                      [p.mask for p in parts])
    ids = np.concatenate([p.feed for p in parts])
    pos = np.concatenate([p.pos for p in parts])
    ends = np.cumsum([len(p.feed) for p in parts])
    out_rows = np.concatenate([np.arange(e - p.n_out, e) for e, p in zip(ends, parts)]).astype(np.int64)
    if _native(lean):
        logits, hidden, conc = forward_parts_native(
            ids, pos, lean.blob, lean.mats, lean.ln1, lean.ln2, lean.normw, lean.cos, lean.sin, lean.heads,
            lean.kvh, lean.inter, lean.eps, lean.wide, lay.kaddr, lay.vaddr, lay.caps, lay.hdp, lay.starts,
            lay.lens, lay.part_of, lay.local, lay.masks, lay.moff, out_rows)
    else:
        logits, hidden, conc = _forward_fp32(lean, ids, pos, lay, out_rows)
    out, o = [], 0
    for p in parts:
        out.append((logits[o:o + p.n_out], hidden[o:o + p.n_out], conc[o:o + p.n_out]))
        o += p.n_out
    return out


def _forward_fp32(lean: Any, ids: np.ndarray, pos: np.ndarray, lay: Any, out_rows: np.ndarray,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`forward_parts` over packed fp32 weights (``LeanWeights``), composed per layer.

    Returns logits [N, P*16], hidden [N, d], conc [N] of the rows ``out_rows``.
    """
    from . import kernels as K
    from .batch_kernels import attend_parts

    rows, d, hd = len(ids), lean.d, lean.hd
    heads, kvh, inter, eps = lean.heads, lean.kvh, lean.inter, lean.eps  # a float, as forward_rows gets
    h = embed(lean, ids)
    scale = np.float32(1.0 / math.sqrt(hd))
    xn = np.empty((rows, d), np.float32)
    qkv = np.empty((rows, width(lean, "wqkv")), np.float32)
    att = np.empty((rows, heads * hd), np.float32)
    proj = np.empty((rows, width(lean, "wo")), np.float32)
    gu = np.empty((rows, width(lean, "wgu")), np.float32)
    act = np.empty((rows, inter), np.float32)
    down = np.empty((rows, width(lean, "wd")), np.float32)
    conc = np.zeros((rows, heads), np.float32)
    qw = heads * hd
    for layer in range(lean.layers):
        K._rmsnorm(h, lean.ln1[layer], eps, xn)
        matmul(lean, "wqkv", layer, xn, qkv)
        K._rope(qkv, 0, heads, hd, lean.cos, lean.sin, pos)
        K._rope(qkv, qw, kvh, hd, lean.cos, lean.sin, pos)
        attend_parts(qkv, heads, kvh, hd, layer, lay, scale, att, conc)
        matmul(lean, "wo", layer, att, proj)
        h += proj[:, :d]
        K._rmsnorm(h, lean.ln2[layer], eps, xn)
        matmul(lean, "wgu", layer, xn, gu)
        K._silu_mul(gu, inter, act)
        matmul(lean, "wd", layer, act, down)
        h += down[:, :d]
    return _head(lean, h, conc, out_rows)


def _head(lean: Any, h: np.ndarray, conc: np.ndarray, out_rows: np.ndarray,
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Final norm and the LM head over the rows ``out_rows`` of h [R, d] at once (one head
    read). Returns logits [N, P*16], hidden [N, d], conc [N]."""
    from . import kernels as K

    tail = np.ascontiguousarray(h[out_rows])
    hidden = np.empty_like(tail)
    K._rmsnorm(tail, lean.normw, lean.eps, hidden)
    logits = np.empty((len(out_rows), width(lean, "lm")), np.float32)
    matmul(lean, "lm", None, hidden, logits)
    return logits, hidden, conc[out_rows].sum(axis=1) / lean.heads
