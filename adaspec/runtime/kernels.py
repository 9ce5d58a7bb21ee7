"""CPU kernels of the compiled runtime (numba + a hand-written LLVM micro-kernel).

Why these and not torch: on a 2-core AVX2 CPU an fp32 ``F.linear`` over 2-16 rows takes
the BLAS's matrix-matrix path, which costs ~1.6x one row although every weight is read
once either way; a verify of several tokens then costs far more than one token. Here one
micro-kernel computes a tile of MR rows x 16 output features from **pre-packed** weights
(panels ``[P, K, 16]``: 16 output features contiguous per input feature), so each weight
is read once for all rows and the rows cost arithmetic only (FMAs from registers):

    acc[m, 0:16] = 0;  for k in 0..K-1:  acc[m, :] = fma(x[m, k], W[k, 0:16], acc[m, :])

Every output is one sequential FMA chain over k, whatever MR (1-4) or the number of rows
is, so a row's result is **bit-identical** whether it is computed alone or inside a
verify of many rows (batch invariance). The same holds for every other op here (norms,
rotary, attention): each row is computed by the same code in the same order, with no
reassociation, so greedy verification under this runtime agrees with this runtime's
plain decoding token for token by construction.

numba compiles once per machine and caches the machine code under
``$ADASPEC_CACHE/numba`` (:data:`CACHE_DIR`; see :func:`adaspec.runtime.compiled.ensure_compiled`).
Importing this module sets numba up (:func:`_import_numba`) without changing
``os.environ``; nothing imports it before a compiled runner or a head drafter needs it.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

_SVML = "NUMBA_DISABLE_INTEL_SVML"


def _import_numba() -> tuple[ModuleType, Path]:
    """Import numba set up for these kernels, leaving the process environment as it was.

    numba reads ``NUMBA_DISABLE_INTEL_SVML`` once, when it is first imported; SVML must be
    off (a vectorised exp whose last bit may differ from the scalar one would break batch
    invariance), so the variable is set for that import only (unless the caller set it).
    The cache directory, ``$ADASPEC_CACHE/numba`` unless ``NUMBA_CACHE_DIR`` names another,
    goes into ``numba.config``, where the ``cache=True`` kernels below read it when they
    are decorated. Returns numba and the cache directory.
    """
    fresh, had_svml = "numba" not in sys.modules, _SVML in os.environ
    os.environ.setdefault(_SVML, "1")
    try:
        import numba
        from numba.core import config
    finally:
        if not had_svml:
            del os.environ[_SVML]
    if not fresh and config.USING_SVML:
        warnings.warn("numba was imported with Intel SVML before adaspec's kernels: set "
                      f"{_SVML}=1 before it, or the compiled runtime may lose batch invariance",
                      RuntimeWarning, stacklevel=3)
    # numba re-reads its NUMBA_* variables before each compilation when they changed:
    # take the restored environment in now, so that the cache directory set below stays
    config.reload_config()
    if "NUMBA_CACHE_DIR" not in os.environ:
        from .paths import cache_dir

        config.CACHE_DIR = str(cache_dir() / "numba")
    from .cache_lock import install

    install(Path(config.CACHE_DIR))  # one process at a time writes the cache (see there)
    return numba, Path(config.CACHE_DIR)


numba, CACHE_DIR = _import_numba()

import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

PANEL = 16  # output features per packed panel (two AVX2 vectors)
_F32 = ir.FloatType()
_V8 = ir.VectorType(_F32, 8)
_I64 = ir.IntType(64)
_I32 = ir.IntType(32)
_FAST = {"contract"}  # allow FMA contraction only: no reassociation, so sums keep their order


PREFETCH_AHEAD = 4096  # bytes: each tile step prefetches this far ahead of the panel row it reads


def broadcast_x(b: ir.IRBuilder, xp: ir.Value, ldx: ir.Value, m: int, k: ir.Value,
                vt: ir.VectorType) -> ir.Value:
    """IR: ``x[m, k]`` (row stride ``ldx`` floats from ``xp``) loaded once and splat to every
    lane of ``vt``; the one x broadcast of the fp32 and the native tiles."""
    xs = b.load(b.gep(xp, [b.add(b.mul(ir.Constant(_I64, m), ldx), k)]), align=4)
    xb = b.insert_element(ir.Constant(vt, ir.Undefined), xs, ir.Constant(_I32, 0))
    lanes = ir.Constant(ir.VectorType(_I32, vt.count), [0] * vt.count)
    return b.shuffle_vector(xb, ir.Constant(vt, ir.Undefined), lanes)


def close_loop(b: ir.IRBuilder, counter: ir.PhiInstr, phis: list, values: list, limit: ir.Value,
               again: ir.Block, out: ir.Block) -> None:
    """IR: end a counted loop at the builder's block: ``counter + 1`` and ``values`` feed
    ``counter`` and ``phis`` from this block; branch back to ``again`` while ``counter + 1 <
    limit``, else to ``out``, where the builder continues (the fp32 and the native tiles)."""
    here = b.block
    nxt = b.add(counter, ir.Constant(_I64, 1))
    counter.add_incoming(nxt, here)
    for phi, val in zip(phis, values):
        phi.add_incoming(val, here)
    b.cbranch(b.icmp_signed("<", nxt, limit), again, out)
    b.position_at_end(out)


def _make_tile(mr: int):
    """An intrinsic computing out[0:mr, 0:16] = x[0:mr, 0:K] @ panel[0:K, 0:16].

    Arguments are addresses and strides in floats: (x, ldx, panel, ldw, K, out, ldo); row k
    of the panel (16 floats) starts k * ldw floats in (16 for packed weights; the cache's
    row length for keys and values). Each step also prefetches the line PREFETCH_AHEAD
    bytes past the row it reads: the hardware prefetchers fall behind once the FMAs keep
    the core busy (measured on 60 packed 576x1536 layers: -17 % at 4 rows, -13 % at 8 and
    16 rows, within noise at 1 row).
    """

    @intrinsic
    def tile(typingctx, xa, ldx, wa, ldw, kd, oa, ldo):
        sig = types.void(*([types.intp] * 7))

        def codegen(context, builder, signature, args):
            xa, ldx, wa, ldw, kd, oa, ldo = args
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_V8, [_V8, _V8, _V8]), "llvm.fma.v8f32")
            i8p = ir.IntType(8).as_pointer()
            pf = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32]), "llvm.prefetch.p0")
            xp = builder.inttoptr(xa, _F32.as_pointer())
            wp = builder.inttoptr(wa, _F32.as_pointer())
            op = builder.inttoptr(oa, _F32.as_pointer())
            zero = ir.Constant(_V8, [0.0] * 8)
            pre = builder.block
            loop = builder.append_basic_block("tile_loop")
            done = builder.append_basic_block("tile_done")
            builder.branch(loop)
            builder.position_at_end(loop)
            k = builder.phi(_I64)
            k.add_incoming(ir.Constant(_I64, 0), pre)
            accs = []
            for _ in range(2 * mr):
                acc = builder.phi(_V8)
                acc.add_incoming(zero, pre)
                accs.append(acc)
            row = builder.gep(wp, [builder.mul(k, ldw)])  # panel row k: 16 floats
            ahead = builder.gep(builder.bitcast(row, i8p), [ir.Constant(_I64, PREFETCH_AHEAD)])
            builder.call(pf, [ahead, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
            w0 = builder.load(builder.bitcast(row, _V8.as_pointer()), align=4)
            w1 = builder.load(builder.bitcast(builder.gep(row, [ir.Constant(_I64, 8)]), _V8.as_pointer()),
                              align=4)
            new = []
            for m in range(mr):
                xb = broadcast_x(builder, xp, ldx, m, k, _V8)
                new.append(builder.call(fma, [xb, w0, accs[2 * m]]))
                new.append(builder.call(fma, [xb, w1, accs[2 * m + 1]]))
            close_loop(builder, k, accs, new, kd, loop, done)
            for m in range(mr):
                orow = builder.gep(op, [builder.mul(ir.Constant(_I64, m), ldo)])
                for half in range(2):
                    dst = builder.bitcast(builder.gep(orow, [ir.Constant(_I64, 8 * half)]), _V8.as_pointer())
                    builder.store(new[2 * m + half], dst, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


_tile1, _tile2, _tile3, _tile4 = (_make_tile(m) for m in (1, 2, 3, 4))


@njit(cache=True)
def _tile_rows(xa, ldx, rows, wa, ldw, kd, oa, ldo):
    """out[0:rows, 0:16] = x[0:rows, 0:kd] @ panel[0:kd, 0:16] (addresses; strides in floats;
    see :func:`_make_tile`), rows in blocks of 4 then 1-3: every output is the same
    sequential FMA chain over k whatever ``rows`` is."""
    m0 = 0
    while m0 + 4 <= rows:
        _tile4(xa + m0 * ldx * 4, ldx, wa, ldw, kd, oa + m0 * ldo * 4, ldo)
        m0 += 4
    rest = rows - m0
    if rest == 1:
        _tile1(xa + m0 * ldx * 4, ldx, wa, ldw, kd, oa + m0 * ldo * 4, ldo)
    elif rest == 2:
        _tile2(xa + m0 * ldx * 4, ldx, wa, ldw, kd, oa + m0 * ldo * 4, ldo)
    elif rest == 3:
        _tile3(xa + m0 * ldx * 4, ldx, wa, ldw, kd, oa + m0 * ldo * 4, ldo)


def panels(n: int) -> int:
    """Panels of 16 output features needed for ``n`` features."""
    return -(-n // PANEL)


def pack_weight(w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """[N, K] row-major weight (nn.Linear layout) -> [ceil(N/16), K, 16] panels (zero padded).

    ``out`` (optional, [P, K, 16] fp32) is filled in place, with no full-size temporary.
    """
    n, k = w.shape
    p = panels(n)
    if out is None:
        out = np.empty((p, k, PANEL), np.float32)
    full = n // PANEL
    out[:full] = w[: full * PANEL].reshape(full, PANEL, k).transpose(0, 2, 1)
    if full < p:
        out[full:] = 0.0
        out[full, :, : n - full * PANEL] = w[full * PANEL:].T
    return out


def unpack_weight(wp: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_weight`: [P, K, 16] panels -> [n, K] (a fresh array)."""
    p, k, _ = wp.shape
    return np.ascontiguousarray(wp.transpose(0, 2, 1).reshape(p * PANEL, k)[:n])


