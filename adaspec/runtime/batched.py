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

from .compiled import tree_mask
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


def _causal(n: int) -> np.ndarray:
    return np.tril(np.ones((n, n), np.uint8))


def prepare(call: Any) -> Part:
    """Bring the call's runner to its committed prefix and describe its fed rows (as
    ``CompiledRunner.forward`` / ``forward_tree`` do before their forward)."""
    r = call.runner
    if call.nodes is None:
        start = r._sync_prefix(call.seq, call.n_out)
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


def batchable(calls: list[Any]) -> bool:
    """True when ``calls`` can share one compiled forward (distinct compiled runners of one model)."""
    from .compiled import LeanWeights
    from .compiled_runner import CompiledRunner

    if len(calls) < 2 or not all(type(c.runner) is CompiledRunner for c in calls):
        return False
    lean = calls[0].runner.lean
    if type(lean) is not LeanWeights and not _native(lean):  # the two formats composed here
        return False
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


def _write_cache(qkv: np.ndarray, part: Part, r0: int, layer: int, qw: int, kvh: int, hd: int) -> None:
    """Store the part's fed keys / values (rows r0.. of qkv) in its cache at start.."""
    n, kw = len(part.feed), kvh * hd
    k = qkv[r0:r0 + n, qw:qw + kw].reshape(n, kvh, hd)
    v = qkv[r0:r0 + n, qw + kw:qw + 2 * kw].reshape(n, kvh, hd)
    kt, vc = part.runner.kt, part.runner.vc
    kt[layer, :, :, part.start:part.start + n] = k.transpose(1, 2, 0)
    vc[layer, :, part.start:part.start + n, :hd] = v.transpose(1, 0, 2)


def forward_parts(lean: Any, parts: list[Part]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One forward of all parts' fed rows (``qkernels.forward_layers`` with a batch of caches).

    Returns per part (logits [n_out, P*16], hidden [n_out, d], conc [n_out]).
    """
    from . import kernels as K

    offsets = np.cumsum([0] + [len(p.feed) for p in parts])
    rows, d, hd = int(offsets[-1]), lean.d, lean.hd
    heads, kvh, inter, eps = lean.heads, lean.kvh, lean.inter, lean.eps  # a float, as forward_rows gets
    h = embed(lean, np.concatenate([p.feed for p in parts]))
    pos = np.concatenate([p.pos for p in parts])
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
        for b, part in enumerate(parts):
            r0, r1 = int(offsets[b]), int(offsets[b + 1])
            _write_cache(qkv, part, r0, layer, qw, kvh, hd)
            K._attention(qkv[r0:r1], heads, kvh, hd, part.runner.kt, part.runner.vc, layer, part.start,
                         part.mask, scale, att[r0:r1], conc[r0:r1])
        matmul(lean, "wo", layer, att, proj)
        h += proj[:, :d]
        K._rmsnorm(h, lean.ln2[layer], eps, xn)
        matmul(lean, "wgu", layer, xn, gu)
        K._silu_mul(gu, inter, act)
        matmul(lean, "wd", layer, act, down)
        h += down[:, :d]
    return _heads(lean, parts, offsets, h, conc)


def _heads(lean: Any, parts: list[Part], offsets: np.ndarray, h: np.ndarray, conc: np.ndarray,
           ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Final norm and the LM head over every part's output rows at once (one head read)."""
    from . import kernels as K

    idx = np.concatenate([np.arange(offsets[b + 1] - p.n_out, offsets[b + 1]) for b, p in enumerate(parts)])
    tail = np.ascontiguousarray(h[idx])
    hidden = np.empty_like(tail)
    K._rmsnorm(tail, lean.normw, lean.eps, hidden)
    logits = np.empty((len(idx), width(lean, "lm")), np.float32)
    matmul(lean, "lm", None, hidden, logits)
    cmean = conc[idx].sum(axis=1) / lean.heads
    out, o = [], 0
    for p in parts:
        out.append((logits[o:o + p.n_out], hidden[o:o + p.n_out], cmean[o:o + p.n_out]))
        o += p.n_out
    return out
