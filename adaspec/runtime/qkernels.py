"""Native-precision kernels: matrix products straight from a checkpoint's own encoding.

A weight matrix keeps the encoding it is stored in (GGUF Q4_0 / Q4_1 / Q8_0 / F16 / BF16 /
F32, safetensors bf16 / fp16 / fp32); its blocks are only **reordered** into panels of 16
output features (:mod:`adaspec.runtime.native` packs them). One panel block covers 32 input
features (k) x 16 outputs, laid out so that each k's 16 quants are contiguous:

    kind   bytes  layout of one panel block (k = 0..31 of the block, 16 lanes = outputs)
    F32    2048   w[k][lane] fp32                 (the fp32 panels of :mod:`kernels`)
    F16    1024   w[k][lane] fp16
    BF16   1024   w[k][lane] bf16
    Q8_0    544   d[lane] fp16, q[k][lane] int8                       w = fp32(d) * q
    Q4_0    288   d[lane] fp16, byte[k/2][lane] = q[2j] | q[2j+1] << 4  w = fp32(d) * (q - 8)
    Q4_1    320   d[lane], m[lane] fp16, nibbles as Q4_0               w = fma(fp32(d), q, fp32(m))

Each w is decoded in registers with gguf's reference arithmetic, and since ``d * q`` is exact
in fp32 (an 11-bit mantissa times an integer of at most 8 bits) the fused ``fma(d, q, m)``
is the reference ``d * q + m`` bit for bit; widening fp16 / bf16 to fp32 is exact. The tile
then accumulates exactly like the fp32 tile of :mod:`kernels`:

    acc[m, 0:16] = 0;  for k in 0..K-1:  acc[m, :] = fma(x[m, k], w[k, 0:16], acc[m, :])

so every output is the same sequential FMA chain over the same fp32 weights as the fp32
path: logits are **bit-identical** to ``compiled-fp32`` for any number of rows, and a row
never depends on the rows computed with it (batch invariance). Each weight is decoded once
for all the rows of a pass: every row count 1-8 is one pass with a loop specialised to it
(512-bit: 1-8 accumulators; 256-bit: 2 per row for 1-4 rows, then one half panel per pass
for 5-8 rows, so the accumulators fit 16 registers), more rows are passes of 8 and the rest.

Two variants: 512-bit (one ``<16 x float>`` per k; AVX-512F) and 256-bit (two
``<8 x float>``; AVX2 + FMA + F16C), chosen at run time (:func:`wide_default`:
``/proc/cpuinfo`` flags, ``ADASPEC_KERNELS=avx2`` forces the 256-bit one). They compute the
same per-lane FMA chains, so they agree with each other too.
"""

# ruff: noqa: I001  (kernels must import numba first: it sets SVML off)
from __future__ import annotations

import math
import os
from pathlib import Path

from . import kernels  # sets numba up first
from .kernels import (PANEL, _attention, _rmsnorm, _rope, _silu_mul, _tile_rows, broadcast_x, close_loop,
                      linear)

import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

F32, F16, BF16, Q8_0, Q4_0, Q4_1 = range(6)
KIND_NAMES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
BLOCK = 32  # input features per panel block
BLOCK_BYTES = np.array([2048, 1024, 1024, 544, 288, 320], np.int64)  # per kind, one panel block
_DECODED = (F16, BF16, Q8_0, Q4_0, Q4_1)  # kinds the tile decodes (F32 uses kernels' fp32 tile)
PREFETCH_BLOCKS = 8  # panel blocks prefetched ahead of the one being read

_F32 = ir.FloatType()
_HALF = ir.HalfType()
_I8, _I16, _I32, _I64 = (ir.IntType(n) for n in (8, 16, 32, 64))


def wide_default() -> bool:
    """True when the 512-bit kernels should run: the CPU has AVX-512F and
    ``ADASPEC_KERNELS`` is not ``avx2`` (``avx512`` forces them)."""
    force = os.environ.get("ADASPEC_KERNELS", "").strip().lower()
    if force in ("avx2", "256"):
        return False
    if force in ("avx512", "512"):
        return True
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return " avx512f" in flags


