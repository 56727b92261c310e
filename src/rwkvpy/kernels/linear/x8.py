"""Integer products of the block formats (the fast policy on AVX2 CPUs): the activations rounded
to int8 (int16 for Q8_0) blocks, the weights repacked once into groups of 8 interleaved rows
(kernels/ir/x8.py describes the record layout); numba drivers for one vector and for prompts
(4 vectors per pass over a group's codes), the repacking and its inverse, and the groups
decoded to float32 for exact tiles.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..ir import rows as _ir_rows
from ..ir import vecmath as _vm
from ..ir import x8 as _ir_x8
from ..kinds import BLOCK_KINDS, Kind
from .dispatch import by_kind
from .rows import _dec_row, _dot_row, _rd32
from .streams import stream_groups
from .threads import _row_chunk, _rows_kernel

_CACHE = {"cache": True, "nogil": True}
#: Vectors of a prompt per pass over a chunk of int8-group rows (_mvx8_groups).
X8_TOKENS = 64
_Q8_0 = int(Kind.Q8_0)
#: Per block kind (Q4_0 .. Q8_0): ggml's bytes per block, whether the block holds m, qh.
_BLOCK_BYTES = tuple(k.chunk_bytes for k in BLOCK_KINDS)
_HAS_MIN = tuple(int(k.has_min) for k in BLOCK_KINDS)
_HAS_QH = tuple(int(k.has_high_bits) for k in BLOCK_KINDS)


# --- int8 activations (ggml's method; AVX2): ir.rows.dotq_* ---------------------------------


@njit(**_CACHE)
def _quantize_x(x2, xq2, dx2, sx2, qmax):
    """Each row of x2 (T, K) as integer blocks of 32: dx = amax / qmax, xq = round(x / dx)
    (|xq| <= qmax: 127 into int8 ``xq2``, 32767 into int16), sx = dx * (sum of the block's
    xq) (float32); a block holding a NaN or an infinity gets dx = NaN, so that the products
    come out NaN as in float arithmetic (the rounding would hide it). ir.vecmath.quantize_blocks."""
    for t in range(x2.shape[0]):
        _vm.quantize_blocks(x2[t], xq2[t], dx2[t], sx2[t], dx2.shape[1], qmax)


@njit(parallel=True, **_CACHE)
def _quantize_par(x2, xq2, dx2, sx2, qmax):
    """_quantize_x with the vectors across numba's threads (one vector: serially)."""
    if x2.shape[0] > 1:
        for t in prange(x2.shape[0]):
            _quantize_x(x2[t : t + 1], xq2[t : t + 1], dx2[t : t + 1], sx2[t : t + 1], qmax)
    else:
        _quantize_x(x2, xq2, dx2, sx2, qmax)


#: row . int8 blocks of each block kind (dispatch.by_kind)
_dotq_row = by_kind(
    (
        _ir_rows.dotq_q4_0,
        _ir_rows.dotq_q4_1,
        _ir_rows.dotq_q5_0,
        _ir_rows.dotq_q5_1,
        _ir_rows.dotq_q8_0,
    )
)


# --- the 8-row interleaved layout of Int8DotLinear (record layout: kernels/ir/x8.py) -----


