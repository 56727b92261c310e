"""Exact products on rows as ggml stores them (numba drivers around kernels/ir/rows.py).

Layout: a weight's bytes as ggml stores them, viewed as (out, row_bytes) uint8 (read-only), one
row of blocks per output; the kernels read the blocks directly (no repacking).

Numerics: every weight is decoded exactly as ggml's dequantize_row_* does (q*d, (q-8)*d, q*d + m
in float32, d and m widened from float16), then multiplied by its activation and added into one
of 32 float32 lane accumulators (one fused multiply-add); the lanes are summed at the end of the
row. So the result is the float32 ``dequantize(W) @ x`` with another summation order, NaN and
inf included. The row decoders for prompt tiles (``_dec_*``) are bit-exact; each row is handled
through a 1-D view ``raw2[r]`` in a separate function.

``kind`` (kernels.kinds.Kind) selects the format: one compiled driver serves every format.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir as _ir
from numba import njit, prange
from numba.core import types as _nbtypes
from numba.extending import intrinsic

from ..ir import rows as _ir_rows
from ..kinds import Kind
from .dispatch import by_kind
from .streams import stream_groups

_CACHE = {"cache": True, "nogil": True}
_F16, _BF16, _F32 = int(Kind.F16), int(Kind.BF16), int(Kind.F32)
#: The row kernels by kind (dispatch.by_kind): dequantize a row, row . vector (block and float
#: kinds), 4 float rows a stride apart . vector (each summed as _dot_row sums it:
#: ir.rows._row_dot_streams).
_DEQ = by_kind(
    (_ir_rows.deq_q4_0, _ir_rows.deq_q4_1, _ir_rows.deq_q5_0, _ir_rows.deq_q5_1, _ir_rows.deq_q8_0)
)
_DOT_BLOCKS = by_kind(
    (_ir_rows.dot_q4_0, _ir_rows.dot_q4_1, _ir_rows.dot_q5_0, _ir_rows.dot_q5_1, _ir_rows.dot_q8_0)
)
_DOT_FLOATS = by_kind((_ir_rows.dot_f16, _ir_rows.dot_bf16, _ir_rows.dot_f32), _F16)
_DOTS = by_kind((_ir_rows.dots_f16, _ir_rows.dots_bf16, _ir_rows.dots_f32), _F16)


@intrinsic
def _bits_to_f32(typingctx, v):
    """Reinterpret the low 32 bits of an integer as a float32."""
    sig = _nbtypes.float32(v)

    def codegen(context, builder, signature, args):
        val = args[0]
        if val.type.width != 32:
            val = builder.trunc(val, _ir.IntType(32))
        return builder.bitcast(val, _ir.FloatType())

    return sig, codegen


@intrinsic
def _f32_to_bits(typingctx, v):
    """The bits of a float32 as an int64 (0 .. 2^32 - 1)."""
    sig = _nbtypes.int64(_nbtypes.float32)

    def codegen(context, builder, signature, args):
        return builder.zext(builder.bitcast(args[0], _ir.IntType(32)), _ir.IntType(64))

    return sig, codegen


@njit(inline="always", **_CACHE)
def _h2f(h):
    """IEEE half bits (an int64 in 0..65535) -> float32, bit-exact for every input
    (normals, subnormals, signed zeros, inf, NaN payloads), selects instead of branches:
    the exponent is re-biased with integer adds, subnormals are renormalised by one float
    subtraction of normal numbers (exact, and unaffected by a denormals-are-zero mode)."""
    o = (h & 0x7FFF) << 13
    e = o & 0x0F800000
    o = o + (112 << 23) + (112 << 23) * (e == 0x0F800000)  # inf/NaN: exponent 255
    # a select, not arithmetic, so that NaN payloads pass through untouched
    sub = _bits_to_f32(o + (1 << 23)) - np.float32(6.103515625e-05)  # 2^-14
    f = sub if e == 0 else _bits_to_f32(o)
    return _bits_to_f32(_f32_to_bits(f) | ((h & 0x8000) << 16))


@njit(inline="always", **_CACHE)
def _rd16(row, o):
    return np.int64(row[o]) | (np.int64(row[o + 1]) << 8)


@njit(inline="always", **_CACHE)
def _rd32(row, o):
    return (
        np.int64(row[o])
        | (np.int64(row[o + 1]) << 8)
        | (np.int64(row[o + 2]) << 16)
        | (np.int64(row[o + 3]) << 24)
    )


# --- one row . one vector, per format: explicit LLVM vector code (kernels/ir/rows.py) -----


@njit(inline="always", **_CACHE)
def _float_at(kind, row, k):
    """Value k of a row of F32 (kind 7), F16 (5) or BF16 (6) values given as its bytes,
    as float32 (exact)."""
    if kind == _F32:
        return _bits_to_f32(_rd32(row, 4 * k))
    h = _rd16(row, 2 * k)
    return _bits_to_f32(h << 16) if kind == _BF16 else _h2f(h)


@njit(**_CACHE)
def _float_tail(kind, row, x, k0):
    """sum over k >= k0 of w[k] * x[k] for an F16/BF16/F32 row (rows of tiny models whose
    length is not a multiple of 32)."""
    s = np.float32(0)
    for k in range(k0, x.shape[0]):
        s += _float_at(kind, row, k) * x[k]
    return s


# --- one row -> float32, per format (bit for bit ggml's dequantize_row_*) ---------------


@njit(**_CACHE)
def _dec_row(kind, row, w, qk):
    """w = the row dequantized (kernels/ir/rows.py's deq_*: ggml's arithmetic, vector code)."""
    _DEQ(kind, (row, w, w.shape[0] // qk))


@njit(inline="always", **_CACHE)
def _dot_row(kind, row, x, nb):
    """The first ``32 * nb`` weights of a row of format ``kind`` . x (inlined into the
    drivers; ``nb`` computed once per matrix: a call or a division per row costs a
    noticeable share of a float product, and so does a tail test inside the row loop)."""
    if kind >= _F16:
        return _DOT_FLOATS(kind, (row, x, nb))
    return _DOT_BLOCKS(kind, (row, x, nb))


# --- drivers: ``kind`` selects the format (one compiled driver for all formats) ---------


@njit(**_CACHE)
def _mv_rows(kind, raw2, x2, y2, r0, r1, qk):
    """y2[t, r] = row r . x2[t] for r in [r0, r1), every t (serial; the row's bytes stay
    in L1 while the T vectors are done)."""
    T = x2.shape[0]
    nb = x2.shape[1] // qk
    r = r0
    if T == 1 and kind >= _F16:  # float rows, one vector: 4 streams of rows at once
        q = stream_groups(r1 - r0, raw2.strides[0], 4)
        for i in range(q):
            _DOTS(kind, (raw2, r0 + i, q, x2[0], y2[0], nb))
        r = r0 + 4 * q
    for r in range(r, r1):  # noqa: B020  (on from where the quarters stopped)
        row = raw2[r]
        for t in range(T):
            y2[t, r] = _dot_row(kind, row, x2[t], nb)
    if nb * qk < x2.shape[1]:  # float rows that do not end on a 32-value boundary
        for r in range(r0, r1):
            for t in range(T):
                y2[t, r] += _float_tail(kind, raw2[r], x2[t], nb * qk)


@njit(parallel=True, **_CACHE)
def _mv_par(kind, raw2, x2, y2, chunk, qk):
    n_out = raw2.shape[0]
    n_chunks = (n_out + chunk - 1) // chunk
    for c in prange(n_chunks):
        r0 = c * chunk
        _mv_rows(kind, raw2, x2, y2, r0, min(n_out, r0 + chunk), qk)


@njit(**_CACHE)
def _dec_rows(kind, raw2, out, base, r0, r1, qk):
    """out[r - base] = dequantize(row r) for r in [r0, r1) (serial)."""
    for r in range(r0, r1):
        _dec_row(kind, raw2[r], out[r - base], qk)


@njit(parallel=True, **_CACHE)
def _dec_par(kind, raw2, out, r0, r1, chunk, qk):
    n_chunks = (r1 - r0 + chunk - 1) // chunk
    for c in prange(n_chunks):
        a = r0 + c * chunk
        _dec_rows(kind, raw2, out, r0, a, min(r1, a + chunk), qk)