class _Gen:
    """LLVM IR helpers for one tile: vectors of ``width`` floats (8 or 16) covering ``lanes``
    lanes (16: a whole panel; 8: half a panel, from lane ``lane``, a run-time i64)."""

    def __init__(self, builder: ir.IRBuilder, width: int, lanes: int, lane) -> None:
        self.b = builder
        self.width = width
        self.lanes = lanes
        self.nv = lanes // width
        self.vt = ir.VectorType(_F32, width)
        self.fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(self.vt, [self.vt] * 3), f"llvm.fma.v{width}f32")
        self.lane = {1: lane, 2: builder.shl(lane, ir.Constant(_I64, 1))}  # byte offset per element size

    def load(self, base, offset, elt: ir.Type, size: int):
        """<lanes x elt> at byte ``offset`` (an int or an i64 value; plus the first lane's)
        of i8* ``base``."""
        b = self.b
        off = ir.Constant(_I64, offset) if isinstance(offset, int) else offset
        ptr = b.gep(base, [b.add(off, self.lane[size])])
        return b.load(b.bitcast(ptr, ir.VectorType(elt, self.lanes).as_pointer()), align=size)

    def split(self, v) -> list:
        """<lanes x T> -> nv vectors of ``width`` lanes (lanes 0.. first)."""
        if self.nv == 1:
            return [v]
        und = ir.Constant(v.type, ir.Undefined)
        return [self.b.shuffle_vector(v, und, ir.Constant(ir.VectorType(_I32, self.width),
                                                          list(range(h * self.width, (h + 1) * self.width))))
                for h in range(self.nv)]

    def halves_f32(self, base, offset) -> list:
        """The tile's fp16 lanes at ``offset`` widened (exactly) to fp32, split."""
        v = self.load(base, offset, _HALF, 2)
        return [self.b.fpext(h, self.vt) for h in self.split(v)]

    def at(self, pair, scale: int, const: int):
        """i64 value ``pair * scale + const`` (a byte offset inside a panel block)."""
        b = self.b
        return b.add(b.mul(pair, ir.Constant(_I64, scale)), ir.Constant(_I64, const))

    def decode(self, kind: int, base, pair, odd: int, scales: tuple, cache: dict) -> list:
        """The fp32 weights of row k = 2 ``pair`` + ``odd`` (0..31) of the panel block at
        ``base`` (``pair``: an i64 value): nv vectors."""
        b = self.b
        i32v = ir.VectorType(_I32, self.width)
        if kind in (F16, BF16):
            if kind == F16:
                return self.halves_f32(base, self.at(pair, 64, 32 * odd))
            raw = self.load(base, self.at(pair, 64, 32 * odd), _I16, 2)
            return [b.bitcast(b.shl(b.zext(h, i32v), ir.Constant(i32v, [16] * self.width)), self.vt)
                    for h in self.split(raw)]
        d = scales[0]
        if kind == Q8_0:
            raw = self.load(base, self.at(pair, 32, 32 + 16 * odd), _I8, 1)
            return [b.fmul(dv, b.sitofp(b.sext(h, i32v), self.vt)) for dv, h in zip(d, self.split(raw))]
        if not odd:
            raw = self.load(base, self.at(pair, 16, 32 if kind == Q4_0 else 64), _I8, 1)
            cache["pair"] = [b.zext(h, i32v) for h in self.split(raw)]
        q = [b.lshr(h, ir.Constant(i32v, [4] * self.width)) if odd
             else b.and_(h, ir.Constant(i32v, [15] * self.width)) for h in cache["pair"]]
        if kind == Q4_0:
            return [b.fmul(dv, b.sitofp(b.sub(h, ir.Constant(i32v, [8] * self.width)), self.vt))
                    for dv, h in zip(d, q)]
        return [b.call(self.fma, [dv, b.uitofp(h, self.vt), mv]) for dv, mv, h in zip(d, scales[1], q)]


def _phis(b: ir.IRBuilder, incoming: list, block) -> list:
    """One phi per value of ``incoming``, fed from ``block``."""
    out = []
    for v in incoming:
        phi = b.phi(v.type)
        phi.add_incoming(v, block)
        out.append(phi)
    return out


