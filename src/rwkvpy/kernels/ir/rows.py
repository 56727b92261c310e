"""Row . vector products on rows as ggml stores them, and rows decoded to float32.

* ``dot_<fmt>(row, x, nb) -> float32``: ``row`` a 1-D uint8 array of ``nb`` blocks (F16, BF16,
  F32: ``nb`` chunks of 32 values), ``x`` float32 with at least ``32 * nb`` values. Each weight
  is decoded as ggml does, multiplied by its activation and added to its lane in one fused
  multiply-add; the 32 lane accumulators stay in registers across the row and are summed in
  order at its end: the float32 ``dequantize(W) @ x`` up to summation order, NaN and inf
  included. ``dots_<fmt>``: 4 float rows a stride apart at once, each summed as ``dot_<fmt>``
  sums it.
* ``dotq_<fmt>(row, xq, dx, sx, nb)``: the same rows against activations rounded to int8 blocks
  (x86 AVX2 integer instructions; lossy through the activations only).
* ``deq_<fmt>(row, out, nb)``: the row decoded to float32, bit for bit ggml's
  ``dequantize_row_*`` (prompt tiles).
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils
from numba.core import types as nbt
from numba.extending import intrinsic

from ..kinds import BLOCK_KINDS, FLOAT_KINDS, Kind
from .base import (
    _F32,
    _FMA,
    _I8,
    _I16,
    _I64,
    _N,
    WEIGHTS,
    _arg_ptr,
    _codes4,
    _codes5,
    _F32x8,
    _half,
    _halves,
    _hsum,
    _load,
    _maddubs,
    _maddwd,
    _ones16,
    _splat,
    _store32,
    _vec,
)


def _row_dot(kind):
    """Make an intrinsic ``dot(row, x, nb)`` for rows of ``kind`` (kernels.kinds.Kind), whose
    blocks base.WEIGHTS[kind] decodes."""
    block_bytes, weights = kind.chunk_bytes, WEIGHTS[kind]

    def typer(typingctx, row, x, nb):
        sig = nbt.float32(row, x, nbt.intp)

        def codegen(context, b, signature, args):
            row_arr = context.make_array(signature.args[0])(context, b, args[0])
            x_arr = context.make_array(signature.args[1])(context, b, args[1])
            base = b.bitcast(row_arr.data, ir.PointerType(_I8))
            xs = b.bitcast(x_arr.data, ir.PointerType(_F32))
            acc = cgutils.alloca_once_value(b, ir.Constant(_vec(_F32), None))
            with cgutils.for_range(b, args[2]) as loop:
                i = loop.index
                blk = b.gep(base, [b.mul(i, ir.Constant(_I64, block_bytes))])
                w = weights(b, blk)
                xv = _load(
                    b,
                    b.bitcast(b.gep(xs, [b.mul(i, ir.Constant(_I64, _N))]), ir.PointerType(_I8)),
                    None,
                    _vec(_F32),
                    align=4,
                )
                b.store(b.fadd(b.load(acc), b.fmul(w, xv, flags=_FMA), flags=_FMA), acc)
            return _hsum(b, b.load(acc), _N)

        return sig, codegen

    return intrinsic(typer)


def _row_dot_streams(kind, ns=4):
    """Make an intrinsic ``dots(w2, r0, q, x, y, nb)``: y[r] = row r of the 2-D uint8 matrix
    ``w2`` . x for the ``ns`` rows r = r0, r0 + q, ..., r0 + (ns - 1) q, each summed exactly
    as ``_row_dot`` sums it (same lanes, same order: the same float32 result).

    One row at a time, a thread reads one sequential stream, and the F16 products stay below
    the bandwidth torch.sum reads; rows a quarter of a thread's chunk apart give the memory
    system ``ns`` streams to fetch at once (docs/kernels.md has the measurements)."""
    block_bytes, weights = kind.chunk_bytes, WEIGHTS[kind]

    def typer(typingctx, w2, r0, q, x, y, nb):
        sig = nbt.void(w2, nbt.intp, nbt.intp, x, y, nbt.intp)

        def codegen(context, b, signature, args):
            wa = context.make_array(signature.args[0])(context, b, args[0])
            stride = cgutils.unpack_tuple(b, wa.strides, 2)[0]
            base = b.bitcast(wa.data, ir.PointerType(_I8))
            idx = [b.add(args[1], b.mul(args[2], ir.Constant(_I64, k))) for k in range(ns)]
            rows = [b.gep(base, [b.mul(r, stride)]) for r in idx]
            xs, ys = (_arg_ptr(context, b, signature, args, k) for k in (3, 4))
            acc = [cgutils.alloca_once_value(b, ir.Constant(_vec(_F32), None)) for _ in range(ns)]
            with cgutils.for_range(b, args[5]) as loop:
                i = loop.index
                xv = _load(
                    b,
                    b.bitcast(b.gep(xs, [b.mul(i, ir.Constant(_I64, _N))]), ir.PointerType(_I8)),
                    None,
                    _vec(_F32),
                    align=4,
                )
                off = b.mul(i, ir.Constant(_I64, block_bytes))
                for k in range(ns):
                    w = weights(b, b.gep(rows[k], [off]))
                    b.store(b.fadd(b.load(acc[k]), b.fmul(w, xv, flags=_FMA), flags=_FMA), acc[k])
            for k in range(ns):
                b.store(_hsum(b, b.load(acc[k]), _N), b.gep(ys, [idx[k]]))
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typer)


dot_q4_0, dot_q4_1, dot_q5_0, dot_q5_1, dot_q8_0, dot_f16, dot_bf16, dot_f32 = (
    _row_dot(k) for k in Kind
)
#: 4 rows a stride apart at once (one-vector products of float matrices: kernels/linear/rows.py)
dots_f16, dots_bf16, dots_f32 = (_row_dot_streams(k) for k in FLOAT_KINDS)


# -- integer dot products with 8-bit activations (ggml's own method; x86 AVX2 only) -------------
#
# The activations are rounded to int8 per 32-value block (xq = round(x / dx), dx = amax / 127,
# as ggml's quantize_row_q8_0 does but with a float32 dx) and each block's integer dot product
# sum(code * xq) is formed with vpmaddubsw / vpmaddwd, converted once and scaled by d * dx.
# Lossy (the activations' rounding), about 3x fewer instructions per weight than the float
# kernels above. The unsigned codes (Q4/Q5: 0..15, 0..31) multiply directly; their offset (8,
# 16) and Q4_1/Q5_1's m come back through the per-block sum of xq (``sx`` = dx * that sum):
#   sum((c - o) d x)  ~  d dx (sum(c xq) - o sx),     sum((c d + m) x)  ~  d dx sum(c xq) + m dx sx
# Q8_0's signed codes go through vpmaddwd on int16 (exact for every code, -128 included).


def _iq_q4_0(b, blk, xq):
    return _ones16(b, _maddubs(b, _codes4(b, blk, 2), xq)), _half(b, blk, None), None, 8


def _iq_q4_1(b, blk, xq):
    d, m = _half(b, blk, None), _half(b, blk, ir.Constant(_I64, 2))
    return _ones16(b, _maddubs(b, _codes4(b, blk, 4), xq)), d, m, 0


def _iq_q5_0(b, blk, xq):
    return _ones16(b, _maddubs(b, _codes5(b, blk, 2, 6), xq)), _half(b, blk, None), None, 16


def _iq_q5_1(b, blk, xq):
    d, m = _half(b, blk, None), _half(b, blk, ir.Constant(_I64, 2))
    return _ones16(b, _maddubs(b, _codes5(b, blk, 4, 8), xq)), d, m, 0


def _iq_q8_0(b, blk, xq):
    w = b.sext(_load(b, blk, ir.Constant(_I64, 2), _vec(_I8)), _vec(_I16))
    x = b.sext(xq, _vec(_I16))
    (w0, w1), (x0, x1) = _halves(b, w, _N), _halves(b, x, _N)
    return b.add(_maddwd(b, w0, x0), _maddwd(b, w1, x1)), _half(b, blk, None), None, 0


def _row_dot_q8(kind):
    """Make an intrinsic ``dot(row, xq, dx, sx, nb) -> float32``: row . x with x given as int8
    blocks ``xq`` (int8, 32 * nb), their scales ``dx`` and ``sx`` = dx * sum(xq) (float32, nb)."""
    block_bytes, block = kind.chunk_bytes, _INT8_BLOCKS[kind]

    def typer(typingctx, row, xq, dx, sx, nb):
        sig = nbt.float32(row, xq, dx, sx, nbt.intp)

        def codegen(context, b, signature, args):
            ptrs = [
                context.make_array(t)(context, b, a).data
                for t, a in zip(signature.args[:4], args[:4])
            ]
            base, xs = (b.bitcast(p, ir.PointerType(_I8)) for p in ptrs[:2])
            dxs, sxs = (b.bitcast(p, ir.PointerType(_F32)) for p in ptrs[2:])
            acc = cgutils.alloca_once_value(b, ir.Constant(_F32x8, None))
            extra = cgutils.alloca_once_value(b, ir.Constant(_F32, 0.0))
            with cgutils.for_range(b, args[4]) as loop:
                i = loop.index
                blk = b.gep(base, [b.mul(i, ir.Constant(_I64, block_bytes))])
                xq = _load(b, xs, b.mul(i, ir.Constant(_I64, _N)), _vec(_I8))
                p32, d, m, offset = block(b, blk, xq)
                dx, cx = b.load(b.gep(dxs, [i])), b.load(b.gep(sxs, [i]))
                s = b.fmul(d, dx)
                prod = b.fmul(b.sitofp(p32, _F32x8), _splat(b, s, 8), flags=_FMA)
                b.store(b.fadd(b.load(acc), prod, flags=_FMA), acc)
                if offset:  # - d * offset * dx * sum(xq)
                    dof = b.fmul(d, ir.Constant(_F32, -offset))
                    b.store(b.fadd(b.load(extra), b.fmul(dof, cx, flags=_FMA), flags=_FMA), extra)
                if m is not None:  # + m * dx * sum(xq)
                    b.store(b.fadd(b.load(extra), b.fmul(m, cx, flags=_FMA), flags=_FMA), extra)
            return _hsum(b, b.load(acc), 8, b.load(extra))

        return sig, codegen

    return intrinsic(typer)


_INT8_BLOCKS = {
    Kind.Q4_0: _iq_q4_0,
    Kind.Q4_1: _iq_q4_1,
    Kind.Q5_0: _iq_q5_0,
    Kind.Q5_1: _iq_q5_1,
    Kind.Q8_0: _iq_q8_0,
}
dotq_q4_0, dotq_q4_1, dotq_q5_0, dotq_q5_1, dotq_q8_0 = (_row_dot_q8(k) for k in BLOCK_KINDS)


# -- dequantization to float32 rows (prompt tiles), bit for bit ggml's dequantize_row_* ---------
#
# The same block decoders as the dot products above ((q - o) * d, q * d + m in float32, no
# fused multiply-add), stored instead of multiplied: 32 weights per block in a few vector
# instructions (the scalar numba loops they replace decoded ~0.4 Gweights/s per thread).


def _row_deq(kind):
    """Make an intrinsic ``deq(row, out, nb)``: out[:32 nb] = the row's ``nb`` blocks
    dequantized (``row`` uint8 1-D, ``out`` float32 1-D)."""
    block_bytes, weights = kind.chunk_bytes, WEIGHTS[kind]

    def typer(typingctx, row, out, nb):
        sig = nbt.void(row, out, nbt.intp)

        def codegen(context, b, signature, args):
            base = b.bitcast(
                context.make_array(signature.args[0])(context, b, args[0]).data, ir.PointerType(_I8)
            )
            ys = b.bitcast(
                context.make_array(signature.args[1])(context, b, args[1]).data,
                ir.PointerType(_F32),
            )
            with cgutils.for_range(b, args[2]) as loop:
                i = loop.index
                w = weights(b, b.gep(base, [b.mul(i, ir.Constant(_I64, block_bytes))]))
                _store32(b, ys, b.mul(i, ir.Constant(_I64, _N)), w)
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typer)


deq_q4_0, deq_q4_1, deq_q5_0, deq_q5_1, deq_q8_0 = (_row_deq(k) for k in BLOCK_KINDS)
