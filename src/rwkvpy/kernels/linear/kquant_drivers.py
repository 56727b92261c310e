"""The numba drivers of the K-quant products (kernels/kquants.py's linears, kernels/ir/kquants.py
and kquants_x8.py's kernels): rows exact and with Q8_K-like int8 activations, the 8-row groups,
their repacking and decoding, serial and parallel.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..ir import kquants as _kir
from ..ir import kquants_x8 as _kx8
from ..ir.kquants import KIND, KINDS, QK_K  # noqa: F401  (kernels/kquants.py reads them here)
from ..ir.kquants_x8 import X8_FIELDS, X8_KINDS, x8_table  # noqa: F401
from ..ir.x8 import X8_STREAMS
from .dispatch import by_kind
from .streams import stream_groups
from .x8 import X8_TOKENS

_NB = {"cache": True, "nogil": True}


#: The K-quant kernels by kind (KIND; dispatch.by_kind): row . vector, row . Q8_K blocks,
#: row decoded; for the interleaved kinds (X8_KINDS): a group . one vector, . 4 vectors per
#: pass, X8_STREAMS groups . one vector.
_dot = by_kind((_kir.kdot_q2_k, _kir.kdot_q3_k, _kir.kdot_q4_k, _kir.kdot_q5_k, _kir.kdot_q6_k))


_dotq = by_kind(
    (_kir.kdotq_q2_k, _kir.kdotq_q3_k, _kir.kdotq_q4_k, _kir.kdotq_q5_k, _kir.kdotq_q6_k)
)
_deq = by_kind((_kir.kdeq_q2_k, _kir.kdeq_q3_k, _kir.kdeq_q4_k, _kir.kdeq_q5_k, _kir.kdeq_q6_k))


@njit(**_NB)
def dec_row(kind, row, out):
    nb = out.shape[0] // QK_K
    _deq(kind, (row, out, nb))


@njit(**_NB)
def mv_rows(kind, raw2, x2, y2, r0, r1):
    """y2[t, r] = row r . x2[t] (exact) for r in [r0, r1)."""
    nb = x2.shape[1] // QK_K
    for r in range(r0, r1):
        row = raw2[r]
        for t in range(x2.shape[0]):
            y2[t, r] = _dot(kind, (row, x2[t], nb))


@njit(parallel=True, **_NB)
def mv_par(kind, raw2, x2, y2, chunk):
    n = raw2.shape[0]
    for c in prange((n + chunk - 1) // chunk):
        mv_rows(kind, raw2, x2, y2, c * chunk, min(n, (c + 1) * chunk))


@njit(**_NB)
def quantize_q8k(x, xq, dx, bs):
    """x (256 nb,) float32 -> Q8_K-like blocks xq (int8), dx (float32), bs (int16): see
    _quantize_q8k."""
    _kir._quantize_q8k_ir(x, xq, dx, bs, dx.shape[0])


@njit(**_NB)
def quantize_rows(x2, xq2, dx2, bs2):
    for t in range(x2.shape[0]):
        quantize_q8k(x2[t], xq2[t], dx2[t], bs2[t])


@njit(**_NB)
def mvq_rows(kind, raw2, xq2, dx2, bs2, y2, r0, r1):
    nb = dx2.shape[1]
    for r in range(r0, r1):
        row = raw2[r]
        for t in range(xq2.shape[0]):
            y2[t, r] = _dotq(kind, (row, xq2[t], dx2[t], bs2[t], nb))


@njit(**_NB)
def mvq(kind, raw2, x2, y2):
    T, K = x2.shape
    xq2 = np.empty((T, K), np.int8)
    dx2 = np.empty((T, K // QK_K), np.float32)
    bs2 = np.empty((T, K // 16), np.int16)
    quantize_rows(x2, xq2, dx2, bs2)
    mvq_rows(kind, raw2, xq2, dx2, bs2, y2, 0, raw2.shape[0])


@njit(parallel=True, **_NB)
def mvq_par(kind, raw2, x2, y2, chunk):
    T, K = x2.shape
    xq2 = np.empty((T, K), np.int8)
    dx2 = np.empty((T, K // QK_K), np.float32)
    bs2 = np.empty((T, K // 16), np.int16)
    quantize_rows(x2, xq2, dx2, bs2)
    n = raw2.shape[0]
    for c in prange((n + chunk - 1) // chunk):
        mvq_rows(kind, raw2, xq2, dx2, bs2, y2, c * chunk, min(n, (c + 1) * chunk))


@njit(**_NB)
def dec_rows(kind, raw2, out, base, r0, r1):
    """out[r - base] = row r dequantized (bit for bit ggml) for r in [r0, r1)."""
    for r in range(r0, r1):
        dec_row(kind, raw2[r], out[r - base])


@njit(parallel=True, **_NB)
def dec_par(kind, raw2, out, r0, r1, chunk):
    for c in prange((r1 - r0 + chunk - 1) // chunk):
        a = r0 + c * chunk
        dec_rows(kind, raw2, out, r0, a, min(r1, a + chunk))


# -- drivers of the 8-row groups (KQuantX8Linear) ---------------------------------------------


@njit(inline="always", **_NB)
def _x8_moves(table, f, i):
    """Field f of super-block i: (offset in a row, offset in the group's row of records, dwords
    or halves, unit). The last field ends the record: super-block bytes = its end / 8."""
    size = table[-1, 3] // 8 + table[-1, 1]
    off, n, unit, at = table[f, 0], table[f, 1], table[f, 2], table[f, 3]
    return i * size + off, i * 8 * size + at, n // unit, unit


@njit(**_NB)
def _q5k_recode(sec, tmp, back):
    """Q5_K's codes of one record, ``sec`` (1280 bytes: the moved qh, 8 x 32 bytes, then qs,
    32 x 32) into kernels/ir/kquants_x8.py's Q5K_QUARTER layout, in place; ``back``: the
    inverse. ``tmp``: at least 1280 bytes of scratch."""
    tmp[:1280] = sec[:1280]
    for p in range(32):  # byte 4r + t of every vector: row r, codes 4i + t
        for q in range(4):
            base = 320 * q
            for i in range(8):
                hp = base + 160 * (i // 4) + p
                vp = hp + 32 + 32 * (i % 4)
                sh = 2 * (i % 4)
                if back:
                    v = tmp[vp]
                    lo = v & 31
                    hi = (v >> 5) | (((tmp[hp] >> sh) & 3) << 3)
                    sec[256 + 32 * (8 * q + i) + p] = (lo & 15) | ((hi & 15) << 4)
                    h = sec[32 * i + p] if q else 0
                    sec[32 * i + p] = h | ((lo >> 4) << (2 * q)) | ((hi >> 4) << (2 * q + 1))
                else:
                    h, c = tmp[32 * i + p], tmp[256 + 32 * (8 * q + i) + p]
                    lo = (c & 15) | (((h >> (2 * q)) & 1) << 4)
                    hi = (c >> 4) | (((h >> (2 * q + 1)) & 1) << 4)
                    sec[vp] = lo | ((hi & 7) << 5)
                    old = sec[hp] if i % 4 else 0
                    sec[hp] = old | ((hi >> 3) << sh)


@njit(**_NB)
def _q6k_recode(sec, tmp, back):
    """Q6_K's codes of one record, ``sec`` (1536 bytes: the moved qh and ql of half 0, 8 and 16
    vectors of 32 bytes, then those of half 1) into kernels/ir/kquants_x8.py's Q6K_QUARTER
    layout, in place; ``back``: the inverse. ``tmp``: at least 1536 bytes of scratch."""
    tmp[:1536] = sec[:1536]
    for p in range(32):  # byte 4r + t of every vector: row r, codes 4i + t
        for q in range(4):
            half, kk = q // 2, q % 2
            for i in range(8):
                qp = 768 * half + 32 * i + p  # qh byte 4i + t of the half
                lp = 768 * half + 256 + 32 * (8 * kk + i) + p  # ql byte 32kk + 4i + t
                vp = 384 * q + 96 * (i // 2) + 32 * (i % 2) + p
                np_ = 384 * q + 96 * (i // 2) + 64 + p
                e = i % 2
                if back:
                    v = tmp[vp]
                    lo = v & 63
                    hi = ((tmp[np_] >> (4 * e)) & 15) | ((v >> 6) << 4)
                    sec[lp] = (lo & 15) | ((hi & 15) << 4)
                    h = sec[qp] if kk else 0
                    sec[qp] = h | ((lo >> 4) << (2 * kk)) | ((hi >> 4) << (4 + 2 * kk))
                else:
                    h, c = tmp[qp], tmp[lp]
                    lo = (c & 15) | (((h >> (2 * kk)) & 3) << 4)
                    hi = (c >> 4) | (((h >> (4 + 2 * kk)) & 3) << 4)
                    sec[vp] = lo | ((hi >> 4) << 6)
                    old = sec[np_] if e else 0
                    sec[np_] = old | ((hi & 15) << (4 * e))


@njit(**_NB)
def _recode(table, rec, i, tmp, back):
    """Recode the codes of super-block i's record in ``rec`` (x8_table's column 4)."""
    size = table[-1, 3] // 8 + table[-1, 1]
    for f in range(table.shape[0]):
        a = i * 8 * size + table[f, 3]
        if table[f, 4] == 3:
            _q5k_recode(rec[a : (i + 1) * 8 * size], tmp, back)
        elif table[f, 4] == 4:
            _q6k_recode(rec[a : (i + 1) * 8 * size], tmp, back)


@njit(**_NB)
def repack_groups(table, raw2, pk, g0, g1):
    """pk[g] = rows 8g .. 8g + 7 of raw2 (ggml's rows) as records of 8 rows (X8_FIELDS, as
    x8_table gives them, the codes then recoded where X8_RECODE says), for g in [g0, g1)."""
    size = table[-1, 3] // 8 + table[-1, 1]
    nb = pk.shape[1] // (8 * size)
    tmp = np.empty(8 * size, np.uint8)
    for g in range(g0, g1):
        rec = pk[g]
        for i in range(nb):
            for f in range(table.shape[0]):
                s, d, nw, unit = _x8_moves(table, f, i)
                for r in range(8):
                    row = raw2[8 * g + r]
                    for w in range(nw):
                        for c in range(unit):
                            rec[d + 8 * unit * w + unit * r + c] = row[s + unit * w + c]
            _recode(table, rec, i, tmp, False)


@njit(**_NB)
def unpack_groups(table, pk, raw2, g0, g1):
    """The inverse of repack_groups: rows 8 (g - g0) .. + 7 of raw2 = group g of pk."""
    size = table[-1, 3] // 8 + table[-1, 1]
    nb = pk.shape[1] // (8 * size)
    tmp = np.empty(8 * size, np.uint8)
    for g in range(g0, g1):
        rec = pk[g].copy()
        for i in range(nb):
            _recode(table, rec, i, tmp, True)
            for f in range(table.shape[0]):
                s, d, nw, unit = _x8_moves(table, f, i)
                for r in range(8):
                    row = raw2[8 * (g - g0) + r]
                    for w in range(nw):
                        for c in range(unit):
                            row[s + unit * w + c] = rec[d + 8 * unit * w + unit * r + c]


@njit(parallel=True, **_NB)
def repack_par(table, raw2, pk, chunk):
    G = pk.shape[0]
    for c in prange((G + chunk - 1) // chunk):
        repack_groups(table, raw2, pk, c * chunk, min(G, (c + 1) * chunk))


_dotx8 = by_kind((_kx8.dotx8_q4_k, _kx8.dotx8_q5_k, _kx8.dotx8_q6_k), X8_KINDS[0])
_dotx8t_kind = by_kind((_kx8.dotx8t_q4_k, _kx8.dotx8t_q5_k, _kx8.dotx8t_q6_k), X8_KINDS[0])


@njit(**_NB)
def _dotx8t(kind, pk, g, xq2, dx2, bs2, nb, y2, t, n4):
    """Called, not inlined (as kernels.linear._dotx8t: the three formats' prompt kernels
    inlined into one loop compile to slower code)."""
    _dotx8t_kind(kind, (pk, g, xq2, dx2, bs2, nb, y2, t, n4))


_dotsx8 = by_kind((_kx8.dotsx8_q4_k, _kx8.dotsx8_q5_k, _kx8.dotsx8_q6_k), X8_KINDS[0])


@njit(**_NB)
def mvx8_groups(kind, pk, xq2, dx2, bs2, y2, g0, g1):
    """Groups g0 .. g1 for every vector: one vector as X8_STREAMS streams of stream_groups'
    groups read at once (then the groups after the streams' end one by one); prompts in tiles
    of X8_TOKENS vectors, 4 per pass (kernels.linear._mvx8_groups' plan)."""
    nb, T = dx2.shape[1], xq2.shape[0]
    if T == 1:
        ns = X8_STREAMS
        q = stream_groups(g1 - g0, pk.strides[0], ns)
        for i in range(q):
            _dotsx8(kind, (pk, g0 + i, q, xq2, dx2, bs2, nb, y2, 0))
        g0 += ns * q
    for t0 in range(0, T, X8_TOKENS):
        t1 = min(T, t0 + X8_TOKENS)
        n4 = (t1 - t0) // 4
        for g in range(g0, g1):
            if n4:
                _dotx8t(kind, pk, g, xq2, dx2, bs2, nb, y2, t0, n4)
            for t in range(t0 + 4 * n4, t1):
                _dotx8(kind, (pk, g, xq2, dx2, bs2, nb, y2, t))


@njit(**_NB)
def _q8k_arrays(T, K):
    return (
        np.empty((T, K), np.int8),
        np.empty((T, K // QK_K), np.float32),
        np.empty((T, K // 16), np.int16),
    )


@njit(parallel=True, **_NB)
def quantize_par(x2, xq2, dx2, bs2):
    """quantize_rows with the vectors across numba's threads (one vector: serially)."""
    if x2.shape[0] > 1:
        for t in prange(x2.shape[0]):
            quantize_q8k(x2[t], xq2[t], dx2[t], bs2[t])
    else:
        quantize_rows(x2, xq2, dx2, bs2)


@njit(**_NB)
def mvx8(kind, pk, tail, x2, y2):
    """Serial: x2 rounded to Q8_K-like blocks, then every group, then the rows past the last
    whole group (ggml's rows in ``tail``, the row kernel: the same integers)."""
    T, K = x2.shape
    xq2, dx2, bs2 = _q8k_arrays(T, K)
    quantize_rows(x2, xq2, dx2, bs2)
    n8 = 8 * pk.shape[0]
    mvx8_groups(kind, pk, xq2, dx2, bs2, y2, np.int64(0), pk.shape[0])
    mvq_rows(kind, tail, xq2, dx2, bs2, y2[:, n8:], np.int64(0), tail.shape[0])


@njit(parallel=True, **_NB)
def mvx8_par(kind, pk, tail, x2, y2, chunk):
    """Parallel over chunks of ``chunk`` groups."""
    T, K = x2.shape
    xq2, dx2, bs2 = _q8k_arrays(T, K)
    quantize_par(x2, xq2, dx2, bs2)
    G = pk.shape[0]
    for c in prange((G + chunk - 1) // chunk):
        mvx8_groups(kind, pk, xq2, dx2, bs2, y2, c * chunk, min(G, (c + 1) * chunk))
    mvq_rows(kind, tail, xq2, dx2, bs2, y2[:, 8 * G :], np.int64(0), tail.shape[0])