@njit(parallel=True, cache=True)
def linear(x, wp, out):
    """out[M, P*16] = x[M, K] @ W^T for packed W ``wp`` [P, K, 16]; all C-contiguous fp32.

    One panel per parallel step; each weight is read once for all M rows.
    """
    m_rows, kd = x.shape
    n_out = out.shape[1]
    for p in prange(wp.shape[0]):
        _tile_rows(x.ctypes.data, kd, m_rows, wp.ctypes.data + p * kd * 64, PANEL, kd,
                   out.ctypes.data + p * 64, n_out)


@njit(fastmath=_FAST, cache=True)
def _rmsnorm(x, w, eps, out):
    """out[T, d] = x / sqrt(mean(x^2) + eps) * w  (HF LlamaRMSNorm, fp32; sum in order)."""
    rows, d = x.shape
    for i in range(rows):
        ss = np.float32(0.0)
        for j in range(d):
            ss += x[i, j] * x[i, j]
        inv = np.float32(1.0) / np.float32(math.sqrt(ss / np.float32(d) + eps))
        for j in range(d):
            out[i, j] = w[j] * (x[i, j] * inv)


@njit(fastmath=_FAST, cache=True)
def _rope(v, base, heads, hd, cos, sin, pos):
    """In place: rotary embedding of ``heads`` heads of width hd at column ``base`` of v[T, :]."""
    half = hd // 2
    for i in range(v.shape[0]):
        c = cos[pos[i]]
        s = sin[pos[i]]
        for h in range(heads):
            o = base + h * hd
            for j in range(half):
                a = v[i, o + j]
                b = v[i, o + half + j]
                v[i, o + j] = a * c[j] - b * s[j]
                v[i, o + half + j] = b * c[half + j] + a * s[half + j]


