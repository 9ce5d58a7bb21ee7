"""Kernels of the batched forward: attention of many sequences' rows, each over its own KV
cache, and the whole native forward over a batch in one compiled call.

:func:`attend_parts` is :func:`.kernels._attention` for a batch: the rows of every
sequence ("part") of a batched forward, each part with its own cache arrays (passed as
addresses) and its own [T, T] visibility mask. It first stores every fed row's key and
value in its part's cache (slot start + i), then runs one parallel job per (row, KV head)
with exactly the arithmetic of ``_attention`` (same micro-kernel, same order of sums), so a
row's output is bit-identical to its own sequence's forward. One call per layer replaces
a Python loop of one cache write and one parallel launch per sequence.

:func:`forward_parts_native` is ``qkernels.forward_rows_native`` with that attention: the
layer loop of a batched forward over native weights runs in one compiled call (no Python
between the ~10 kernels of each layer).
"""

# ruff: noqa: I001  (kernels must import numba first: it sets SVML off)
from __future__ import annotations

import math

from .kernels import _FAST, _rmsnorm, _rope, _silu_mul, attend_group  # sets numba up first
from .qkernels import qembed, qlinear

import numpy as np  # noqa: E402
from numba import carray, njit, prange, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402


@intrinsic
def _f32p(typingctx, addr):
    """The float32 pointer at integer address ``addr`` (for ``numba.carray``)."""
    sig = types.CPointer(types.float32)(types.intp)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.float32)))

    return sig, codegen


@njit(parallel=True, cache=True)
def _store(qkv, heads, kvh, hd, layers, layer, kaddr, vaddr, caps, hdp, starts, part_of, local):
    """Keys / values of every fed row into its part's cache: kt[layer, g, e, start + i] and
    vc[layer, g, start + i, e] from qkv's key and value columns (rotary already applied)."""
    qw = heads * hd
    kw = kvh * hd
    for r in prange(qkv.shape[0]):
        p = part_of[r]
        cap = caps[p]
        kt = carray(_f32p(kaddr[p]), (layers, kvh, hd, cap))
        vc = carray(_f32p(vaddr[p]), (layers, kvh, cap, hdp))
        slot = starts[p] + local[r]
        for g in range(kvh):
            for e in range(hd):
                kt[layer, g, e, slot] = qkv[r, qw + g * hd + e]
                vc[layer, g, slot, e] = qkv[r, qw + kw + g * hd + e]


@njit(parallel=True, fastmath=_FAST, cache=True)
def _attend(qkv, heads, kvh, hd, layer, kaddr, vaddr, caps, hdp, starts, lens, part_of, local,
            masks, moff, scale, out, conc):
    """``kernels._attention`` over rows of several parts (see the module docstring)."""
    rows = qkv.shape[0]
    group = heads // kvh
    for job in prange(rows * kvh):
        r = job // kvh
        g = job % kvh
        p = part_of[r]
        n = lens[p]
        cap = caps[p]
        mrow = moff[p] + local[r] * n
        attend_group(qkv[r], g * group, group, hd, scale, kaddr[p] + (layer * kvh + g) * hd * cap * 4, cap,
                     vaddr[p] + (layer * kvh + g) * cap * hdp * 4, hdp, starts[p], starts[p] + n,
                     masks[mrow: mrow + n], out[r], conc[r])


class PartsLayout:
    """Where each fed row of a batched forward belongs: per part its cache (addresses,
    capacity), first fed slot, row count and mask; per row its part and index in it.

    Args:
        caches: per part (kt [L, KVH, hd, cap], vc [L, KVH, cap, hdp]) C-contiguous fp32.
        starts: per part, cache slots already holding its prefix.
        masks: per part, [T, T] uint8 visibility among its fed rows.
    """

    def __init__(self, caches: list[tuple[np.ndarray, np.ndarray]], starts: list[int],
                 masks: list[np.ndarray]) -> None:
        for kt, vc in caches:
            if not (kt.flags.c_contiguous and vc.flags.c_contiguous):
                raise ValueError("batched attention needs C-contiguous caches")
        self.caches = caches  # keeps the arrays alive while their addresses are used
        self.kaddr = np.array([kt.ctypes.data for kt, _ in caches], np.int64)
        self.vaddr = np.array([vc.ctypes.data for _, vc in caches], np.int64)
        self.caps = np.array([kt.shape[3] for kt, _ in caches], np.int64)
        self.hdp = int(caches[0][1].shape[3])
        self.layers = int(caches[0][0].shape[0])
        self.starts = np.array(starts, np.int64)
        self.lens = np.array([len(m) for m in masks], np.int64)
        self.part_of = np.repeat(np.arange(len(masks), dtype=np.int64), self.lens)
        offsets = np.concatenate([[0], np.cumsum(self.lens)])
        self.local = np.arange(int(offsets[-1]), dtype=np.int64) - np.repeat(offsets[:-1], self.lens)
        sizes = self.lens * self.lens
        self.moff = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.masks = np.concatenate([np.ascontiguousarray(m, np.uint8).ravel() for m in masks])


