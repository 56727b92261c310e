"""Weight containers ("linears"): y = x @ W^T for a weight W (out, in) in each storage format.

Every class has the same interface (:class:`Linear`): ``lin(x)`` takes float32 ``x`` of shape
``(in,)`` or ``(T, in)`` and returns float32 ``(out,)`` or ``(T, out)``; ``out_features``,
``in_features``, ``fmt`` (the storage format, ggml's name), ``nbytes`` (bytes of weights read
per matrix-vector product), ``strategy`` (a short name of the kernel) and ``exact``.
:func:`make_linear` picks the class for a weight and a policy:

* ``policy="exact"``: weights exactly as stored, float32 activations, float32 accumulation:
  equal to ``x @ dequantize(W).T`` in float32 up to summation order (tested at 1e-5 of the
  output scale).
* ``policy="fast"``: a lossy kernel where it is clearly faster and its error is small against
  the format's own (documented per class, measured in tests/test_kernels_linear.py and, on the
  fixtures' logits, tests/test_fast_paths.py).

Per format (one token; prompts: see below), with the CPU level of kernels/cpu.py:

=========  =============================================  ===================================
format     policy="exact"                                 policy="fast" (default of load)
=========  =============================================  ===================================
F32        :class:`FloatLinear` (numba, as stored)        same, at every level
F16, BF16  :class:`FloatLinear` (numba, 2 bytes/weight)   same, at every level
Q4_0/Q4_1  :class:`BlockLinear` (numba on ggml blocks)    level avx2 and up:
Q5_0/Q5_1  :class:`BlockLinear`                           :class:`Int8DotLinear` (groups of 8
                                                          interleaved rows, int8 activations);
                                                          generic: :class:`BlockLinear`
Q8_0       :class:`BlockLinear`                           avx2 and up: :class:`Int16DotLinear`
                                                          (int16 activations); generic:
                                                          :class:`BlockLinear`
=========  =============================================  ===================================

No product rounds F16/BF16/F32 weights or their activations: torch's bf16 products on the CPU
return bf16 outputs, whose 8 significant bits break the accuracy contract (docs/accuracy.md),
so native-bf16 CPUs multiply these formats in float32 too.

The integer classes repack once (cached, kernels/cache.py); the exact ones read the file's bytes
as they are. Every numba product is one of kernels/simd.py's explicit LLVM vector kernels, whose
operation order is fixed in the IR: the same numbers on every CPU that runs them. The integer
classes read interleaved groups because ggml's row order keeps too few reads in flight; torch's
own kernels (torch.mv, int4 and int8 weight kernels with bf16 activations) were slower in whole
tokens or lossier than the formats (docs/performance.md). :class:`F32Linear` and
:class:`DequantLinear` serve where numba is missing.

Prompts (T > 1): the float kernels take T <= :data:`NUMBA_MAX_T` vectors in one pass; above,
the weights are dequantized in row tiles (bit-exact) and multiplied with torch's float32 GEMM,
which is far faster per flop. :class:`Int8DotLinear` and :class:`Int16DotLinear` take every T
with their integer kernels (4 vectors per pass over the codes).

Threads: the numba kernels run on as many threads as ``torch.get_num_threads()``. numba's
threading layer is chosen here (``numba.config``, before its first parallel launch): OpenMP
first, else 'workqueue'. A launch on OpenMP's spinning pool costs a few microseconds, on
workqueue 40-60: on the v7 0.1B model (2 threads, every product in numba) a token took 16-18 ms
with OpenMP and 24-48 ms with workqueue. Decode now runs every product in numba, so torch's own
OpenMP pool (a second one) stays idle between prompts. workqueue aborts the process when two
Python threads launch parallel kernels at once, so launches take :data:`PARALLEL_LOCK` (a
caller that finds it held runs the serial kernel). Below :data:`SERIAL_MAX_ELEMENTS` weights,
or with one torch thread, the serial kernel runs directly. numba is optional: without it the
quantized formats are dequantized to float32 at load (exact, 2-8x the memory) and F16/BF16
weights are converted to float32.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F

from ..formats.base import QTensor, release_pages
from ..quant import get_format
from .cpu import CpuKernels, host_kernels, integer_kernels_run

__all__ = [
    "PARALLEL_LOCK",
    "POLICIES",
    "BlockLinear",
    "DequantLinear",
    "F32Linear",
    "FloatLinear",
    "Int16DotLinear",
    "Int8DotLinear",
    "Linear",
    "make_linear",
]

POLICIES = ("exact", "fast")
#: Formats whose ``policy="fast"`` is :class:`Int8DotLinear` where the CPU has AVX2.
#: Not Q8_0: with 8-bit weights the activations' rounding doubles the format's own error
#: (docs/performance.md, "Speed": added 1.0-1.6x of Q8_0's own error on the fixtures, 0.06-0.25x for Q4/Q5).
INT8_DOT_FORMATS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1")
#: Formats whose ``policy="fast"`` is :class:`Int16DotLinear` where the CPU has AVX2 (16-bit
#: activations: added error well under 1 % of Q8_0's own on the fixtures).
INT16_DOT_FORMATS = ("Q8_0",)

#: Largest T for which the numba kernels handle a prompt themselves (one pass over the weights
#: per vector); above it, row tiles are dequantized and multiplied by torch's GEMM. Measured
#: crossover (AVX2, 2048x2048, 1 thread): T = 2 numba 1.9-3.9 ms vs tiles 2.8-2.9 ms; T = 4
#: numba 3.5-7.6 ms vs tiles 3.5-4.0 ms.
NUMBA_MAX_T = 2
#: Elements per block of every quantized format (passed to the kernels at run time).
_QK = 32
#: Product kinds of a numba spec (Linear.numba_spec, row_product): rows of any format
#: (_mv_rows), interleaved groups with int8 activations (_mvx8), with int16 ones (_mvx8w);
#: K-quants (kernels/kquants_ir.py, ``kind`` its KIND): exact rows (mv_rows), rows with int8
#: activations (mvq), interleaved groups with int8 activations (mvx8).
ROWS, X8_INT8, X8_INT16, K_ROWS, K_ROWS_INT8, K_X8 = 0, 1, 2, 3, 4, 5
#: The length of a spec of each product kind (:func:`_spec`: 4 + the kind's number, padded
#: with Nones): numba reads a tuple argument's length when it compiles and drops
#: row_product's branches of the other kinds, so a model compiles the products it has only.
_LEN_ROWS, _LEN_X8_INT8, _LEN_X8_INT16, _LEN_K_ROWS, _LEN_K_ROWS_INT8, _LEN_K_X8 = (
    4, 5, 6, 7, 8, 9)
_NO_TAIL = np.zeros((0, 0), np.uint8)
#: Elements of one dequantized tile (float32) for the tiled GEMM path: 1 Mi elements = 4 MiB.
TILE_ELEMENTS = 1 << 20
#: Vectors of a prompt per pass over a chunk of int8-group rows (_mvx8_groups).
X8_TOKENS = 64
#: Below this many weight elements a numba matvec runs serially (a launch costs more than the
#: work it splits).
SERIAL_MAX_ELEMENTS = 1 << 18

try:  # numba is optional
    import numba
    from numba import njit, prange
    from numba.core import types as _nbtypes
    from numba.extending import intrinsic

    from . import kquants_ir as _kq
    from . import simd as _simd

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    HAVE_NUMBA = False


# ------------------------------------------------------------------------------------------
# numba kernels
#
# Layout: a weight's bytes as ggml stores them, viewed as (out, row_bytes) uint8 (read-only),
# one row of blocks per output. The exact kernels read the blocks directly (no repacking);
# Int8DotLinear's read its groups of 8 interleaved rows (further below).
#
# Numerics: every weight is decoded exactly as ggml's dequantize_row_* does (q*d, (q-8)*d,
# q*d + m in float32, d and m widened from float16), then multiplied by its activation and
# added into one of 32 float32 lane accumulators (one fused multiply-add); the lanes are
# summed at the end of the row. So the result is the float32 ``dequantize(W) @ x`` with
# another summation order, NaN and inf included.
#
# The row . vector products are explicit LLVM vector code (kernels/simd.py): numba's loop
# vectorizer turned each 32-weight block into a scalar prologue, a short vector loop and an
# epilogue (about two instructions per weight). Measured on the AVX2 VM (1 thread, 2048x2048
# in cache, Gweights/s, numba loops -> simd.py): Q4_0 4.3 -> 7.5, Q4_1 3.6 -> 6.0, Q5_0 2.5 ->
# 5.6, Q5_1 2.2 -> 5.0, Q8_0 4.8 -> 10.3, F16 2.8 -> 17.0 (vcvtph2ps), BF16 4.8 -> 14.3.
# The row decoders for prompt tiles (``_dec_*``) are plain numba loops (bit-exact, tested
# exhaustively); each row is handled through a 1-D view ``raw2[r]`` in a separate function.

if HAVE_NUMBA:
    from llvmlite import ir as _ir
    from numba.np.ufunc import parallel as _nb_parallel

    if not getattr(_nb_parallel, "_is_initialized", False):
        # Set before the first parallel launch (importing numba does not read it again):
        # OpenMP where numba finds it, else workqueue (see the module docstring).
        numba.config.THREADING_LAYER = "default"
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]

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

    _CACHE = {"cache": True, "nogil": True}

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
        return (np.int64(row[o]) | (np.int64(row[o + 1]) << 8) | (np.int64(row[o + 2]) << 16)
                | (np.int64(row[o + 3]) << 24))

    # --- one row . one vector, per format: explicit LLVM vector code (kernels/simd.py) -----

    @njit(inline="always", **_CACHE)
    def _float_at(kind, row, k):
        """Value k of a row of F32 (kind 7), F16 (5) or BF16 (6) values given as its bytes,
        as float32 (exact)."""
        if kind == 7:
            return _bits_to_f32(_rd32(row, 4 * k))
        h = _rd16(row, 2 * k)
        return _bits_to_f32(h << 16) if kind == 6 else _h2f(h)

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
        """w = the row dequantized (kernels/simd.py's deq_*: ggml's arithmetic, vector code)."""
        nb = w.shape[0] // qk
        if kind == 0:
            _simd.deq_q4_0(row, w, nb)
        elif kind == 1:
            _simd.deq_q4_1(row, w, nb)
        elif kind == 2:
            _simd.deq_q5_0(row, w, nb)
        elif kind == 3:
            _simd.deq_q5_1(row, w, nb)
        else:
            _simd.deq_q8_0(row, w, nb)

    @njit(inline="always", **_CACHE)
    def _dot_row(kind, row, x, nb):
        """The first ``32 * nb`` weights of a row of format ``kind`` . x (inlined into the
        drivers; ``nb`` computed once per matrix: a call or a division per row cost ~20 % of
        a 65536 x 768 F16 product, and so did an F16 tail test inside the row loop)."""
        if kind == 0:
            return _simd.dot_q4_0(row, x, nb)
        elif kind == 1:
            return _simd.dot_q4_1(row, x, nb)
        elif kind == 2:
            return _simd.dot_q5_0(row, x, nb)
        elif kind == 3:
            return _simd.dot_q5_1(row, x, nb)
        elif kind == 4:
            return _simd.dot_q8_0(row, x, nb)
        elif kind == 5:
            return _simd.dot_f16(row, x, nb)
        elif kind == 6:
            return _simd.dot_bf16(row, x, nb)
        return _simd.dot_f32(row, x, nb)

    @njit(inline="always", **_CACHE)
    def _dots_row(kind, raw2, r0, q, x, y, nb):
        """y[r] = row r . x for r = r0, r0 + q, r0 + 2q, r0 + 3q (float kinds 5, 6, 7; each
        row summed as _dot_row sums it: simd._row_dot_streams)."""
        if kind == 5:
            _simd.dots_f16(raw2, r0, q, x, y, nb)
        elif kind == 6:
            _simd.dots_bf16(raw2, r0, q, x, y, nb)
        else:
            _simd.dots_f32(raw2, r0, q, x, y, nb)

    # --- drivers: ``kind`` selects the format (one compiled driver for all formats) ---------

    @njit(**_CACHE)
    def _mv_rows(kind, raw2, x2, y2, r0, r1, qk):
        """y2[t, r] = row r . x2[t] for r in [r0, r1), every t (serial; the row's bytes stay
        in L1 while the T vectors are done)."""
        T = x2.shape[0]
        nb = x2.shape[1] // qk
        r = r0
        if T == 1 and kind >= 5:  # float rows, one vector: 4 quarters of the range at once
            q = (r1 - r0) // 4
            for i in range(q):
                _dots_row(kind, raw2, r0 + i, q, x2[0], y2[0], nb)
            r = r0 + 4 * q
        for r in range(r, r1):
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

    # --- int8 activations (ggml's method; AVX2): simd.dotq_* ---------------------------------

    @njit(**_CACHE)
    def _quantize_x(x2, xq2, dx2, sx2, qmax):
        """Each row of x2 (T, K) as integer blocks of 32: dx = amax / qmax, xq = round(x / dx)
        (|xq| <= qmax: 127 into int8 ``xq2``, 32767 into int16), sx = dx * (sum of the block's
        xq) (float32); a block holding a NaN or an infinity gets dx = NaN, so that the products
        come out NaN as in float arithmetic (the rounding would hide it). simd.quantize_blocks."""
        for t in range(x2.shape[0]):
            _simd.quantize_blocks(x2[t], xq2[t], dx2[t], sx2[t], dx2.shape[1], qmax)

    @njit(parallel=True, **_CACHE)
    def _quantize_par(x2, xq2, dx2, sx2, qmax):
        """_quantize_x with the vectors across numba's threads (one vector: serially)."""
        if x2.shape[0] > 1:
            for t in prange(x2.shape[0]):
                _quantize_x(x2[t:t + 1], xq2[t:t + 1], dx2[t:t + 1], sx2[t:t + 1], qmax)
        else:
            _quantize_x(x2, xq2, dx2, sx2, qmax)

    @njit(inline="always", **_CACHE)
    def _dotq_row(kind, row, xq, dx, sx, nb):
        if kind == 0:
            return _simd.dotq_q4_0(row, xq, dx, sx, nb)
        elif kind == 1:
            return _simd.dotq_q4_1(row, xq, dx, sx, nb)
        elif kind == 2:
            return _simd.dotq_q5_0(row, xq, dx, sx, nb)
        elif kind == 3:
            return _simd.dotq_q5_1(row, xq, dx, sx, nb)
        return _simd.dotq_q8_0(row, xq, dx, sx, nb)

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

    # --- the 8-row interleaved layout of Int8DotLinear (record layout: kernels/simd.py) -----

    @njit(inline="always", **_CACHE)
    def _x8_geom(kind):
        """Q4_0 (kind 0), Q4_1, Q5_0, Q5_1, Q8_0 (kind 4): ggml's block bytes, has m, has qh,
        dwords of codes per block, the record's offsets of m, qh and codes (the layout of
        kernels/simd.py, _x8_layout; the repack round trip is tested against the kernels),
        and the block's offsets of qh and codes."""
        if kind == 4:
            bb, hm, hq, nw = 34, False, False, 8
        else:
            bb, hm, hq, nw = 18 + 2 * kind, kind == 1 or kind == 3, kind == 2 or kind == 3, 4
        return (bb, hm, hq, nw, 16, 16 + 16 * hm, 16 + 16 * hm + 32 * hq, 2 + 2 * hm,
                2 + 2 * hm + 4 * hq)

    # The record of a block column (kernels/simd.py) holds, for each of the 8 rows, the same
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
        if T == 1:  # one vector: simd.X8_STREAMS groups at once (see _mvx8_groups)
            ns = _simd.X8_STREAMS
            q = (g1 - g0) // ns
            for i in range(q):
                _simd.dotsx8w_q8_0(pk, g0 + i, q, xw2, dx2, nb, y2, 0)
            g0 += ns * q
        for t0 in range(0, T, X8_TOKENS):  # tiles of tokens as _mvx8_groups takes them
            t1 = min(T, t0 + X8_TOKENS)
            n4 = (t1 - t0) // 4
            for g in range(g0, g1):
                if n4:
                    _simd.dotx8wt_q8_0(pk, g, xw2, dx2, nb, y2, t0, n4)
                for t in range(t0 + 4 * n4, t1):
                    _simd.dotx8w_q8_0(pk, g, xw2, dx2, nb, y2, t)

    @njit(**_CACHE)
    def _mvx8w_tail(tail, x2, y2, n8):
        nb = x2.shape[1] // 32
        for r in range(tail.shape[0]):
            for t in range(x2.shape[0]):
                y2[t, n8 + r] = _dot_row(4, tail[r], x2[t], nb)  # the exact float kernel

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

    @njit(inline="always", **_CACHE)
    def _deqx8(kind, pk, g, out, o0, nb):
        if kind == 0:
            _simd.deqx8_q4_0(pk, g, out, o0, nb)
        elif kind == 1:
            _simd.deqx8_q4_1(pk, g, out, o0, nb)
        elif kind == 2:
            _simd.deqx8_q5_0(pk, g, out, o0, nb)
        elif kind == 3:
            _simd.deqx8_q5_1(pk, g, out, o0, nb)
        else:
            _simd.deqx8_q8_0(pk, g, out, o0, nb)

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
                _deqx8(kind, pk, g, out, r - base, nb)
                r += 8
            else:  # part of a group: all of it into scratch, the rows asked for copied out
                _deqx8(kind, pk, g, scratch, 0, nb)
                e = min(r1, 8 * g + 8)
                out[r - base: e - base] = scratch[r - 8 * g: e - 8 * g]
                r = e
        for r in range(max(r0, n8), r1):
            _dec_row(kind, tail[r - n8], out[r - base], qk)

    @njit(parallel=True, **_CACHE)
    def _dec_par_x8(kind, pk, tail, out, r0, r1, chunk, qk):
        n_chunks = (r1 - r0 + chunk - 1) // chunk
        for c in prange(n_chunks):
            a = r0 + c * chunk
            _dec_rows_x8(kind, pk, tail, out, r0, a, min(r1, a + chunk), qk)

    @njit(inline="always", **_CACHE)
    def _dotx8(kind, pk, g, xq2, dx2, sx2, nb, y2, t):
        """Rows 8g .. 8g+7 for the vector t of x2 (as int8 blocks)."""
        if kind == 0:
            _simd.dotx8_q4_0(pk, g, xq2, dx2, sx2, nb, y2, t)
        elif kind == 1:
            _simd.dotx8_q4_1(pk, g, xq2, dx2, sx2, nb, y2, t)
        elif kind == 2:
            _simd.dotx8_q5_0(pk, g, xq2, dx2, sx2, nb, y2, t)
        elif kind == 3:
            _simd.dotx8_q5_1(pk, g, xq2, dx2, sx2, nb, y2, t)
        else:
            _simd.dotx8_q8_0(pk, g, xq2, dx2, sx2, nb, y2, t)

    @njit(**_CACHE)
    def _dotx8t(kind, pk, g, xq2, dx2, sx2, nb, y2, t, n4):
        """Rows 8g .. 8g+7 for the vectors t .. t + 4 n4 - 1 of x2, n4 passes of 4 vectors,
        each unpacking the codes once (the loop over the passes inside the kernel). Called, not
        inlined: with the 5 formats' kernels inlined into _mvx8_groups' loop, 2048 x 2048 Q4_0
        products of 512 tokens ran 241-253 GOPS where a loop around one kernel ran 320-346;
        called, 342-356 (2 threads, one process, alternating)."""
        if kind == 0:
            _simd.dotx8t_q4_0(pk, g, xq2, dx2, sx2, nb, y2, t, n4)
        elif kind == 1:
            _simd.dotx8t_q4_1(pk, g, xq2, dx2, sx2, nb, y2, t, n4)
        elif kind == 2:
            _simd.dotx8t_q5_0(pk, g, xq2, dx2, sx2, nb, y2, t, n4)
        elif kind == 3:
            _simd.dotx8t_q5_1(pk, g, xq2, dx2, sx2, nb, y2, t, n4)
        else:
            _simd.dotx8t_q8_0(pk, g, xq2, dx2, sx2, nb, y2, t, n4)

    @njit(inline="always", **_CACHE)
    def _dotsx8(kind, pk, g, q, xq2, dx2, sx2, nb, y2):
        """Groups g, g + q, g + 2q, ... (simd.X8_STREAMS of them) for the one vector of x2."""
        if kind == 0:
            _simd.dotsx8_q4_0(pk, g, q, xq2, dx2, sx2, nb, y2, 0)
        elif kind == 1:
            _simd.dotsx8_q4_1(pk, g, q, xq2, dx2, sx2, nb, y2, 0)
        elif kind == 2:
            _simd.dotsx8_q5_0(pk, g, q, xq2, dx2, sx2, nb, y2, 0)
        elif kind == 3:
            _simd.dotsx8_q5_1(pk, g, q, xq2, dx2, sx2, nb, y2, 0)
        else:
            _simd.dotsx8_q8_0(pk, g, q, xq2, dx2, sx2, nb, y2, 0)

    @njit(**_CACHE)
    def _mvx8_groups(kind, pk, xq2, dx2, sx2, y2, g0, g1):
        """Groups g0 .. g1 for every vector of x2, X8_TOKENS vectors at a time: each group's
        record is read once per tile and the tile's int8 activations stay in the core's cache
        (one pass over all T vectors per group read them from the shared cache: 2 threads,
        T = 512, v7 1.5B shapes, 218-220 -> 271-277 GOPS). One vector: the range in
        simd.X8_STREAMS parts read at once, then the groups after the last whole part one by
        one (the loop below)."""
        nb, T = dx2.shape[1], xq2.shape[0]
        if T == 1:
            ns = _simd.X8_STREAMS
            q = (g1 - g0) // ns
            for i in range(q):
                _dotsx8(kind, pk, g0 + i, q, xq2, dx2, sx2, nb, y2)
            g0 += ns * q
        for t0 in range(0, T, X8_TOKENS):
            t1 = min(T, t0 + X8_TOKENS)
            n4 = (t1 - t0) // 4
            for g in range(g0, g1):
                if n4:
                    _dotx8t(kind, pk, g, xq2, dx2, sx2, nb, y2, t0, n4)
                for t in range(t0 + 4 * n4, t1):
                    _dotx8(kind, pk, g, xq2, dx2, sx2, nb, y2, t)

    @njit(**_CACHE)
    def _mvx8_tail(kind, tail, xq2, dx2, sx2, y2, n8):
        nb = dx2.shape[1]
        for r in range(tail.shape[0]):
            for t in range(xq2.shape[0]):
                y2[t, n8 + r] = _dotq_row(kind, tail[r], xq2[t], dx2[t], sx2[t], nb)

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


    @njit(**_CACHE)
    def _row_chunk(n_out, n):
        """Rows per chunk of a row-parallel kernel on n threads: 8 chunks per thread."""
        return max(1, -(-n_out // (8 * n)))

    @njit(**_CACHE)
    def row_product(spec, x2, y2, n):
        """y2 (T, out) = x2 (T, in) @ W^T from numba code (kernels/fused.py's whole-block
        kernels), ``spec`` being the matrix's :meth:`Linear.numba_spec`; on numba's ``n``
        threads (the caller has set them; 1: serial) when the matrix is large, as
        :func:`_rows_kernel` decides in Python."""
        kind, a, b = spec[1], spec[2], spec[3]
        n_out = y2.shape[1]
        par = n > 1 and n_out * x2.shape[1] > SERIAL_MAX_ELEMENTS
        chunk = _row_chunk(n_out, n)
        if len(spec) == _LEN_ROWS:
            if par:
                _mv_par(kind, a, x2, y2, chunk, _QK)
            else:
                _mv_rows(kind, a, x2, y2, np.int64(0), n_out, _QK)
        elif len(spec) == _LEN_X8_INT8:
            if par:
                _mvx8_par(kind, a, b, x2, y2, max(1, chunk // 8))
            else:
                _mvx8(kind, a, b, x2, y2)
        elif len(spec) == _LEN_X8_INT16:
            if par:
                _mvx8w_par(a, b, x2, y2, max(1, chunk // 8))
            else:
                _mvx8w(a, b, x2, y2)
        elif len(spec) == _LEN_K_X8:
            if par:
                _kq.mvx8_par(kind, a, b, x2, y2, max(1, chunk // 8))
            else:
                _kq.mvx8(kind, a, b, x2, y2)
        elif len(spec) == _LEN_K_ROWS_INT8:
            if par:
                _kq.mvq_par(kind, a, x2, y2, chunk)
            else:
                _kq.mvq(kind, a, x2, y2)
        elif len(spec) == _LEN_K_ROWS:
            if par:
                _kq.mv_par(kind, a, x2, y2, chunk)
            else:
                _kq.mv_rows(kind, a, x2, y2, np.int64(0), n_out)


_KIND = {"Q4_0": 0, "Q4_1": 1, "Q5_0": 2, "Q5_1": 3, "Q8_0": 4, "F16": 5, "BF16": 6, "F32": 7}


def _spec(mode: int, kind: int, a: np.ndarray, b: np.ndarray | None = None) -> tuple | None:
    """A numba product spec (see :func:`row_product`), or None for strided arrays (never
    copied): (mode, kind, a, b) and ``mode`` Nones (the length tells row_product the mode when
    it compiles), the arrays as read-only uint8 views, so that the specs of a mode have one
    numba type."""
    arrs = []
    for arr in (a, _NO_TAIL if b is None else b):
        if not HAVE_NUMBA or arr.dtype != np.uint8 or arr.ndim != 2 or not arr.flags.c_contiguous:
            return None
        v = arr.view()
        v.flags.writeable = False
        arrs.append(v)
    return (mode, kind, *arrs) + (None,) * mode


class Linear:
    """y = x @ W^T. ``x`` float32 ``(in,)`` or ``(T, in)`` (other float dtypes are converted,
    more leading dimensions are flattened); returns float32 ``(out,)`` or ``(T, out)``.

    Attributes: ``out_features``, ``in_features``, ``fmt`` (storage format, ggml's name),
    ``nbytes`` (bytes of weights read per matrix-vector product), ``strategy`` (kernel name),
    ``exact`` (True: equal to the float32 reference up to summation order).
    """

    out_features: int
    in_features: int
    fmt: str
    nbytes: int
    strategy: str = ""
    exact: bool = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            x = x.float()
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input has {x.shape[-1]} features, "
                             f"expected {self.in_features}")
        if x.dim() == 1:
            return self._mv(x)
        if x.dim() == 2:
            return self._mm(x)
        lead = x.shape[:-1]
        return self._mm(x.reshape(-1, self.in_features)).reshape(*lead, self.out_features)

    #: Largest T served by :meth:`_rows` (a numba kernel, numpy in and out); 0: none.
    rows_max_t = 0

    def _mv(self, x: torch.Tensor) -> torch.Tensor:
        return self._mm(x.unsqueeze(0)).squeeze(0)

    def np_mm(self, x: np.ndarray) -> np.ndarray:
        """``x`` float32 (T, in) numpy, C-contiguous -> (T, out) numpy: the one-token step's
        entry (kernels/fused.py), without torch conversions where a numba kernel serves."""
        if x.shape[0] <= self.rows_max_t:
            return self._rows(x)
        return self._mm(torch.from_numpy(x)).numpy()

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.rows_max_t:
            return torch.from_numpy(self._rows(x.contiguous().numpy()))
        return self._gemm(x)

    def _rows(self, xn: np.ndarray) -> np.ndarray:
        """T <= ``rows_max_t`` vectors in one pass of the numba kernels over the weights
        (:func:`row_product` on :meth:`numba_spec`), parallel where :func:`_rows_kernel`
        decides."""
        spec = self.numba_spec()
        y = np.empty((xn.shape[0], self.out_features), np.float32)
        _rows_kernel(lambda: row_product(spec, xn, y, 1), lambda n: row_product(spec, xn, y, n),
                     self.out_features, self.in_features)
        return y

    def numba_spec(self) -> tuple | None:
        """How numba code runs this product (:func:`row_product`) for up to ``rows_max_t``
        vectors, or None where the product is torch's."""
        return None

    def _cached_spec(self, mode: int, a: np.ndarray, b: np.ndarray | None = None):
        spec = self.__dict__.get("_numba_spec")
        if spec is None:
            spec = self._numba_spec = _spec(mode, self._kind, a, b)
        return spec

    def _gemm(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.fmt}, {self.out_features}x{self.in_features}, "
                f"{self.strategy})")


class F32Linear(Linear):
    """Float32 weights: ``torch.mv`` for one vector (MKL sgemv: 1.3-1.9x faster than
    ``F.linear`` on one vector on the Sapphire Rapids machine of docs/measurements.md, equal on
    the AVX2 machine of bench_linear.py), ``F.linear`` (MKL sgemm) for T > 1. Exact.

    Where numba is missing, also the strategy for F16/BF16 weights (``fmt="F16"``, converted
    to float32 at load); with numba :class:`FloatLinear` reads them as stored, faster.
    """

    strategy = "torch-f32"

    def __init__(self, w: torch.Tensor, fmt: str = "F32"):
        src = w
        w = w.detach().to(torch.float32)
        self.out_features, self.in_features = (int(s) for s in w.shape)
        self.fmt = fmt
        self.nbytes = w.numel() * 4
        # Tall matrices (out > in: the head, the FFN key) are stored transposed, (in, out)
        # contiguous, and multiplied as x @ W^T: measured on the AVX2 machine (2 threads,
        # weights out of cache) 7.1 ms vs 11.2 ms for the 65536x768 head, 0.40 vs 0.54 ms for
        # 3072x768; wide ones (768x3072) are faster row-major (0.42 vs 0.55 ms). For a file's
        # F32 tensor this is one copy at load, which replaces the mapped one in use.
        self.transposed = self.out_features > self.in_features
        self.weight_t = w.t().contiguous() if self.transposed else None
        self.weight = self.weight_t.t() if self.transposed else w.contiguous()
        if self.weight.data_ptr() != src.data_ptr():
            # a copy (F16 -> F32, or transposed) replaces a mapped file's tensor: its pages
            # leave the resident set instead of doubling it (formats.base.release_pages)
            release_pages(src)

    def _mv(self, x):
        if self.transposed:
            return x @ self.weight_t
        return torch.mv(self.weight, x)

    def _mm(self, x):
        if self.transposed:
            return x @ self.weight_t
        return F.linear(x, self.weight)


class DequantLinear(F32Linear):
    """Any weight dequantized to float32 at load (exact; 2-8x the memory and bytes per token
    of the stored format). The fallback without numba."""

    strategy = "dequant-f32"

    def __init__(self, w, fmt: str | None = None):
        if isinstance(w, QTensor):
            fmt = fmt or get_format(w.fmt).name
            w = w.dequantize()
        super().__init__(w, fmt or _torch_fmt(w))


class FloatLinear(Linear):
    """F32, F16 or BF16 weights kept exactly as stored (no copy: a file's tensor stays a view
    of its mapping), float32 activations: one vectorized numba kernel per matrix-vector
    product (kernels/simd.py: F16 widened by ``vcvtph2ps``, BF16 by a shift), float32 lanes.
    Exact. For T > :data:`NUMBA_MAX_T`: torch's float32 GEMM (F16/BF16 row tiles converted to
    float32 first).

    Measured (AVX2 VM, 1 thread, ms per matvec, weights out of cache, 3072x768 | 2048x2048 |
    8192x2048 | 65536x768): F16 0.29 | 0.49 | 1.84 | 6.1 (2 bytes per weight at 16-18 GB/s),
    F32 0.48 | 0.81 | 3.2 | 10.1; torch.mv on float32 0.53 | 0.73 | 2.8 | 10-11.
    """

    strategy = "numba-float"

    def __init__(self, w: torch.Tensor, fmt: str | None = None):
        if not HAVE_NUMBA:  # pragma: no cover
            raise RuntimeError("FloatLinear needs numba")
        if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"FloatLinear stores float32, float16 or bfloat16 weights, got {w.dtype}")
        self.fmt = fmt or _torch_fmt(w)
        self.weight = w.detach().contiguous()
        self.out_features, self.in_features = _shape2(self.weight.shape)
        self.nbytes = self.weight.numel() * self.weight.element_size()
        self._kind = _KIND[_torch_fmt(w)]
        raw = self.weight.view(torch.uint8).numpy().reshape(self.out_features, -1)
        raw.flags.writeable = False
        self._raw2 = raw

    rows_max_t = NUMBA_MAX_T

    def numba_spec(self):
        return self._cached_spec(ROWS, self._raw2)

    def _gemm(self, x):
        if self.weight.dtype == torch.float32:
            return F.linear(x, self.weight)
        return _tiled_convert_mm(self.weight, x)


class BlockLinear(Linear):
    """Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 weights as ggml's blocks (no repacking, no copy of an
    ``np.memmap``), numba kernels parallel over output rows: each weight decoded exactly as
    ggml's ``dequantize_row_*``, multiplied and accumulated in float32 (see the notes above the
    kernels). Exact: equal to the float32 ``x @ dequantize(W).T`` up to summation order.

    T <= :data:`NUMBA_MAX_T` vectors in the same kernel (each row's bytes stay in L1 across
    them); larger T: row tiles dequantized by numba (bit-exact) to float32, multiplied with
    torch's float32 GEMM.

    Speed: kernels/simd.py (numbers in the module docstring); compute-bound on AVX2 at 5-10
    Gweights/s per thread. Prompts: ~55-80 GFLOPS per core, like float32 weights (the tile
    dequantization is < 5 % of it). Crossover with tiles: T ~ 3 (:data:`NUMBA_MAX_T`).
    """

    strategy = "numba-blocks"

    def __init__(self, w: QTensor):
        if not HAVE_NUMBA:  # pragma: no cover
            raise RuntimeError("BlockLinear needs numba")
        fmt = get_format(w.fmt)
        if fmt.name not in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
            raise ValueError(f"BlockLinear reads Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks, got {fmt.name}")
        self.fmt = fmt.name
        self.out_features, self.in_features = _shape2(w.shape)
        self._raw2 = _rows_view(w, fmt, self.out_features, self.in_features)
        self._kind = _KIND[fmt.name]
        self.nbytes = int(self._raw2.nbytes)

    rows_max_t = NUMBA_MAX_T

    def numba_spec(self):
        return self._cached_spec(ROWS, self._raw2)

    def _gemm(self, x):
        kind, raw2 = self._kind, self._raw2
        return _tiled_dequant_mm(
            lambda out, r0, r1: _dec_rows(kind, raw2, out, r0, r0, r1, _QK),
            lambda out, r0, r1, chunk: _dec_par(kind, raw2, out, r0, r1, chunk, _QK),
            x, self.out_features)


class Int8DotLinear(Linear):
    """Q4_0, Q4_1, Q5_0, Q5_1 (and Q8_0) weights repacked once into groups of 8 interleaved rows (the same
    bytes, moved: kernels/simd.py), the activations rounded to int8 per 32-value block, integer
    dot products with AVX2's vpmaddubsw / vpmaddwd: ggml's method of multiplying (rwkv.cpp
    multiplies its quantized matrices this way), in a layout where each row's sum stays in its
    own lane. ``policy="fast"`` on CPUs with AVX2.

    Lossy through the activations only: each block of 32 is rounded with its own scale
    amax / 127 (float32), so an element moves by at most 1/254 of its block's largest
    magnitude; the weights are used exactly. Error added on the rwkv.cpp fixtures: see
    tests/test_fast_paths.py and the README.

    Memory: the repacked groups replace the file's bytes (the file's pages are released after
    repacking; rows past the last whole group stay as ggml's rows). ``repacked()`` gives them
    to the repack cache, so that a later load memory-maps them instead of repacking.

    Measured (AVX2 VM, 1 thread, Gweights/s, Q4_0): 2048 x 1024 in cache, ggml's row layout
    20 -> interleaved 57; 16384 x 2048 from memory 20 -> 41 (23 GB/s, the bandwidth).
    Prompts (any T) run the same integer products, four vectors per pass over a group's codes:
    2048 x 2048 Q4_0, 2 threads, T = 16 / 64 / 512: 0.53 / 1.9 / 15.5 ms against 2.9 / 5.2 /
    26 ms for exactly dequantized tiles + torch's float32 GEMM (~270 GOPS against 64-180
    GFLOP/s).
    """

    strategy = "int8-dot"
    exact = False
    rows_max_t = 1 << 62  # every T: the integer kernels (above)

    def __init__(self, w: QTensor, repacked: dict | None = None):
        if not HAVE_NUMBA:  # pragma: no cover
            raise RuntimeError("Int8DotLinear needs numba")
        fmt = get_format(w.fmt)
        if fmt.name not in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
            raise ValueError(f"Int8DotLinear reads Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks, got "
                             f"{fmt.name}")
        self.fmt = fmt.name
        O, K = self.out_features, self.in_features = _shape2(w.shape)
        self._kind = _KIND[fmt.name]
        row_bytes = fmt.nbytes((1, K))
        shapes = {"x8": (O // 8, 8 * row_bytes), "tail": (O % 8, row_bytes)}
        if repacked is not None and all(
                isinstance(repacked.get(k), torch.Tensor) and repacked[k].dtype == torch.uint8
                and tuple(repacked[k].shape) == v for k, v in shapes.items()):
            self._pk = repacked["x8"].numpy()
            self._tail = repacked["tail"].numpy()
        else:
            raw2 = _rows_view(w, fmt, O, K)
            self._pk = repack_x8(self._kind, raw2)
            self._tail = np.array(raw2[8 * (O // 8):])
            release_pages(raw2)  # the file's copy is not read again
        self.nbytes = int(self._pk.nbytes + self._tail.nbytes)

    def repacked(self) -> dict:
        return {"x8": torch.from_numpy(self._pk), "tail": torch.from_numpy(self._tail)}

    def numba_spec(self):
        return self._cached_spec(X8_INT8, self._pk, self._tail)

    def _gemm(self, x):
        kind, pk, tail = self._kind, self._pk, self._tail
        return _tiled_dequant_mm(
            lambda out, r0, r1: _dec_rows_x8(kind, pk, tail, out, r0, r0, r1, _QK),
            lambda out, r0, r1, chunk: _dec_par_x8(kind, pk, tail, out, r0, r1, chunk, _QK),
            x, self.out_features)


class Int16DotLinear(Int8DotLinear):
    """Q8_0 weights in Int8DotLinear's interleaved groups, the activations rounded to int16 per
    32-value block (scale amax / 32767), integer products with vpmaddwd (kernels/simd.py,
    ``dotx8w_q8_0``). ``policy="fast"`` for Q8_0 on CPUs with AVX2.

    Why not int8 activations as for Q4/Q5: against 8-bit weights they double Q8_0's own error
    (docs/performance.md, "Speed"); 16-bit ones move each activation by at most 1/65534 of its block's
    largest magnitude, which adds well under 1 % of the format's own error on the fixtures
    (tests/test_fast_paths.py), at the speed of the int8 kernels. Rows past the last whole
    group use the exact float kernel.
    """

    strategy = "int16-dot"
    # every T (inherited): since the step-by-step x8 kernels (kernels/simd.py) the integer
    # products beat exact tiles + float32 GEMM at every length, 2 threads, one process:
    # 2048 x 2048 / 8192 x 2048 / 2048 x 8192, T = 64: 4.0 / 12.1 / 12.2 ms against 7.9 / 20.4
    # / 20.5; T = 512: 23.9 / 93.9 / 96.1 against 27.3 / 104.7 / 109.3 (~180 GOPS against
    # ~160 GFLOP/s). Before them the crossover was T = 64.

    def __init__(self, w: QTensor, repacked: dict | None = None):
        if w.fmt != "Q8_0":
            raise ValueError(f"Int16DotLinear reads Q8_0 blocks, got {w.fmt}")
        super().__init__(w, repacked)

    def numba_spec(self):
        return self._cached_spec(X8_INT16, self._pk, self._tail)


def repack_x8(kind: int, raw2: np.ndarray) -> np.ndarray:
    """The whole groups of 8 rows of ``raw2`` ((out, row_bytes) uint8, Q4_0..Q5_1 = kind
    0..3) in the interleaved layout of kernels/simd.py: (out // 8, 8 * row_bytes) uint8."""
    pk = np.empty((raw2.shape[0] // 8, 8 * raw2.shape[1]), np.uint8)
    _rows_kernel(lambda: _repack_groups(kind, raw2, pk, 0, pk.shape[0]),
                 lambda n: _repack_par(kind, raw2, pk, max(1, _row_chunk(raw2.shape[0], n) // 8)),
                 raw2.shape[0], raw2.shape[1] * 2)
    return pk


# ------------------------------------------------------------------------------------------
# helpers


def _rows_view(w: QTensor, fmt, O: int, K: int) -> np.ndarray:
    """The tensor's bytes as a read-only (O, row_bytes) uint8 view (copied only if they are
    not contiguous)."""
    if K % fmt.block_size:
        raise ValueError(f"{fmt.name}: in_features {K} is not a multiple of the block size "
                         f"{fmt.block_size}")
    raw = np.asarray(w.data).reshape(-1)
    if raw.dtype != np.uint8:
        raw = np.ascontiguousarray(raw).view(np.uint8)
    want = fmt.nbytes((O, K))
    if raw.size != want:
        raise ValueError(f"{fmt.name} data of {raw.size} bytes does not fit shape {(O, K)} "
                         f"({want} bytes)")
    raw2 = np.ascontiguousarray(raw).reshape(O, -1).view()
    raw2.flags.writeable = False
    return raw2


#: Held while a numba parallel kernel runs. numba's workqueue layer (the fallback where OpenMP is
#: missing) aborts the process when two
#: Python threads launch parallel kernels at once, so a caller that finds it taken runs the
#: serial kernel instead (every kernel releases the GIL). Other numba parallel code in the
#: process should take it too.
PARALLEL_LOCK = threading.Lock()


_POOL = threading.local()  # numba's thread count is a per-thread setting


def start_numba_pool() -> None:
    """Start numba's thread pool now. Its OpenMP layer sets the process's OpenMP thread count
    (torch's too: they share the runtime) to numba's pool size when it starts, which happens at
    the first call of a function that holds a parallel kernel; started before torch's count is
    set, the count asked for stays."""
    if HAVE_NUMBA:
        numba.get_num_threads()


def _numba_threads(n: int | None = None) -> int:
    """Point numba's pool at torch's thread count (capped by numba's pool size)."""
    n = max(1, min(torch.get_num_threads() if n is None else n, numba.config.NUMBA_NUM_THREADS))
    if getattr(_POOL, "n", None) != n:
        numba.set_num_threads(n)
        _POOL.n = n
    return n


def _rows_kernel(serial, parallel, n_out, K):
    """Run a row-parallel driver: ``parallel(n)`` on numba's n threads for a large matrix when
    torch allows more than one thread and no other parallel launch is running, else
    ``serial()``."""
    n = torch.get_num_threads()
    if n_out * K > SERIAL_MAX_ELEMENTS and n > 1 and PARALLEL_LOCK.acquire(blocking=False):
        try:
            parallel(_numba_threads(n))
        finally:
            PARALLEL_LOCK.release()
    else:
        serial()


def _tiled_dequant_mm(dec_rows, dec_par, x, n_out):
    """x (T, K) @ W^T: rows of W dequantized tile by tile (numba, bit-exact), then torch's
    float32 GEMM. ``dec_rows(out, r0, r1)`` and ``dec_par(out, r0, r1, chunk)`` write rows
    [r0, r1) of W as float32 to out[0:]."""
    T, K = x.shape
    rows = max(16, min(n_out, TILE_ELEMENTS // K) // 8 * 8)  # whole groups of 8 (Int8DotLinear)
    buf = torch.empty((rows, K), dtype=torch.float32)
    bn = buf.numpy()
    y = torch.empty((T, n_out), dtype=torch.float32)
    for r0 in range(0, n_out, rows):
        r1 = min(n_out, r0 + rows)
        if torch.get_num_threads() > 1 and PARALLEL_LOCK.acquire(blocking=False):
            try:
                n = _numba_threads()
                dec_par(bn, r0, r1, -(-(r1 - r0) // (32 * n)) * 8)
            finally:
                PARALLEL_LOCK.release()
        else:
            dec_rows(bn, r0, r1)
        y[:, r0:r1] = F.linear(x, buf[: r1 - r0])
    return y


def _tiled_convert_mm(w, x):
    """x (T, K) float32 @ w^T for 16-bit w: tiles of w converted to float32 (exact), float32
    GEMM."""
    n_out, K = w.shape
    rows = max(16, min(n_out, TILE_ELEMENTS // K))
    y = torch.empty((x.shape[0], n_out), dtype=torch.float32)
    for r0 in range(0, n_out, rows):
        r1 = min(n_out, r0 + rows)
        y[:, r0:r1] = F.linear(x, w[r0:r1].float())
    return y


def _int8_dot() -> bool:
    """Whether the integer kernels can run here (numba, compiling for an AVX2 CPU)."""
    return HAVE_NUMBA and integer_kernels_run()


def _torch_fmt(w) -> str:
    return {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}.get(
        w.dtype, str(w.dtype))


def _shape2(shape) -> tuple[int, int]:
    if len(shape) != 2:
        raise ValueError(f"a linear weight must be 2-D (out, in), got shape {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def _qtensor_to_torch(w: QTensor) -> torch.Tensor:
    """An unquantized QTensor (F32/F16/BF16 bytes) as a torch tensor (a copy)."""
    fmt = get_format(w.fmt)
    np_dt, t_dt = {"F32": (np.float32, None), "F16": (np.float16, None),
                   "BF16": (np.int16, torch.bfloat16)}[fmt.name]
    raw = np.asarray(w.data).reshape(-1)
    if raw.dtype != np.uint8:
        raw = np.ascontiguousarray(raw).view(np.uint8)
    t = torch.from_numpy(np.array(raw.view(np_dt).reshape(w.shape)))
    return t.view(t_dt) if t_dt is not None else t


def make_linear(w, policy: str = "exact", repacked: dict | None = None,
                cpu: CpuKernels | None = None) -> Linear:
    """The linear for weight ``w`` (a torch float tensor, F32/F16/BF16, or a :class:`QTensor`;
    shape (out, in)) under ``policy``, "exact" or "fast" (see the module docstring), with the
    kernels of ``cpu`` (kernels.cpu; None: the host's level).
    ``repacked``: the tensors a repacking linear made from this very weight before (its
    ``repacked()``, kept by kernels.cache), used instead of repacking again."""
    if policy not in POLICIES:
        raise ValueError(f"policy {policy!r} is not one of {', '.join(POLICIES)}")
    if isinstance(w, QTensor):
        fmt = get_format(w.fmt)
        if not fmt.quantized:
            return make_linear(_qtensor_to_torch(w), policy, cpu=cpu)
        _shape2(w.shape)
        integer = policy == "fast" and _int8_dot() and (cpu or host_kernels()).int8_dot
        if fmt.block_size == 256:  # the K-quants: kernels/kquants.py
            from .kquants import make_kquant_linear
            return make_kquant_linear(w, integer, repacked)
        if integer and fmt.name in INT8_DOT_FORMATS:
            return Int8DotLinear(w, repacked)
        if integer and fmt.name in INT16_DOT_FORMATS:
            return Int16DotLinear(w, repacked)
        if not HAVE_NUMBA:  # pragma: no cover
            return DequantLinear(w)
        return BlockLinear(w)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"make_linear takes a torch tensor or a QTensor, got {type(w).__name__}")
    _shape2(w.shape)
    if w.dtype in (torch.float32, torch.float16, torch.bfloat16) and HAVE_NUMBA:
        return FloatLinear(w)
    if w.dtype.is_floating_point:  # without numba: float32 (F16/BF16 converted, pages released)
        return F32Linear(w, fmt=_torch_fmt(w))
    raise TypeError(f"make_linear: unsupported weight dtype {w.dtype}")