@njit(parallel=True, fastmath=_FAST, cache=True)
def _attention(qkv, heads, kvh, hd, kt, vc, layer, start, mask, scale, out, conc):
    """Attention of T fed rows over the cache (slots < start) and the fed block (by mask).

    qkv: [T, >= (H + 2 KVH) hd] (rotary applied); kt: [L, KVH, hd, cap] keys, transposed;
    vc: [L, KVH, cap, hdp] values (hdp = hd rounded up to 16, zero padded); mask: [T, T]
    uint8 (row i sees fed row j); out: [T, H hd]; conc: [T, H] max attention weight per
    row and head. cap >= start + T rounded up to 16.

    One job per (row, KV head) serves its H / KVH query heads with the same micro-kernel as
    the linears (keys and values read once for the group, FMAs from registers):
        scores[a, s] = sum_e q[a, e] * K^T[e, s]      16 slots per tile, e in order
        out[a, :]   = sum_s p[a, s] * V[s, :] / sum_s p[a, s]   s in slot order
    so a row's result never depends on how many rows are fed with it.
    """
    rows = qkv.shape[0]
    group = heads // kvh
    cap = kt.shape[3]
    hdp = vc.shape[3]
    for job in prange(rows * kvh):
        i = job // kvh
        g = job % kvh
        kbase = kt.ctypes.data + (layer * kvh + g) * hd * cap * 4
        vbase = vc.ctypes.data + (layer * kvh + g) * cap * hdp * 4
        attend_group(qkv[i], g * group, group, hd, scale, kbase, cap, vbase, hdp, start, start + rows,
                     mask[i], out[i], conc[i])