def attend_parts(qkv: np.ndarray, heads: int, kvh: int, hd: int, layer: int, lay: PartsLayout,
                 scale: np.float32, out: np.ndarray, conc: np.ndarray) -> None:
    """Store every row's key / value in its part's cache, then attention of every row.

    qkv: [R, (H + 2 KVH) hd] (rotary applied); out: [R, H hd]; conc: [R, H].
    """
    _store(qkv, heads, kvh, hd, lay.layers, layer, lay.kaddr, lay.vaddr, lay.caps, lay.hdp, lay.starts,
           lay.part_of, lay.local)
    _attend(qkv, heads, kvh, hd, layer, lay.kaddr, lay.vaddr, lay.caps, lay.hdp, lay.starts, lay.lens,
            lay.part_of, lay.local, lay.masks, lay.moff, scale, out, conc)


@njit(cache=True, nogil=True)  # the server's event loop runs meanwhile
def forward_parts_native(ids, pos, blob, mats, ln1, ln2, normw, cos, sin, heads, kvh, inter, eps, wide,
                         kaddr, vaddr, caps, hdp, starts, lens, part_of, local, masks, moff, out_rows):
    """One forward of every part's fed rows over native weights (``qkernels.forward_native``'s
    operations in its order; attention per part over its own cache, see :func:`_attend`).

    ids, pos: [R] fed ids and rotary positions of all parts, part after part; out_rows:
    [N] rows whose outputs are wanted. Returns logits [N, P*16], hidden [N, d], conc [N]
    (mean over heads of the last layer's max attention weight).
    """
    layers = ln1.shape[0]
    h = qembed(ids, blob, mats[4 * layers + 1])
    rows, d = h.shape
    hd = cos.shape[1]
    scale = np.float32(1.0 / math.sqrt(hd))
    xn = np.empty((rows, d), np.float32)
    qkv = np.empty((rows, mats[0, 2] * 16), np.float32)
    att = np.empty((rows, heads * hd), np.float32)
    proj = np.empty((rows, mats[1, 2] * 16), np.float32)
    gu = np.empty((rows, mats[2, 2] * 16), np.float32)
    act = np.empty((rows, inter), np.float32)
    down = np.empty((rows, mats[3, 2] * 16), np.float32)
    conc = np.zeros((rows, heads), np.float32)
    for layer in range(layers):
        _rmsnorm(h, ln1[layer], eps, xn)
        qlinear(xn, blob, mats[4 * layer], qkv, wide)
        _rope(qkv, 0, heads, hd, cos, sin, pos)
        _rope(qkv, heads * hd, kvh, hd, cos, sin, pos)
        _store(qkv, heads, kvh, hd, layers, layer, kaddr, vaddr, caps, hdp, starts, part_of, local)
        _attend(qkv, heads, kvh, hd, layer, kaddr, vaddr, caps, hdp, starts, lens, part_of, local, masks,
                moff, scale, att, conc)
        qlinear(att, blob, mats[4 * layer + 1], proj, wide)
        for i in range(rows):
            for j in range(d):
                h[i, j] += proj[i, j]
        _rmsnorm(h, ln2[layer], eps, xn)
        qlinear(xn, blob, mats[4 * layer + 2], gu, wide)
        _silu_mul(gu, inter, act)
        qlinear(act, blob, mats[4 * layer + 3], down, wide)
        for i in range(rows):
            for j in range(d):
                h[i, j] += down[i, j]
    n = out_rows.shape[0]
    tail = np.empty((n, d), np.float32)
    for k in range(n):
        tail[k] = h[out_rows[k]]
    hidden = np.empty((n, d), np.float32)
    _rmsnorm(tail, normw, eps, hidden)
    lm = mats[4 * layers]
    logits = np.empty((n, lm[2] * 16), np.float32)
    qlinear(hidden, blob, lm, logits, wide)
    cout = np.empty(n, np.float32)
    for k in range(n):
        cout[k] = conc[out_rows[k]].sum() / heads
    return logits, hidden, cout