@njit(inline="always", **_CACHE)
def _x8_geom(kind):
    """A block kind's (Q4_0 .. Q8_0) ggml block bytes, has m, has qh, dwords of codes per
    block, the record's offsets of m, qh and codes (the layout of kernels/ir/x8.py,
    _x8_layout; the repack round trip is tested against the kernels), and the block's offsets
    of qh and codes."""
    bb, hm, hq = _BLOCK_BYTES[kind], _HAS_MIN[kind], _HAS_QH[kind]
    sq = 2 + 2 * hm + 4 * hq  # d, m, qh, then the codes
    return (bb, hm, hq, (bb - sq) // 4, 16, 16 + 16 * hm, 16 + 16 * hm + 32 * hq, 2 + 2 * hm, sq)


# The record of a block column (kernels/ir/x8.py) holds, for each of the 8 rows, the same
# dwords of codes as ggml's block: dword w of row r's codes is record bytes co + 32w + 4r.
# (For Q4: byte 4r+t of vector w is ggml's byte 4w+t, low nibble code 4w+t, high nibble code
# 16+4w+t.) Q5's qh is transposed bitwise: bit 4j+t of row r's qh -> bit j of byte 4r+t.


@njit(**_CACHE)
def _repack_groups(kind, raw2, pk, g0, g1):
    """pk[g] = rows 8g .. 8g+7 of raw2 in the interleaved layout, for g in [g0, g1)."""
    bb, hm, hq, nw, mo, qo, co, sqh, sq = _x8_geom(kind)
    rec = 8 * bb
    nb = raw2.shape[1] // bb
    for g in range(g0, g1):
        dst = pk[g]
        for i in range(nb):
            for r in range(8):
                src = raw2[8 * g + r]
                o, s = i * rec, i * bb
                dst[o + 2 * r] = src[s]
                dst[o + 2 * r + 1] = src[s + 1]
                if hm:
                    dst[o + mo + 2 * r] = src[s + 2]
                    dst[o + mo + 1 + 2 * r] = src[s + 3]
                for w in range(nw):
                    a, b = o + co + 32 * w + 4 * r, s + sq + 4 * w
                    dst[a] = src[b]
                    dst[a + 1] = src[b + 1]
                    dst[a + 2] = src[b + 2]
                    dst[a + 3] = src[b + 3]
                if hq:
                    qh = _rd32(src, s + sqh)
                    for t in range(4):
                        v = 0
                        for j in range(8):
                            v |= ((qh >> (4 * j + t)) & 1) << j
                        dst[o + qo + 4 * r + t] = np.uint8(v)


@njit(parallel=True, **_CACHE)
def _repack_par(kind, raw2, pk, chunk):
    n_chunks = (pk.shape[0] + chunk - 1) // chunk
    for c in prange(n_chunks):
        _repack_groups(kind, raw2, pk, c * chunk, min(pk.shape[0], (c + 1) * chunk))


@njit(**_CACHE)
def _unpack_row(kind, pk, r, row):
    """row (ggml's bytes) = row r of the interleaved groups ``pk`` (inverse of the above)."""
    bb, hm, hq, nw, mo, qo, co, sqh, sq = _x8_geom(kind)
    rec = 8 * bb
    nb = row.shape[0] // bb
    src, rr = pk[r >> 3], r & 7
    for i in range(nb):
        o, s = i * rec, i * bb
        row[s] = src[o + 2 * rr]
        row[s + 1] = src[o + 2 * rr + 1]
        if hm:
            row[s + 2] = src[o + mo + 2 * rr]
            row[s + 3] = src[o + mo + 1 + 2 * rr]
        for w in range(nw):
            a, b = o + co + 32 * w + 4 * rr, s + sq + 4 * w
            row[b] = src[a]
            row[b + 1] = src[a + 1]
            row[b + 2] = src[a + 2]
            row[b + 3] = src[a + 3]
        if hq:
            qh = 0
            for t in range(4):
                v = np.int64(src[o + qo + 4 * rr + t])
                for j in range(8):
                    qh |= ((v >> j) & 1) << (4 * j + t)
            for b in range(4):
                row[s + sqh + b] = np.uint8((qh >> (8 * b)) & 255)


@njit(**_CACHE)
def _mvx8w_groups(pk, xw2, dx2, y2, g0, g1):
    nb, T = dx2.shape[1], xw2.shape[0]
    if T == 1:  # one vector: ir.x8.X8_STREAMS groups at once (see _mvx8_groups)
        ns = _ir_x8.X8_STREAMS
        q = stream_groups(g1 - g0, pk.strides[0], ns)
        for i in range(q):
            _ir_x8.dotsx8w_q8_0(pk, g0 + i, q, xw2, dx2, nb, y2, 0)
        g0 += ns * q
    for t0 in range(0, T, X8_TOKENS):  # tiles of tokens as _mvx8_groups takes them
        t1 = min(T, t0 + X8_TOKENS)
        n4 = (t1 - t0) // 4
        for g in range(g0, g1):
            if n4:
                _ir_x8.dotx8wt_q8_0(pk, g, xw2, dx2, nb, y2, t0, n4)
            for t in range(t0 + 4 * n4, t1):
                _ir_x8.dotx8w_q8_0(pk, g, xw2, dx2, nb, y2, t)


@njit(**_CACHE)
def _mvx8w_tail(tail, x2, y2, n8):
    nb = x2.shape[1] // 32
    for r in range(tail.shape[0]):
        for t in range(x2.shape[0]):
            y2[t, n8 + r] = _dot_row(_Q8_0, tail[r], x2[t], nb)  # the exact float kernel


@njit(**_CACHE)
def _mvx8w(pk, tail, x2, y2):
    T, K = x2.shape
    xw2 = np.empty((T, K), np.int16)
    dx2 = np.empty((T, K // 32), np.float32)
    _quantize_x(x2, xw2, dx2, np.empty((T, K // 32), np.float32), 32767.0)
    _mvx8w_groups(pk, xw2, dx2, y2, np.int64(0), pk.shape[0])
    _mvx8w_tail(tail, x2, y2, 8 * pk.shape[0])


@njit(parallel=True, **_CACHE)
def _mvx8w_par(pk, tail, x2, y2, chunk):
    T, K = x2.shape
    xw2 = np.empty((T, K), np.int16)
    dx2 = np.empty((T, K // 32), np.float32)
    _quantize_par(x2, xw2, dx2, np.empty((T, K // 32), np.float32), 32767.0)
    G = pk.shape[0]
    n_chunks = (G + chunk - 1) // chunk
    for c in prange(n_chunks):
        _mvx8w_groups(pk, xw2, dx2, y2, c * chunk, min(G, (c + 1) * chunk))
    _mvx8w_tail(tail, x2, y2, 8 * G)


#: a group's 8 rows decoded, per block kind
_deqx8 = by_kind(
    (_ir_x8.deqx8_q4_0, _ir_x8.deqx8_q4_1, _ir_x8.deqx8_q5_0, _ir_x8.deqx8_q5_1, _ir_x8.deqx8_q8_0)
)


@njit(**_CACHE)
def _dec_rows_x8(kind, pk, tail, out, base, r0, r1, qk):
    """out[r - base] = dequantize(row r) for r in [r0, r1), rows stored interleaved in
    ``pk`` (8 per group) and the last ``len(tail)`` rows as ggml's rows in ``tail``."""
    n8 = 8 * pk.shape[0]
    nb = out.shape[1] // qk
    scratch = np.empty((8 if r0 % 8 or r1 % 8 else 0, out.shape[1]), np.float32)
    r = r0
    while r < min(r1, n8):
        g = r >> 3
        if r % 8 == 0 and r + 8 <= r1:
            _deqx8(kind, (pk, g, out, r - base, nb))
            r += 8
        else:  # part of a group: all of it into scratch, the rows asked for copied out
            _deqx8(kind, (pk, g, scratch, 0, nb))
            e = min(r1, 8 * g + 8)
            out[r - base : e - base] = scratch[r - 8 * g : e - 8 * g]
            r = e
    for r in range(max(r0, n8), r1):
        _dec_row(kind, tail[r - n8], out[r - base], qk)


@njit(parallel=True, **_CACHE)
def _dec_par_x8(kind, pk, tail, out, r0, r1, chunk, qk):
    n_chunks = (r1 - r0 + chunk - 1) // chunk
    for c in prange(n_chunks):
        a = r0 + c * chunk
        _dec_rows_x8(kind, pk, tail, out, r0, a, min(r1, a + chunk), qk)


#: a group's 8 rows . one vector of int8 blocks, per block kind
_dotx8 = by_kind(
    (_ir_x8.dotx8_q4_0, _ir_x8.dotx8_q4_1, _ir_x8.dotx8_q5_0, _ir_x8.dotx8_q5_1, _ir_x8.dotx8_q8_0)
)
_dotx8t_kind = by_kind(
    (
        _ir_x8.dotx8t_q4_0,
        _ir_x8.dotx8t_q4_1,
        _ir_x8.dotx8t_q5_0,
        _ir_x8.dotx8t_q5_1,
        _ir_x8.dotx8t_q8_0,
    )
)


@njit(**_CACHE)
def _dotx8t(kind, pk, g, xq2, dx2, sx2, nb, y2, t, n4):
    """Rows 8g .. 8g+7 for the vectors t .. t + 4 n4 - 1 of x2, n4 passes of 4 vectors,
    each unpacking the codes once (the loop over the passes inside the kernel). Called, not
    inlined: the 5 formats' kernels inlined into _mvx8_groups' loop compile to slower code
    (docs/kernels.md)."""
    _dotx8t_kind(kind, (pk, g, xq2, dx2, sx2, nb, y2, t, n4))


#: X8_STREAMS groups a stride apart . the one vector, per block kind
_dotsx8 = by_kind(
    (
        _ir_x8.dotsx8_q4_0,
        _ir_x8.dotsx8_q4_1,
        _ir_x8.dotsx8_q5_0,
        _ir_x8.dotsx8_q5_1,
        _ir_x8.dotsx8_q8_0,
    )
)


@njit(**_CACHE)
def _mvx8_groups(kind, pk, xq2, dx2, sx2, y2, g0, g1):
    """Groups g0 .. g1 for every vector of x2, X8_TOKENS vectors at a time: each group's
    record is read once per tile and the tile's int8 activations stay in the core's cache
    (one pass over all T vectors per group would read them from the shared cache, slower:
    docs/kernels.md). One vector: ir.x8.X8_STREAMS streams of stream_groups' groups read at
    once, then the groups after the streams' end one by one (the loop below)."""
    nb, T = dx2.shape[1], xq2.shape[0]
    if T == 1:
        ns = _ir_x8.X8_STREAMS
        q = stream_groups(g1 - g0, pk.strides[0], ns)
        for i in range(q):
            _dotsx8(kind, (pk, g0 + i, q, xq2, dx2, sx2, nb, y2, 0))
        g0 += ns * q
    for t0 in range(0, T, X8_TOKENS):
        t1 = min(T, t0 + X8_TOKENS)
        n4 = (t1 - t0) // 4
        for g in range(g0, g1):
            if n4:
                _dotx8t(kind, pk, g, xq2, dx2, sx2, nb, y2, t0, n4)
            for t in range(t0 + 4 * n4, t1):
                _dotx8(kind, (pk, g, xq2, dx2, sx2, nb, y2, t))


@njit(**_CACHE)
def _mvx8_tail(kind, tail, xq2, dx2, sx2, y2, n8):
    nb = dx2.shape[1]
    for r in range(tail.shape[0]):
        for t in range(xq2.shape[0]):
            y2[t, n8 + r] = _dotq_row(kind, (tail[r], xq2[t], dx2[t], sx2[t], nb))


@njit(**_CACHE)
def _mvx8(kind, pk, tail, x2, y2):
    """Serial: x2 rounded to int8 blocks, then every group and the tail rows."""
    T, K = x2.shape
    xq2 = np.empty((T, K), np.int8)
    dx2 = np.empty((T, K // 32), np.float32)
    sx2 = np.empty((T, K // 32), np.float32)
    _quantize_x(x2, xq2, dx2, sx2, 127.0)
    _mvx8_groups(kind, pk, xq2, dx2, sx2, y2, np.int64(0), pk.shape[0])
    _mvx8_tail(kind, tail, xq2, dx2, sx2, y2, 8 * pk.shape[0])


@njit(parallel=True, **_CACHE)
def _mvx8_par(kind, pk, tail, x2, y2, chunk):
    """Parallel over chunks of ``chunk`` groups (x2 rounded first: _quantize_par)."""
    T, K = x2.shape
    xq2 = np.empty((T, K), np.int8)
    dx2 = np.empty((T, K // 32), np.float32)
    sx2 = np.empty((T, K // 32), np.float32)
    _quantize_par(x2, xq2, dx2, sx2, 127.0)
    G = pk.shape[0]
    n_chunks = (G + chunk - 1) // chunk
    for c in prange(n_chunks):
        _mvx8_groups(kind, pk, xq2, dx2, sx2, y2, c * chunk, min(G, (c + 1) * chunk))
    _mvx8_tail(kind, tail, xq2, dx2, sx2, y2, 8 * G)


def repack_x8(kind: int, raw2: np.ndarray) -> np.ndarray:
    """The whole groups of 8 rows of ``raw2`` ((out, row_bytes) uint8, Q4_0..Q5_1 = kind
    0..3) in the interleaved layout of kernels/ir/x8.py: (out // 8, 8 * row_bytes) uint8."""
    pk = np.empty((raw2.shape[0] // 8, 8 * raw2.shape[1]), np.uint8)
    _rows_kernel(
        lambda: _repack_groups(kind, raw2, pk, 0, pk.shape[0]),
        lambda n: _repack_par(kind, raw2, pk, max(1, _row_chunk(raw2.shape[0], n) // 8)),
        raw2.shape[0],
        raw2.shape[1] * 2,
    )
    return pk