@njit(fastmath=_FAST, cache=True)
def attend_group(qrow, h0, group, hd, scale, kbase, cap, vbase, hdp, start, total, mrow, orow, crow):
    """One fed row's attention for one KV head's group of query heads (heads h0 .. h0+group-1).

    qrow: [>= (H + 2 KVH) hd] the row's q/k/v (rotary applied); kbase / vbase: addresses of
    this layer and KV head's keys [hd, cap] (transposed) and values [cap, hdp]; slots <
    ``start`` are the cache, slots start .. total-1 the fed rows, visible where mrow[s - start]
    [T] uint8 is set; orow [H hd] and crow [H] (max attention weight) get this group's columns.
    The one body of :func:`_attention` and the batched attention (``batch_kernels``), so a
    row's result is the same whichever forward computes it.
    """
    width = (total + 15) // 16 * 16
    q = np.empty((group, hd), np.float32)
    for a in range(group):
        for e in range(hd):
            q[a, e] = qrow[(h0 + a) * hd + e] * scale
    sc = np.empty((group, width), np.float32)
    for b in range(width // 16):
        _tile_rows(q.ctypes.data, hd, group, kbase + b * 64, cap, hd, sc.ctypes.data + b * 64, width)
    inv = np.empty(group, np.float32)
    for a in range(group):
        mx = np.float32(-np.inf)
        for s in range(total):
            if s >= start and mrow[s - start] == 0:
                sc[a, s] = np.float32(-np.inf)
            elif sc[a, s] > mx:
                mx = sc[a, s]
        den = np.float32(0.0)
        best = np.float32(0.0)
        for s in range(total):
            p = np.float32(0.0) if sc[a, s] == -np.inf else np.float32(math.exp(sc[a, s] - mx))
            sc[a, s] = p
            den += p
            if p > best:
                best = p
        inv[a] = np.float32(1.0) / den
        crow[h0 + a] = best * inv[a]
    acc = np.empty((group, hdp), np.float32)
    for b in range(hdp // 16):
        _tile_rows(sc.ctypes.data, width, group, vbase + b * 64, hdp, total, acc.ctypes.data + b * 64, hdp)
    for a in range(group):
        for e in range(hd):
            orow[(h0 + a) * hd + e] = acc[a, e] * inv[a]


@njit(parallel=True, fastmath=_FAST, cache=True)
def _silu_mul(gu, inter, out):
    """out[T, inter] = silu(gu[:, :inter]) * gu[:, inter:2 inter] (elementwise, 2 threads)."""
    chunks = (inter + 255) // 256
    for job in prange(gu.shape[0] * chunks):
        i = job // chunks
        lo = (job % chunks) * 256
        for j in range(lo, min(lo + 256, inter)):
            g = gu[i, j]
            out[i, j] = g / (np.float32(1.0) + np.float32(math.exp(-g))) * gu[i, inter + j]


@njit(cache=True)
def embed(ids, emb, emb_packed, lm):
    """[T] ids -> [T, d] rows of emb [V, d], or of the tied head's panels lm [P, d, 16]."""
    d = lm.shape[1] if emb_packed else emb.shape[1]
    h = np.empty((ids.shape[0], d), np.float32)
    for i in range(ids.shape[0]):
        if emb_packed:
            h[i] = lm[ids[i] // 16, :, ids[i] % 16]
        else:
            h[i] = emb[ids[i]]
    return h


def threading_layer() -> str:
    """numba's threading layer in use (after the first parallel call)."""
    try:
        return numba.threading_layer()
    except ValueError:
        return "none"