def _emit_loop(g: _Gen, kind: int, mr: int, args: tuple, exit_block, npan: int = 1, pairs: int = 1) -> None:
    """The block loop of one kind at the builder's position over ``npan`` adjacent panels
    (independent FMA chains, so one row does not wait on FMA latency), 2 ``pairs`` k per step of
    its inner loop; stores, branches to exit. ``args``: (x, ldx, panel, panel stride in
    bytes, nb, out, ldo) as LLVM values."""
    xp, ldx, bp, pstride, nb, op, ldo = args
    b = g.b
    bb = int(BLOCK_BYTES[kind])
    i8p = _I8.as_pointer()
    pf = cgutils.get_or_insert_function(b.module, ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32]),
                                        "llvm.prefetch.p0")
    pre = b.block
    head, kloop, nxt, done = (b.append_basic_block(f"q{kind}_{n}") for n in ("head", "k", "next", "done"))
    b.branch(head)
    b.position_at_end(head)
    blk = b.phi(_I64)
    blk.add_incoming(ir.Constant(_I64, 0), pre)
    accs = _phis(b, [ir.Constant(g.vt, [0.0] * g.width)] * (npan * mr * g.nv), pre)
    bases = [b.gep(bp, [b.add(b.mul(blk, ir.Constant(_I64, bb)), b.mul(pstride, ir.Constant(_I64, j)))])
             for j in range(npan)]
    scales: list = []
    for base in bases:
        for line in range(0, bb, 64):  # prefetch every cache line of a later block
            b.call(pf, [b.gep(base, [ir.Constant(_I64, PREFETCH_BLOCKS * bb + line)]), ir.Constant(_I32, 0),
                        ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        if kind in (Q8_0, Q4_0):
            scales.append((g.halves_f32(base, 0),))
        elif kind == Q4_1:
            scales.append((g.halves_f32(base, 0), g.halves_f32(base, 32)))
        else:
            scales.append(())
    k0 = b.mul(blk, ir.Constant(_I64, BLOCK))
    b.branch(kloop)
    b.position_at_end(kloop)
    pair = b.phi(_I64)
    pair.add_incoming(ir.Constant(_I64, 0), head)
    kaccs = _phis(b, accs, head)
    cur = list(kaccs)
    caches: list[dict] = [{} for _ in range(npan)]
    per = mr * g.nv
    for sub, odd in ((sub, odd) for sub in range(pairs) for odd in (0, 1)):
        pv = g.at(pair, pairs, sub)  # the k-pair of this step
        ws = [g.decode(kind, bases[j], pv, odd, scales[j], caches[j]) for j in range(npan)]
        kk = b.add(k0, g.at(pv, 2, odd))
        for m in range(mr):
            xb = broadcast_x(b, xp, ldx, m, kk, g.vt)
            for j in range(npan):
                for v in range(g.nv):
                    i = j * per + m * g.nv + v
                    cur[i] = b.call(g.fma, [xb, ws[j][v], cur[i]])
    close_loop(b, pair, kaccs, cur, ir.Constant(_I64, BLOCK // 2 // pairs), kloop, nxt)
    close_loop(b, blk, accs, cur, nb, head, done)
    for j in range(npan):
        for m in range(mr):
            orow = b.gep(op, [b.add(b.add(b.mul(ir.Constant(_I64, m), ldo), ir.Constant(_I64, 16 * j)),
                                    g.lane[1])])
            for v in range(g.nv):
                dst = b.bitcast(b.gep(orow, [ir.Constant(_I64, v * g.width)]), g.vt.as_pointer())
                b.store(cur[j * per + m * g.nv + v], dst, align=4)
    b.branch(exit_block)


def _make_qtile(width: int, max_rows: int, npan: int = 1, lanes: int = PANEL, pairs: int = 1):
    """An intrinsic, generic in the row count: out[0:mr, :] = x[0:mr, 0:32 nb] @ W for
    ``npan`` adjacent panels of ``nb`` blocks of a decoded kind, 1 <= mr <= ``max_rows``
    (kind and mr switched on at run time, one specialised loop each). Each pass covers
    ``lanes`` lanes of a panel from lane ``lane`` (16: all; 8: a half, for the 256-bit
    tiles of more than 4 rows, which would not fit in 16 registers otherwise). Arguments
    (kind, mr, x, ldx, panel, panel stride in bytes, nb, out, ldo, lane): addresses,
    strides in floats."""

    @intrinsic
    def qtile(typingctx, kind, mr, xa, ldx, wa, pstride, nb, oa, ldo, lane):
        sig = types.void(*([types.intp] * 10))

        def codegen(context, builder, signature, args):
            kind, mr, xa, ldx, wa, pstride, nb, oa, ldo, lane = args
            g = _Gen(builder, width, lanes, lane)
            loop_args = (builder.inttoptr(xa, _F32.as_pointer()), ldx, builder.inttoptr(wa, _I8.as_pointer()),
                         pstride, nb, builder.inttoptr(oa, _F32.as_pointer()), ldo)
            exit_block = builder.append_basic_block("qtile_exit")
            by_rows = builder.switch(mr, exit_block)
            for rows in range(1, max_rows + 1):
                case = builder.append_basic_block(f"qtile_m{rows}")
                by_rows.add_case(ir.Constant(_I64, rows), case)
                builder.position_at_end(case)
                by_kind = builder.switch(kind, exit_block)
                for kd in _DECODED:
                    kcase = builder.append_basic_block(f"qtile_m{rows}_k{kd}")
                    by_kind.add_case(ir.Constant(_I64, kd), kcase)
                    builder.position_at_end(kcase)
                    _emit_loop(g, kd, rows, loop_args, exit_block, npan, pairs)
            builder.position_at_end(exit_block)
            return context.get_dummy_value()

        return sig, codegen

    return qtile


MAX_ROWS = 8  # rows of one pass (more rows: passes of 8, then the rest)
_wide = _make_qtile(16, MAX_ROWS)  # 512-bit: mr accumulators of one panel
_narrow = _make_qtile(8, 4)  # 256-bit, 1-4 rows: 2 mr accumulators (two halves of a panel)
_half = _make_qtile(8, MAX_ROWS, lanes=8, pairs=4)  # 256-bit, 5-8 rows: one half panel per pass
PAIR_ROWS = 2  # 256-bit: up to this many rows run over two panels at once (512-bit: always)
_narrow2 = _make_qtile(8, PAIR_ROWS, npan=2)
_wide2 = _make_qtile(16, MAX_ROWS, npan=2)  # 512-bit: also passes of up to 8 rows over two panels


@njit(cache=True)
def _qtile_rows(kind, wide, xa, ldx, rows, wa, kdim, oa, ldo):
    """out[0:rows, 0:16] = x[0:rows, 0:kdim] @ one panel of ``kind`` (addresses; strides in
    floats). Up to 8 rows in one pass (each weight decoded once for all of them), more in
    passes of 8 then the rest: every output is the same FMA chain over k whatever ``rows``."""
    if kind == 0:
        _tile_rows(xa, ldx, rows, wa, PANEL, kdim, oa, ldo)
        return
    nb = kdim // 32
    m0 = 0
    while m0 < rows:
        mr = min(rows - m0, MAX_ROWS)
        xo = xa + m0 * ldx * 4
        oo = oa + m0 * ldo * 4
        if wide:
            _wide(kind, mr, xo, ldx, wa, 0, nb, oo, ldo, 0)
        elif mr <= 4:
            _narrow(kind, mr, xo, ldx, wa, 0, nb, oo, ldo, 0)
        else:
            _half(kind, mr, xo, ldx, wa, 0, nb, oo, ldo, 0)
            _half(kind, mr, xo, ldx, wa, 0, nb, oo, ldo, 8)
        m0 += mr


@njit(cache=True)
def _qpair(kind, wide, xa, ldx, rows, wa, pstride, kdim, oa, ldo):
    """:func:`_qtile_rows` over two adjacent panels at once: up to ``PAIR_ROWS`` rows
    (256-bit), any number in passes of up to 8 (512-bit). Few rows get twice the independent
    FMA chains (otherwise bound by FMA latency, not by the ports); many rows read each x
    value once for two panels (prompt rows ~6 % faster than one panel a pass)."""
    if wide:
        m0 = 0
        while m0 < rows:
            mr = min(rows - m0, MAX_ROWS)
            _wide2(kind, mr, xa + m0 * ldx * 4, ldx, wa, pstride, kdim // 32, oa + m0 * ldo * 4, ldo, 0)
            m0 += mr
    else:
        _narrow2(kind, rows, xa, ldx, wa, pstride, kdim // 32, oa, ldo, 0)


@njit(parallel=True, cache=True)
def qlinear(x, blob, mat, out, wide):
    """out[M, P*16] = x[M, K] @ W^T for the native matrix ``mat`` = (kind, byte offset in
    ``blob``, panels P, K) of the uint8 ``blob``; x, out C-contiguous fp32; ``wide``:
    512-bit tiles. Two panels per parallel step (512-bit; 256-bit up to ``PAIR_ROWS``
    rows), else one; each weight is decoded once per pass of up to 8 rows."""
    m_rows = x.shape[0]
    kind = mat[0]
    pbytes = panel_bytes(kind, mat[3])
    base = blob.ctypes.data + mat[1]
    n_out = out.shape[1]
    pair = kind != 0 and (wide or m_rows <= PAIR_ROWS)
    jobs = (mat[2] + 1) // 2 if pair else mat[2]
    for job in prange(jobs):
        p = 2 * job if pair else job
        if pair and p + 1 < mat[2]:
            _qpair(kind, wide, x.ctypes.data, x.shape[1], m_rows, base + p * pbytes, pbytes, mat[3],
                   out.ctypes.data + p * 64, n_out)
        else:
            _qtile_rows(kind, wide, x.ctypes.data, x.shape[1], m_rows, base + p * pbytes, mat[3],
                        out.ctypes.data + p * 64, n_out)


@njit(cache=True)
def panel_bytes(kind, kdim):
    """Bytes of one panel (16 outputs x kdim inputs) of ``kind`` (F32: any kdim; else kdim % 32 == 0)."""
    return kdim * 64 if kind == 0 else (kdim // 32) * BLOCK_BYTES[kind]


@njit(cache=True)
def _h2f(h):
    """fp16 bits -> fp32 value (exact; NaN payloads are not kept)."""
    e = (h >> 10) & 31
    f = h & 1023
    if e == 0:
        v = np.float32(f) * np.float32(2.0 ** -24)
    elif e == 31:
        v = np.float32(np.inf) if f == 0 else np.float32(np.nan)
    else:
        v = np.float32(1024 + f) * np.float32(2.0 ** (e - 25))
    return -v if h & 32768 else v


@njit(fastmath={"contract"}, cache=True)
def qrow(blob, mat, r, out):
    """out[0:K] = row ``r`` (output feature) of the native matrix ``mat`` decoded to fp32
    with the reference arithmetic (embedding lookups from a tied head)."""
    kind = mat[0]
    nb = mat[3] // 32
    bb = BLOCK_BYTES[kind]
    lane = r % 16
    base = mat[1] + (r // 16) * panel_bytes(kind, mat[3])
    bits = out.view(np.uint32)
    if kind == 0:
        for k in range(mat[3]):
            a = base + (k * 16 + lane) * 4
            bits[k] = np.uint32(blob[a]) | (np.uint32(blob[a + 1]) << 8) | (np.uint32(blob[a + 2]) << 16) \
                | (np.uint32(blob[a + 3]) << 24)
        return
    for blk in range(nb):
        o = base + blk * bb
        for k in range(32):
            if kind == 2:
                a = o + (k * 16 + lane) * 2
                bits[blk * 32 + k] = (np.uint32(blob[a]) | (np.uint32(blob[a + 1]) << 8)) << 16
                continue
            if kind == 1:
                a = o + (k * 16 + lane) * 2
                v = _h2f(np.int64(blob[a]) | (np.int64(blob[a + 1]) << 8))
            else:
                d = _h2f(np.int64(blob[o + 2 * lane]) | (np.int64(blob[o + 2 * lane + 1]) << 8))
                if kind == 3:
                    q = np.int64(blob[o + 32 + k * 16 + lane])
                    v = d * np.float32(q - 256 if q >= 128 else q)
                else:
                    hdr = 32 if kind == 4 else 64
                    byte = np.int64(blob[o + hdr + (k // 2) * 16 + lane])
                    q = (byte >> 4) if k % 2 else (byte & 15)
                    if kind == 4:
                        v = d * np.float32(q - 8)
                    else:
                        a = o + 32 + 2 * lane
                        mm = _h2f(np.int64(blob[a]) | (np.int64(blob[a + 1]) << 8))
                        v = d * np.float32(q) + mm
            out[blk * 32 + k] = v


@njit(cache=True)
def qembed(ids, blob, mat):
    """[T] ids -> [T, K] rows of the native matrix ``mat`` (the embedding or tied head)."""
    h = np.empty((ids.shape[0], mat[3]), np.float32)
    for i in range(ids.shape[0]):
        qrow(blob, mat, ids[i], h[i])
    return h


def forward_native(ids, pos, start, mask, n_out, n_logits, blob, mats, ln1, ln2, normw, cos, sin, kt, vc,
                   heads, kvh, inter, eps, wide):
    """:func:`forward` over native matrices: ``mats`` [4 L + 2, 4] int64 rows
    (kind, offset, panels, K) of ``blob``: per layer wqkv, wo, wgu, wd (rows 4 l .. 4 l + 3),
    then the LM head (4 L) and the embedding (4 L + 1, the head's row when tied)."""
    h = qembed(ids, blob, mats[4 * ln1.shape[0] + 1])
    return forward_layers(h, pos, start, mask, n_out, n_logits, ln1, ln2, normw, cos, sin, kt, vc, heads, kvh,
                          inter, eps, NO_FP32, (blob, mats, wide))


NO_FP32 = tuple(np.zeros((0,) * n, np.float32) for n in (4, 4, 4, 4, 3))  # no packed fp32 weights
NO_NATIVE = (np.zeros(0, np.uint8), np.zeros((0, 4), np.int64), False)  # no native matrices


@njit(cache=True)
def _matmul(x, i, out, fp32, nat):
    """out = x @ matrix i = 4 layer + (0..3: wqkv, wo, wgu, wd), or 4 L: the LM head: the
    native matrix when ``nat`` = (blob, mats, wide) has any, else the packed fp32 panels of
    ``fp32`` = (wqkv, wo, wgu, wd, lm)."""
    blob, mats, wide = nat
    if mats.shape[0]:
        qlinear(x, blob, mats[i], out, wide)
        return
    layer, j = i // 4, i % 4
    if layer == fp32[0].shape[0]:
        linear(x, fp32[4], out)
    elif j == 0:
        linear(x, fp32[0][layer], out)
    elif j == 1:
        linear(x, fp32[1][layer], out)
    elif j == 2:
        linear(x, fp32[2][layer], out)
    else:
        linear(x, fp32[3][layer], out)


@njit(cache=True)
def _width(i, fp32, mats):
    """Output features (panels x 16) of matrix i (as :func:`_matmul`)."""
    if mats.shape[0]:
        return mats[i, 2] * 16
    if i // 4 == fp32[0].shape[0]:
        return fp32[4].shape[0] * 16
    if i == 0:
        return fp32[0].shape[1] * 16
    if i == 1:
        return fp32[1].shape[1] * 16
    if i == 2:
        return fp32[2].shape[1] * 16
    return fp32[3].shape[1] * 16


@njit(cache=True)
def forward_layers(h, pos, start, mask, n_out, n_logits, ln1, ln2, normw, cos, sin, kt, vc, heads, kvh, inter,
                   eps, fp32, nat):
    """The forward of both runtimes from input rows h [T, d] (fp32, overwritten): every
    layer, the final norm and the LM head; weight multiplies by :func:`_matmul` (native
    matrices ``nat`` = (blob, mats, wide), or packed fp32 panels ``fp32`` = (wqkv, wo, wgu,
    wd, lm) when ``nat`` has none). Other arguments and the result: :func:`forward`."""
    rows, d = h.shape
    hd = cos.shape[1]
    layers = ln1.shape[0]
    mats = nat[1]
    scale = np.float32(1.0 / math.sqrt(hd))
    xn = np.empty((rows, d), np.float32)
    qkv = np.empty((rows, _width(0, fp32, mats)), np.float32)
    att = np.empty((rows, heads * hd), np.float32)
    proj = np.empty((rows, _width(1, fp32, mats)), np.float32)
    gu = np.empty((rows, _width(2, fp32, mats)), np.float32)
    act = np.empty((rows, inter), np.float32)
    down = np.empty((rows, _width(3, fp32, mats)), np.float32)
    conc = np.zeros((rows, heads), np.float32)
    qw = heads * hd
    kw = kvh * hd
    for layer in range(layers):
        _rmsnorm(h, ln1[layer], eps, xn)
        _matmul(xn, 4 * layer, qkv, fp32, nat)
        _rope(qkv, 0, heads, hd, cos, sin, pos)
        _rope(qkv, qw, kvh, hd, cos, sin, pos)
        for i in range(rows):
            slot = start + i
            for g in range(kvh):
                for e in range(hd):
                    kt[layer, g, e, slot] = qkv[i, qw + g * hd + e]
                    vc[layer, g, slot, e] = qkv[i, qw + kw + g * hd + e]
        _attention(qkv, heads, kvh, hd, kt, vc, layer, start, mask, scale, att, conc)
        _matmul(att, 4 * layer + 1, proj, fp32, nat)
        for i in range(rows):
            for j in range(d):
                h[i, j] += proj[i, j]
        _rmsnorm(h, ln2[layer], eps, xn)
        _matmul(xn, 4 * layer + 2, gu, fp32, nat)
        _silu_mul(gu, inter, act)
        _matmul(act, 4 * layer + 3, down, fp32, nat)
        for i in range(rows):
            for j in range(d):
                h[i, j] += down[i, j]
    tail = np.ascontiguousarray(h[rows - n_out:])
    hidden = np.empty((n_out, d), np.float32)
    _rmsnorm(tail, normw, eps, hidden)
    logits = np.empty((n_logits, _width(4 * layers, fp32, mats)), np.float32)
    _matmul(np.ascontiguousarray(hidden[n_out - n_logits:]), 4 * layers, logits, fp32, nat)
    cout = np.empty(n_out, np.float32)
    for i in range(n_out):
        cout[i] = conc[rows - n_out + i].sum() / heads
    return logits, hidden, cout


def forward(ids, pos, start, mask, n_out, n_logits, emb, emb_packed, ln1, wqkv, wo, ln2, wgu, wd, normw, lm,
            cos, sin, kt, vc, heads, kvh, inter, eps):
    """One forward of a Llama-style decoder over T fed tokens with a static KV cache.

    ids, pos: [T] int64 token ids and rotary positions; the fed tokens' keys / values are
    written to cache slots start..start+T-1; mask: [T, T] uint8 visibility among fed rows
    (causal = lower triangle; a tree mask for tree verification); slots < start are
    visible to every row. Weights: emb [V, d] (or, when ``emb_packed``, the embedding is
    the tied head ``lm`` and is read from its panels); ln1, ln2 [L, d]; wqkv [L, P, d, 16]
    (q, k, v rows); wo [L, P, H hd, 16]; wgu [L, P, d, 16] (gate rows then up rows);
    wd [L, P, inter, 16]; normw [d]; lm [P, d, 16]. cos, sin: [cap, hd] tables.
    kt: [L, KVH, hd, cap]; vc: [L, KVH, cap, hd].

    Returns (logits [n_logits, P_lm*16] of the last n_logits <= n_out rows, hidden
    [n_out, d] of the last n_out rows after the final norm, conc [n_out] last-layer
    attention concentration: mean over heads of the max weight).
    """
    h = kernels.embed(ids, emb, emb_packed, lm)
    return forward_rows(h, pos, start, mask, n_out, n_logits, ln1, wqkv, wo, ln2, wgu, wd, normw, lm,
                        cos, sin, kt, vc, heads, kvh, inter, eps)


def forward_rows(h, pos, start, mask, n_out, n_logits, ln1, wqkv, wo, ln2, wgu, wd, normw, lm,
                 cos, sin, kt, vc, heads, kvh, inter, eps):
    """:func:`forward` from input rows h [T, d] (fp32, overwritten) instead of token ids:
    :func:`forward_layers` (the one forward of both weight layouts) over these packed fp32
    panels."""
    return forward_layers(h, pos, start, mask, n_out, n_logits, ln1, ln2, normw, cos, sin, kt, vc, heads, kvh,
                          inter, eps, (wqkv, wo, wgu, wd, lm), NO_NATIVE)
