"""Row . vector kernels written as explicit LLVM vector code (numba intrinsics).

numba's loop vectorizer handles a ggml block badly: each 32-weight block became a scalar
prologue (the fp16 scale decoded with integer tricks), a short vector loop with run-time trip
checks and a scalar epilogue, about two instructions per weight, so every quantized matvec was
compute-bound at 0.1-0.25 of the memory bandwidth. Here each block is one straight run of
vector instructions on 32 lanes that LLVM lowers for the host CPU (AVX2: 4 ymm registers):

* fp16 scales and F16 weights: ``fpext half -> float`` (one ``vcvtph2ps`` with F16C);
* integer codes -> float32 without ``cvtdq2ps`` (slow on this CPU): the code ``c`` (0..255) is
  or-ed into the mantissa of 2^23 and 2^23 (+ the format's offset) subtracted, exact for any
  ``c < 2^23``;
* the 32 lane accumulators stay in registers across the whole row (an alloca of one
  ``<32 x float>`` that LLVM promotes).

Arithmetic is that of ggml's ``dequantize_row_*`` followed by a float32 dot product: each
weight is ``q * d`` (or ``q * d + m``) rounded to float32, then multiplied by its activation
and added to its lane in one fused multiply-add (LLVM's 'contract', the only fast-math flag
used: one rounding instead of two, 5-15 % faster); the lanes are summed in order at the end.
The result is the float32 ``dequantize(W) @ x`` up to summation order, NaN and inf included.

Every function has the signature ``dot(row, x, nb) -> float32``: ``row`` a 1-D uint8 array of
``nb`` blocks (F16/BF16/F32: ``nb`` chunks of 32 values), ``x`` float32 with at least
``32 * nb`` values. Plain LLVM IR, no target intrinsics: other CPUs get their own lowering.
"""

from __future__ import annotations

import contextlib
import functools

from llvmlite import ir
from numba.core import cgutils
from numba.core import types as nbt
from numba.extending import intrinsic

__all__ = ["dot_bf16", "dot_f16", "dot_f32", "dot_q4_0", "dot_q4_1", "dot_q5_0", "dot_q5_1",
           "dot_q8_0"]

_F32, _I8, _I16, _I32, _I64 = (ir.FloatType(), ir.IntType(8), ir.IntType(16), ir.IntType(32),
                               ir.IntType(64))
_N = 32  # lanes = weights per block
_MAGIC = 0x4B000000  # bits of 2^23
_FMA = ("contract",)  # w * x + acc as one fused multiply-add (one rounding instead of two)
_TWO23 = 8388608.0


def _vec(t, n=_N):
    return ir.VectorType(t, n)


def _const(t, values):
    return ir.Constant(_vec(t, len(values)), list(values))


def _splat(b, v, n=_N):
    u = b.insert_element(ir.Constant(_vec(v.type, n), ir.Undefined), v, ir.Constant(_I32, 0))
    return b.shuffle_vector(u, ir.Constant(_vec(v.type, n), ir.Undefined),
                            ir.Constant(_vec(_I32, n), [0] * n))


def _load(b, base, offset, t, align=1):
    """Load a value of type ``t`` from byte address ``base + offset`` (i8* base)."""
    p = b.gep(base, [offset]) if offset is not None else base
    return b.load(b.bitcast(p, ir.PointerType(t)), align=align)


def _arg_ptr(context, b, signature, args, k, elem=_F32):
    """``elem``* to the data of an intrinsic's array argument k."""
    arr = context.make_array(signature.args[k])(context, b, args[k])
    return b.bitcast(arr.data, ir.PointerType(elem))


def _half(b, base, offset):
    """The float32 value of the IEEE half at byte ``base + offset`` (exact)."""
    return b.fpext(b.bitcast(_load(b, base, offset, _I16), ir.HalfType()), _F32)


def _codes_to_float(b, codes_i32, offset):
    """float32(code - offset) for integer codes in 0..255 (exact): the code goes into the
    mantissa of 2^23, then 2^23 + offset is subtracted."""
    bits = b.or_(codes_i32, _const(_I32, [_MAGIC] * _N))
    return b.fsub(b.bitcast(bits, _vec(_F32)), _const(_F32, [_TWO23 + offset] * _N))


def _nibbles(b, packed):
    """<16 x i8> packed nibbles -> <32 x i8> codes 0..15: low nibbles first (ggml's order)."""
    lo = b.and_(packed, _const(_I8, [15] * 16))
    hi = b.lshr(packed, _const(_I8, [4] * 16))
    return b.shuffle_vector(lo, hi, ir.Constant(_vec(_I32), list(range(_N))))


def _codes4(b, blk, off):
    """Q4 codes (0..15) as <32 x i8> from the 16 bytes at ``blk + off``."""
    return _nibbles(b, _load(b, blk, ir.Constant(_I64, off), _vec(_I8, 16)))


def _with_high(b, codes, qh, byte_of, bit_of):
    """codes | 16 where code j's high bit is set: bit ``bit_of(j)`` of ``qh[byte_of(j)]``
    (``qh`` <4 x i8>)."""
    spread = b.shuffle_vector(qh, qh, ir.Constant(_vec(_I32), [byte_of(j) for j in range(_N)]))
    bit = b.and_(spread, _const(_I8, [1 << bit_of(j) for j in range(_N)]))
    high = b.select(b.icmp_unsigned("!=", bit, _const(_I8, [0] * _N)), _const(_I8, [16] * _N),
                    _const(_I8, [0] * _N))
    return b.or_(codes, high)


def _codes5(b, blk, qh_off, q_off):
    """Q5 codes (0..31) as <32 x i8>: the nibbles or-ed with bit j of qh (u32) moved to bit 4."""
    qh = _load(b, blk, ir.Constant(_I64, qh_off), _vec(_I8, 4))
    return _with_high(b, _codes4(b, blk, q_off), qh, lambda j: j // 8, lambda j: j % 8)


def _hsum(b, lanes, n, total=None):
    """total + lanes[0] + ... + lanes[n - 1], in that order."""
    for j in range(n):
        lane = b.extract_element(lanes, ir.Constant(_I32, j))
        total = lane if total is None else b.fadd(total, lane)
    return total


def _row_dot(block_bytes, weights):
    """Make an intrinsic ``dot(row, x, nb)``; ``weights(b, blk)`` returns the <32 x float>
    weights of the block at i8* ``blk``."""

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
                xv = _load(b, b.bitcast(b.gep(xs, [b.mul(i, ir.Constant(_I64, _N))]),
                                        ir.PointerType(_I8)), None, _vec(_F32), align=4)
                b.store(b.fadd(b.load(acc), b.fmul(w, xv, flags=_FMA), flags=_FMA), acc)
            return _hsum(b, b.load(acc), _N)

        return sig, codegen

    return intrinsic(typer)


def _wide(b, codes8):
    return b.zext(codes8, _vec(_I32))


def _q4_0(b, blk):  # d (f16), 16 bytes of nibbles: w = (q - 8) * d
    d = _half(b, blk, None)
    return b.fmul(_codes_to_float(b, _wide(b, _codes4(b, blk, 2)), 8), _splat(b, d))


def _q4_1(b, blk):  # d, m (f16), 16 bytes: w = q * d + m
    d, m = _half(b, blk, None), _half(b, blk, ir.Constant(_I64, 2))
    q = _codes_to_float(b, _wide(b, _codes4(b, blk, 4)), 0)
    return b.fadd(b.fmul(q, _splat(b, d)), _splat(b, m))


def _q5_0(b, blk):  # d, qh (u32), 16 bytes: w = (q | hbit << 4) - 16) * d
    d = _half(b, blk, None)
    return b.fmul(_codes_to_float(b, _wide(b, _codes5(b, blk, 2, 6)), 16), _splat(b, d))


def _q5_1(b, blk):  # d, m, qh, 16 bytes: w = (q | hbit << 4) * d + m
    d, m = _half(b, blk, None), _half(b, blk, ir.Constant(_I64, 2))
    q = _codes_to_float(b, _wide(b, _codes5(b, blk, 4, 8)), 0)
    return b.fadd(b.fmul(q, _splat(b, d)), _splat(b, m))


def _signed_to_float(b, codes8):
    """float32(code) for <32 x i8> signed codes (exact)."""
    bits = b.add(b.sext(codes8, _vec(_I32)), _const(_I32, [_MAGIC + 128] * _N))  # 2^23 + q + 128
    return b.fsub(b.bitcast(bits, _vec(_F32)), _const(_F32, [_TWO23 + 128] * _N))


def _q8_0(b, blk):  # d, 32 signed bytes: w = q * d
    d = _half(b, blk, None)
    w = _signed_to_float(b, _load(b, blk, ir.Constant(_I64, 2), _vec(_I8)))
    return b.fmul(w, _splat(b, d))


def _f16(b, blk):
    h = _load(b, blk, None, _vec(_I16), align=2)
    return b.fpext(b.bitcast(h, _vec(ir.HalfType())), _vec(_F32))


def _bf16(b, blk):
    h = b.zext(_load(b, blk, None, _vec(_I16), align=2), _vec(_I32))
    return b.bitcast(b.shl(h, _const(_I32, [16] * _N)), _vec(_F32))


def _f32(b, blk):
    return _load(b, blk, None, _vec(_F32), align=4)


def _row_dot_streams(block_bytes, weights, ns=4):
    """Make an intrinsic ``dots(w2, r0, q, x, y, nb)``: y[r] = row r of the 2-D uint8 matrix
    ``w2`` . x for the ``ns`` rows r = r0, r0 + q, ..., r0 + (ns - 1) q, each summed exactly
    as ``_row_dot`` sums it (same lanes, same order: the same float32 result).

    One row at a time, a thread reads one sequential stream and the F16 products stayed at
    27-28 GB/s on two threads where torch.sum read 34; rows a quarter of a thread's chunk
    apart give the memory system ``ns`` streams to fetch at once: all the F16 products of
    v7 1.5B 27.9 -> 35.6 GB/s (2 streams: 32.6; chunks of 128 rows, one process)."""

    def typer(typingctx, w2, r0, q, x, y, nb):
        sig = nbt.void(w2, nbt.intp, nbt.intp, x, y, nbt.intp)

        def codegen(context, b, signature, args):
            wa = context.make_array(signature.args[0])(context, b, args[0])
            stride = cgutils.unpack_tuple(b, wa.strides, 2)[0]
            base = b.bitcast(wa.data, ir.PointerType(_I8))
            idx = [b.add(args[1], b.mul(args[2], ir.Constant(_I64, k))) for k in range(ns)]
            rows = [b.gep(base, [b.mul(r, stride)]) for r in idx]
            xs, ys = (_arg_ptr(context, b, signature, args, k) for k in (3, 4))
            acc = [cgutils.alloca_once_value(b, ir.Constant(_vec(_F32), None))
                   for _ in range(ns)]
            with cgutils.for_range(b, args[5]) as loop:
                i = loop.index
                xv = _load(b, b.bitcast(b.gep(xs, [b.mul(i, ir.Constant(_I64, _N))]),
                                        ir.PointerType(_I8)), None, _vec(_F32), align=4)
                off = b.mul(i, ir.Constant(_I64, block_bytes))
                for k in range(ns):
                    w = weights(b, b.gep(rows[k], [off]))
                    b.store(b.fadd(b.load(acc[k]), b.fmul(w, xv, flags=_FMA), flags=_FMA),
                            acc[k])
            for k in range(ns):
                b.store(_hsum(b, b.load(acc[k]), _N), b.gep(ys, [idx[k]]))
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typer)


dot_q4_0 = _row_dot(18, _q4_0)
dot_q4_1 = _row_dot(20, _q4_1)
dot_q5_0 = _row_dot(22, _q5_0)
dot_q5_1 = _row_dot(24, _q5_1)
dot_q8_0 = _row_dot(34, _q8_0)
dot_f16 = _row_dot(64, _f16)
dot_bf16 = _row_dot(64, _bf16)
dot_f32 = _row_dot(128, _f32)
#: 4 rows a stride apart at once (one-vector products of float matrices: kernels/linear.py)
dots_f16 = _row_dot_streams(64, _f16)
dots_bf16 = _row_dot_streams(64, _bf16)
dots_f32 = _row_dot_streams(128, _f32)


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

_I16x16, _I32x8, _F32x8 = _vec(_I16, 16), _vec(_I32, 8), _vec(_F32, 8)


def _x86(b, name, ret, args, values):
    fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(ret, args), name)
    return b.call(fn, values)


def _maddubs(b, u8, s8):
    """<32 x u8> . <32 x s8> -> <16 x i16> sums of adjacent products (saturating; the codes
    here keep every pair below 2^15)."""
    return _x86(b, "llvm.x86.avx2.pmadd.ub.sw", _I16x16, [_vec(_I8), _vec(_I8)], [u8, s8])


def _maddwd(b, a, c):
    """<16 x i16> . <16 x i16> -> <8 x i32> sums of adjacent products."""
    return _x86(b, "llvm.x86.avx2.pmadd.wd", _I32x8, [_I16x16, _I16x16], [a, c])


def _ones16(b, p16):
    """<16 x i16> -> <8 x i32>: adjacent pairs added."""
    return _maddwd(b, p16, ir.Constant(_I16x16, [1] * 16))


def _halves(b, v, n):
    lo = b.shuffle_vector(v, v, ir.Constant(_vec(_I32, n // 2), list(range(n // 2))))
    hi = b.shuffle_vector(v, v, ir.Constant(_vec(_I32, n // 2), list(range(n // 2, n))))
    return lo, hi


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


def _row_dot_q8(block_bytes, block):
    """Make an intrinsic ``dot(row, xq, dx, sx, nb) -> float32``: row . x with x given as int8
    blocks ``xq`` (int8, 32 * nb), their scales ``dx`` and ``sx`` = dx * sum(xq) (float32, nb)."""

    def typer(typingctx, row, xq, dx, sx, nb):
        sig = nbt.float32(row, xq, dx, sx, nbt.intp)

        def codegen(context, b, signature, args):
            ptrs = [context.make_array(t)(context, b, a).data
                    for t, a in zip(signature.args[:4], args[:4])]
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


dotq_q4_0 = _row_dot_q8(18, _iq_q4_0)
dotq_q4_1 = _row_dot_q8(20, _iq_q4_1)
dotq_q5_0 = _row_dot_q8(22, _iq_q5_0)
dotq_q5_1 = _row_dot_q8(24, _iq_q5_1)
dotq_q8_0 = _row_dot_q8(34, _iq_q8_0)


# -- axpy on float rows (the fused step's low-rank products) -------------------------------------

#: Rows an axpy intrinsic adds in one pass over the output (each output chunk loaded once,
#: the rows added to it in order, stored once): the same operations in the same order as one
#: row at a time, without a load and a store of the output per row. The 24 layers' v7 LoRA
#: second products of v7 1.5B's shapes (F16, 50 MB) on two threads, one process, alternating,
#: median of 21: 1.80 -> 1.42, 1.93 -> 1.63, 2.21 -> 1.83 ms in three runs (4 rows: 1.91 ->
#: 1.81 and 1.92 -> 1.91; 16: 2.14 -> 2.10).
AXPY_ROWS = 8


def _rows_axpy(load):
    """Make an intrinsic ``axpys(out, W, x, c0, c1, off, n32)``: for each row c in [c0, c1),
    in order, out[:32 n32] += x[c] * W[c, off:] (W: the uint8 bytes of F32/F16/BF16 rows,
    ``off`` a byte offset into each row), the row widened exactly to float32; multiply, then
    add. AXPY_ROWS rows at a time, then the rest one by one. The loop over the rows inside:
    called once per row from numba, the slicing around each call cost more than the row itself
    for the LoRAs' short rows."""

    def typer(typingctx, out, W, x, c0, c1, off, n32):
        sig = nbt.void(out, W, x, nbt.intp, nbt.intp, nbt.intp, nbt.intp)

        def codegen(context, b, signature, args):
            w_arr = context.make_array(signature.args[1])(context, b, args[1])
            ys, xs = (_arg_ptr(context, b, signature, args, k) for k in (0, 2))
            stride = cgutils.unpack_tuple(b, w_arr.strides, 2)[0]
            base = b.gep(b.bitcast(w_arr.data, ir.PointerType(_I8)), [args[5]])
            nbytes = load.bytes

            def rows(c, n):  # out += x[c] W[c] + ... + x[c + n - 1] W[c + n - 1], in order
                cs = [b.add(c, ir.Constant(_I64, u)) for u in range(n)]
                avs = [_splat(b, b.load(b.gep(xs, [cu]))) for cu in cs]
                ptrs = [b.gep(base, [b.mul(cu, stride)]) for cu in cs]
                with cgutils.for_range(b, args[6]) as loop:
                    i = loop.index
                    yp = b.bitcast(b.gep(ys, [b.mul(i, ir.Constant(_I64, _N))]),
                                   ir.PointerType(_vec(_F32)))
                    y = b.load(yp, align=4)
                    for av, p in zip(avs, ptrs):
                        y = b.fadd(y, b.fmul(av, load(b, b.gep(p, [b.mul(
                            i, ir.Constant(_I64, nbytes))]))))
                    b.store(y, yp, align=4)

            n_many = b.udiv(b.sub(args[4], args[3]), ir.Constant(_I64, AXPY_ROWS))
            with cgutils.for_range(b, n_many) as grp:
                rows(b.add(args[3], b.mul(grp.index, ir.Constant(_I64, AXPY_ROWS))), AXPY_ROWS)
            rest = b.add(args[3], b.mul(n_many, ir.Constant(_I64, AXPY_ROWS)))
            with cgutils.for_range_slice(b, rest, args[4], ir.Constant(_I64, 1)) as (c, _):
                rows(c, 1)
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typer)


_f32.bytes, _f16.bytes, _bf16.bytes = 128, 64, 64
axpys_f32 = _rows_axpy(_f32)
axpys_f16 = _rows_axpy(_f16)
axpys_bf16 = _rows_axpy(_bf16)


# -- short float32 dot products (the per-head recurrences of kernels/fused.py) -------------------

def _dot_f32x16():
    """Make an intrinsic ``dot16(a, b, n16) -> float32``: sum(a[:16 n16] * b[:16 n16]) for
    float32 arrays, in two <8 x float> accumulators (multiply-add), added lane-wise and then
    halved three times: a fixed order, so the same sum wherever it is inlined."""

    def typer(typingctx, a, x, n16):
        sig = nbt.float32(a, x, nbt.intp)

        def codegen(context, b, signature, args):
            ptrs = [_arg_ptr(context, b, signature, args, k) for k in (0, 1)]
            accs = [cgutils.alloca_once_value(b, ir.Constant(_F32x8, None)) for _ in range(2)]
            with cgutils.for_range(b, args[2]) as loop:
                for u, acc in enumerate(accs):
                    off = b.add(b.mul(loop.index, ir.Constant(_I64, 16)), ir.Constant(_I64, 8 * u))
                    av, xv = (b.load(b.bitcast(b.gep(p, [off]), ir.PointerType(_F32x8)), align=4)
                              for p in ptrs)
                    b.store(b.fadd(b.load(acc), b.fmul(av, xv, flags=_FMA), flags=_FMA), acc)
            v = b.fadd(b.load(accs[0]), b.load(accs[1]))
            for n in (8, 4, 2):
                lo, hi = _halves(b, v, n)
                v = b.fadd(lo, hi)
            return b.extract_element(v, ir.Constant(_I32, 0))

        return sig, codegen

    return intrinsic(typer)


dot16_f32 = _dot_f32x16()


# -- int8 dots on 8 interleaved rows (the repacked layout of Int8DotLinear) ---------------------
#
# ggml stores a matrix row by row, block after block; read that way every 32-weight block
# pays its own scale decode, lane sum, int->float conversion and multiply-add (~16 instructions
# per block above), and the kernels stay compute-bound at about half the memory bandwidth.
# Repacked once (linear.repack_x8), 8 consecutive rows form a group and each block column of
# the group is one record of 8 * block_bytes bytes (the same bytes, moved):
#
#   d[8]  (8 fp16, one per row)                                   16 bytes
#   m[8]  (Q4_1, Q5_1)                                            16 bytes
#   qh    (Q5_0, Q5_1): byte 4r+t, bit j = bit 4 of code (r, 4j+t) 32 bytes
#   codes 4 x 32 bytes: vector i, byte 4r+t = code(r, 4i+t) & 15
#                                          | (code(r, 16+4i+t) & 15) << 4        128 bytes
#         (Q8_0: 8 x 32 bytes, vector j, byte 4r+t = code(r, 4j+t)               256 bytes)
#
# So one 32-byte load holds 4 consecutive codes of each of the 8 rows; the 4 activations they
# meet are one broadcast int32, and vpmaddubsw + vpmaddwd leave each row's sum in its own
# lane: no lane sums per block, one conversion, one scale vector (8 fp16 in one vcvtph2ps)
# and one multiply-add per 8 blocks. ~6 instructions per block instead of ~16: measured 1
# thread, Q4_0 2048 x 1024 in cache 20 -> 57 Gweights/s, 16384 x 2048 from memory 20 -> 41.
#
# Integer ranges: vpmaddubsw pairs are <= 2 * 15 * 127 = 3810 for 4-bit codes, so 8 of them
# add up in int16 (<= 30480); 5-bit codes (<= 7874 a pair) add 4 at a time. Q8_0's signed
# codes take ggml's sign trick (|code| times x with the code's sign, pairs <= 32512), one
# vpmaddwd each.

def _bcast4(b, xs, off):
    """<32 x i8>: the 4 int8 at byte ``xs + off`` repeated 8 times."""
    return b.bitcast(_splat(b, _load(b, xs, off, _I32), 8), _vec(_I8))


def _half8(b, rec, off):
    """The 8 fp16 at ``rec + off`` as <8 x float> (one vcvtph2ps)."""
    h = _load(b, rec, ir.Constant(_I64, off), _vec(_I16, 8), align=1)
    return b.fpext(b.bitcast(h, _vec(ir.HalfType(), 8)), _F32x8)


#: Bytes ahead of the record being read that a one-vector x8 product asks the CPU to fetch
#: (one prefetch per 64-byte line of a record). The hardware prefetcher alone left these
#: kernels well below torch.sum's read bandwidth. All the block products of v7 1.5B, 2 threads,
#: one process, alternating (median of 7): Q4_0 23.8 -> 28.3 GB/s, Q4_1 26.0 -> 31.1, Q5_1
#: 25.6 -> 32.3, Q8_0 (int16) 27.9 -> 30.8, torch.sum 34-38 in the same runs; 1024 and 4096
#: bytes ahead measured less than 2048 (Q4_0 27.3, 26.8). The F16 row kernels gained nothing
#: from it (27.0 vs 26.9-27.9 GB/s) and do not prefetch.
X8_PREFETCH = 2048


def _prefetch(b, p, ahead, nbytes):
    """Hint the cache lines of bytes [p + ahead, p + ahead + nbytes) (i8* p) into L1: a hint
    only, never a fault (addresses past the array's end are allowed)."""
    fn = cgutils.get_or_insert_function(
        b.module, ir.FunctionType(ir.VoidType(), [ir.PointerType(_I8)] + [_I32] * 3),
        "llvm.prefetch.p0i8")
    for q in range(0, nbytes, 64):  # read, high locality, data cache
        b.call(fn, [b.gep(p, [ir.Constant(_I64, ahead + q)]), ir.Constant(_I32, 0),
                    ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


def _x8_layout(block_bytes, has_m, has_qh):
    """Byte offsets inside one record: (m, qh, codes)."""
    m = 16 if has_m else None
    qh = 16 + 16 * has_m if has_qh else None
    return m, qh, 16 + 16 * has_m + 32 * has_qh


def _rows2(b, arr, t0, n, elem):
    """Pointers (``elem``*) to rows t0 .. t0+n-1 of a C-order 2-D array."""
    st = cgutils.unpack_tuple(b, arr.strides, 2)[0]
    base = b.bitcast(arr.data, ir.PointerType(_I8))
    return [b.bitcast(b.gep(base, [b.mul(b.add(t0, ir.Constant(_I64, u)), st)]),
                      ir.PointerType(elem)) for u in range(n)]


def _x8_code_steps(b, rec, block_bytes, has_m, has_qh):
    """The codes of the record at ``rec`` as a list of steps, each a list of (j, codes): the
    vectors of 4 codes x 8 rows that meet activations 4j .. 4j+3 (Q8_0: (|code|, code) pairs,
    for the sign trick). Q4: step m holds j = m (the low nibbles of packed vector m) and
    j = m + 4 (its high nibbles), from one load; Q5 and Q8_0: step j holds j alone, in order
    (Q5's int16 sums close after j = 3: _x8_integer_sums). A step's vectors are made where the
    step is used, so that few stay live at once."""
    _, qh_off, c_off = _x8_layout(block_bytes, has_m, has_qh)
    m15, m16 = _const(_I8, [15] * _N), _const(_I8, [16] * _N)
    qh = _load(b, rec, ir.Constant(_I64, qh_off), _I16x16) if has_qh else None

    def with_high(c, j):  # bit j of each qh byte -> bit 4 (16-bit shifts, then masked)
        if not has_qh:
            return c
        h = qh
        if j < 4:
            h = b.shl(h, ir.Constant(_I16x16, [4 - j] * 16))
        elif j > 4:
            h = b.lshr(h, ir.Constant(_I16x16, [j - 4] * 16))
        return b.or_(c, b.and_(b.bitcast(h, _vec(_I8)), m16))

    def nibbles(j):
        packed = _load(b, rec, ir.Constant(_I64, c_off + 32 * (j % 4)), _I16x16)
        if j >= 4:
            packed = b.lshr(packed, ir.Constant(_I16x16, [4] * 16))
        return with_high(b.and_(b.bitcast(packed, _vec(_I8)), m15), j)

    def step(m):
        if block_bytes == 34:  # signed: |code| (<= 128), and the code for its sign
            c = _load(b, rec, ir.Constant(_I64, c_off + 32 * m), _vec(_I8))
            return [(m, (_x86(b, "llvm.abs.v32i8", _vec(_I8), [_vec(_I8), ir.IntType(1)],
                                [c, ir.Constant(ir.IntType(1), 0)]), c))]
        if has_qh:
            return [(m, nibbles(m))]
        return [(m, nibbles(m)), (m + 4, nibbles(m + 4))]

    return [functools.partial(step, m) for m in range(8 if has_qh or block_bytes == 34 else 4)]


def _fma8(b, a, c, d):
    """a * c + d on <8 x float>, one rounding (llvm.fma: always fused)."""
    return _x86(b, "llvm.fma.v8f32", _F32x8, [_F32x8] * 3, [a, c, d])


def _x8_integer_sums(b, steps, units, x0, q8, per_madd):
    """For each unit (the index of its record in ``steps``, the i8* of its vector's int8
    blocks): the <8 x i32> of its 8 rows' integer block sums sum_j c_j . x_j. Step by step,
    each step's code vectors met by every unit of that record before the next step (the codes
    and one partial sum per unit live, not all 8 code vectors): the same integers as summing
    j = 0 .. 7 in order (the parts stay within int16's range in any order: see above)."""
    s16 = [None] * len(units)
    s32 = [None] * len(units)
    for m in range(len(steps[0])):
        made = {}
        for n, (rec, xs) in enumerate(units):
            if rec not in made:
                made[rec] = steps[rec][m]()
            for j, codes in made[rec]:
                xv = _bcast4(b, xs, b.add(x0, ir.Constant(_I64, 4 * j)))
                if q8:  # |code| times x with the code's sign: pairs <= 2 * 128 * 127
                    a, c = codes
                    xv = _x86(b, "llvm.x86.avx2.psign.b", _vec(_I8), [_vec(_I8), _vec(_I8)],
                              [xv, c])
                    p = _ones16(b, _maddubs(b, a, xv))
                    s32[n] = p if s32[n] is None else b.add(s32[n], p)
                    continue
                p = _maddubs(b, codes, xv)
                s16[n] = p if s16[n] is None else b.add(s16[n], p)
                if per_madd == 4 and j == 3:  # 5-bit codes: j < 4 summed in int16, then j >= 4
                    s32[n], s16[n] = _ones16(b, s16[n]), None
    if q8:
        return s32
    return [_ones16(b, s) if s32[n] is None else b.add(s32[n], _ones16(b, s))
            for n, s in enumerate(s16)]


def _x8_scale_add(b, s32, d8, m8, dx, cx, acc, offset):
    """acc += the 8 rows' block products from their integer sums ``s32`` (dx: the vector's
    block scale, cx = dx sum(xq))."""
    # offset formats: acc += d (dx sum(c xq) - offset dx sum(xq)), two fused multiply-adds;
    # m formats: acc += d (dx sum(c xq)) + m dx sum(xq). One accumulator: against a second
    # one for the offset/m terms (a multiply, a multiply-add and 8 more registers a vector)
    # the v7 1.5B one-vector products went 31.1 -> 32.2 GB/s (Q4_0), 29.9 -> 31.3 (Q5_1), and
    # 4-vector prompt passes in cache 249 -> 264 GOPS (Q4_0), 207 -> 202 (Q5_1).
    # (explicit fused multiply-adds: 'contract' leaves fusing to LLVM, which decided it
    # differently in the one-group and the 4-stream kernels)
    if offset:
        t = _fma8(b, b.sitofp(s32, _F32x8), _splat(b, dx, 8),
                  _splat(b, b.fmul(cx, ir.Constant(_F32, -offset)), 8))
        b.store(_fma8(b, d8, t, b.load(acc)), acc)
    else:
        t = b.fmul(b.sitofp(s32, _F32x8), _splat(b, dx, 8))
        b.store(_fma8(b, d8, t, b.load(acc)), acc)
        if m8 is not None:
            b.store(_fma8(b, m8, _splat(b, cx, 8), b.load(acc)), acc)


def _groups_args(context, b, signature, args, ng):
    """An x8 intrinsic's array arguments (None for the scalars), its groups g, g + q, ...
    (``ng`` of them: args[1] = g, args[2] = q when ng > 1) and the i8* of each group's row of
    the repacked matrix args[0]."""
    arrs = [context.make_array(t)(context, b, a) if isinstance(t, nbt.Array) else None
            for t, a in zip(signature.args, args)]
    stride = cgutils.unpack_tuple(b, arrs[0].strides, 2)[0]
    gs = [args[1] if k == 0 else b.add(args[1], b.mul(args[2], ir.Constant(_I64, k)))
          for k in range(ng)]
    bases = [b.gep(b.bitcast(arrs[0].data, ir.PointerType(_I8)), [b.mul(g, stride)])
             for g in gs]
    return arrs, gs, bases


@contextlib.contextmanager
def _passes(b, args, k, tt, acc):
    """The passes of an x8 intrinsic over its vectors: one at args[k] (the first vector, t0)
    when ``tt`` = 1; else args[k + 1] passes of ``tt`` vectors from t0, the accumulators zeroed
    before each. Yields the pass's first vector. (Prompts: one call per group and tile of
    tokens instead of one per 4 tokens, so that the driver can call its per-format dispatch
    rather than inline it: see kernels.linear._dotx8t.)"""
    if tt == 1:
        yield args[k]
        return
    with cgutils.for_range(b, args[k + 1]) as p:
        for a in acc:
            b.store(ir.Constant(_F32x8, None), a)
        yield b.add(args[k], b.mul(p.index, ir.Constant(_I64, tt)))


def _x8_store(b, gs, ys, acc, tt):
    """y[t0 + u, 8g .. 8g + 7] = acc[k + u] for each group g = gs[k] (one of gs, tt is 1)."""
    for k, g in enumerate(gs):
        col = b.mul(g, ir.Constant(_I64, 8))
        for u in range(tt):
            b.store(b.load(acc[k + u]), b.bitcast(b.gep(ys[u], [col]), ir.PointerType(_F32x8)),
                    align=4)


def _row_dot_x8(block_bytes, has_m, has_qh, offset, tt, ng=1):
    """Make an intrinsic ``dot8(pk, g, xq2, dx2, sx2, nb, y2, t0)``: y2[t0 + u, 8g + r] = row
    8g+r . x2[t0 + u] for r < 8, u < ``tt``, from the repacked group ``pk[g]`` (uint8 2-D) and
    the rows of x2 as int8 blocks (``xq2``, ``dx2``, ``sx2``, 2-D: see _row_dot_q8). The codes
    of a block column are unpacked once for the ``tt`` vectors (prompts: ~320-350 GOPS on two
    AVX2 cores for Q4_0, against ~120-170 GFLOP/s for torch's float32 GEMM); ``tt`` > 1:
    ``dot8(..., t0, npass)``, npass passes of ``tt`` vectors from t0 (see _passes).

    The code vectors are made step by step and each step met by every vector (or stream) before
    the next (_x8_integer_sums), instead of all 8 code vectors first and then each vector's
    whole sum: fewer values live at once, fewer spilled to the stack, the same integers. One
    process, alternating, 2 threads, 512 tokens in cache (2048 x 2048, 8192 x 2048, 2048 x
    8192): Q4_0 296 -> 349 GOPS, Q4_1 294 -> 323, Q5_1 233 -> 257, Q8_0 (int8) 160 -> 229,
    Q5_0 252 -> 246; one vector, 4 streams, v7 1.5B's block products from memory: Q4_0 35.4 ->
    35.8 GB/s, Q4_1 36.2 -> 36.8, Q5_0 33.4 -> 33.7, Q5_1 34.5 -> 36.0.

    ``ng`` > 1 (one vector): ``dots8(pk, g, q, xq2, dx2, sx2, nb, y2, t0)`` does the groups g,
    g + q, ..., g + (ng - 1) q, record after record, each exactly as ``dot8`` does it: ``ng``
    streams of weights at once instead of one (see X8_STREAMS); no prefetch hints then."""
    m_off = _x8_layout(block_bytes, has_m, has_qh)[0]
    q8 = block_bytes == 34
    rec_bytes = 8 * block_bytes
    per_madd = 4 if has_qh else 8  # int16 headroom (see above)
    assert ng == 1 or tt == 1
    ai = 1 if ng == 1 else 2  # the arguments after g (and q)

    def codegen(context, b, signature, args):
        arrs, gs, bases = _groups_args(context, b, signature, args, ng)
        acc = [cgutils.alloca_once_value(b, ir.Constant(_F32x8, None))
               for _ in range(max(tt, ng))]
        with _passes(b, args, ai + 6, tt, acc) as t0:
            xs = _rows2(b, arrs[ai + 1], t0, tt, _I8)
            dxs, sxs, ys = (_rows2(b, arrs[ai + k], t0, tt, _F32) for k in (2, 3, 5))
            with cgutils.for_range(b, args[ai + 4]) as loop:
                i = loop.index
                x0 = b.mul(i, ir.Constant(_I64, _N))
                recs = [b.gep(bases[k], [b.mul(i, ir.Constant(_I64, rec_bytes))])
                        for k in range(ng)]
                if tt == 1 and ng == 1:  # the records stream from memory once: X8_PREFETCH
                    _prefetch(b, recs[0], X8_PREFETCH, rec_bytes)
                steps = [_x8_code_steps(b, rec, block_bytes, has_m, has_qh) for rec in recs]
                units = [(k, xs[u]) for k in range(ng) for u in range(tt)]  # acc[k + u]
                sums = _x8_integer_sums(b, steps, units, x0, q8, per_madd)
                for n, (k, _) in enumerate(units):
                    u = n - k
                    d8 = _half8(b, recs[k], 0)
                    m8 = _half8(b, recs[k], m_off) if has_m else None
                    dx, cx = b.load(b.gep(dxs[u], [i])), b.load(b.gep(sxs[u], [i]))
                    _x8_scale_add(b, sums[n], d8, m8, dx, cx, acc[n], offset)
            _x8_store(b, gs, ys, acc, tt)
        return context.get_dummy_value()

    if ng > 1:
        def typer(typingctx, pk, g, q, xq, dx, sx, nb, y, t0):
            return nbt.void(pk, nbt.intp, nbt.intp, xq, dx, sx, nbt.intp, y, nbt.intp), codegen
    elif tt > 1:
        def typer(typingctx, pk, g, xq, dx, sx, nb, y, t0, npass):
            return nbt.void(pk, nbt.intp, xq, dx, sx, nbt.intp, y, nbt.intp, nbt.intp), codegen
    else:
        def typer(typingctx, pk, g, xq, dx, sx, nb, y, t0):
            return nbt.void(pk, nbt.intp, xq, dx, sx, nbt.intp, y, nbt.intp), codegen

    return intrinsic(typer)


#: Groups a one-vector x8 product reads at once (simd._row_dot_x8's ``ng``; the driver takes
#: the groups a quarter of a thread's chunk apart). All the block products of v7 1.5B, 2
#: threads, one process: Q4_0 28.8 GB/s one group at a time with X8_PREFETCH, 32.9 with 4
#: streams (31.3-32.7 with 2), Q5_1 32.3 -> 33.5 (torch.sum 31.9-33.7 in the same runs).
X8_STREAMS = 4


#: dotx8_<fmt>: one vector; dotx8t_<fmt>: 4 vectors at once (prompts)
dotx8_q4_0, dotx8t_q4_0 = (_row_dot_x8(18, False, False, 8, tt) for tt in (1, 4))
dotx8_q4_1, dotx8t_q4_1 = (_row_dot_x8(20, True, False, 0, tt) for tt in (1, 4))
dotx8_q5_0, dotx8t_q5_0 = (_row_dot_x8(22, False, True, 16, tt) for tt in (1, 4))
dotx8_q5_1, dotx8t_q5_1 = (_row_dot_x8(24, True, True, 0, tt) for tt in (1, 4))
dotx8_q8_0, dotx8t_q8_0 = (_row_dot_x8(34, False, False, 0, tt) for tt in (1, 4))
#: dotsx8_<fmt>: one vector, X8_STREAMS groups a stride apart
dotsx8_q4_0 = _row_dot_x8(18, False, False, 8, 1, X8_STREAMS)
dotsx8_q4_1 = _row_dot_x8(20, True, False, 0, 1, X8_STREAMS)
dotsx8_q5_0 = _row_dot_x8(22, False, True, 16, 1, X8_STREAMS)
dotsx8_q5_1 = _row_dot_x8(24, True, True, 0, 1, X8_STREAMS)
dotsx8_q8_0 = _row_dot_x8(34, False, False, 0, 1, X8_STREAMS)


# -- dequantization to float32 rows (prompt tiles), bit for bit ggml's dequantize_row_* ---------
#
# The same block decoders as the dot products above ((q - o) * d, q * d + m in float32, no
# fused multiply-add), stored instead of multiplied: 32 weights per block in a few vector
# instructions (the scalar numba loops they replace decoded ~0.4 Gweights/s per thread).

def _store32(b, out_row, col, w):
    p = b.bitcast(b.gep(out_row, [col]), ir.PointerType(_vec(_F32)))
    b.store(w, p, align=4)


def _row_deq(block_bytes, weights):
    """Make an intrinsic ``deq(row, out, nb)``: out[:32 nb] = the row's ``nb`` blocks
    dequantized (``row`` uint8 1-D, ``out`` float32 1-D)."""

    def typer(typingctx, row, out, nb):
        sig = nbt.void(row, out, nbt.intp)

        def codegen(context, b, signature, args):
            base = b.bitcast(context.make_array(signature.args[0])(context, b, args[0]).data,
                             ir.PointerType(_I8))
            ys = b.bitcast(context.make_array(signature.args[1])(context, b, args[1]).data,
                           ir.PointerType(_F32))
            with cgutils.for_range(b, args[2]) as loop:
                i = loop.index
                w = weights(b, b.gep(base, [b.mul(i, ir.Constant(_I64, block_bytes))]))
                _store32(b, ys, b.mul(i, ir.Constant(_I64, _N)), w)
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typer)


deq_q4_0 = _row_deq(18, _q4_0)
deq_q4_1 = _row_deq(20, _q4_1)
deq_q5_0 = _row_deq(22, _q5_0)
deq_q5_1 = _row_deq(24, _q5_1)
deq_q8_0 = _row_deq(34, _q8_0)


def _x8_weights(b, rec, r, block_bytes, has_m, has_qh, offset):
    """<32 x float> weights of row ``r`` (0..7) in the record at ``rec`` (layout above)."""
    m_off, qh_off, c_off = _x8_layout(block_bytes, has_m, has_qh)
    d = _half(b, rec, ir.Constant(_I64, 2 * r))
    if block_bytes == 34:  # Q8_0: dword j holds codes 4j .. 4j+3
        words = ir.Constant(_vec(_I32, 8), ir.Undefined)
        for j in range(8):
            words = b.insert_element(words, _load(b, rec, ir.Constant(_I64, 16 + 32 * j + 4 * r),
                                                  _I32), ir.Constant(_I32, j))
        return b.fmul(_signed_to_float(b, b.bitcast(words, _vec(_I8))), _splat(b, d))
    words = ir.Constant(_vec(_I32, 4), ir.Undefined)
    for i in range(4):  # vector i's dword r: codes 4i+t (low nibbles), 16+4i+t (high)
        words = b.insert_element(words, _load(b, rec, ir.Constant(_I64, c_off + 32 * i + 4 * r),
                                              _I32), ir.Constant(_I32, i))
    codes = _nibbles(b, b.bitcast(words, _vec(_I8, 16)))
    if has_qh:  # code 4j+t: bit j of qh byte 4r+t
        qh = _load(b, rec, ir.Constant(_I64, qh_off + 4 * r), _vec(_I8, 4))
        codes = _with_high(b, codes, qh, lambda k: k % 4, lambda k: k // 4)
    w = b.fmul(_codes_to_float(b, _wide(b, codes), offset), _splat(b, d))
    if has_m:
        w = b.fadd(w, _splat(b, _half(b, rec, ir.Constant(_I64, m_off + 2 * r))))
    return w


def _x8_deq(block_bytes, has_m, has_qh, offset):
    """Make an intrinsic ``deqx8(pk, g, out, o0, nb)``: out[o0 + r] = row 8g + r of the
    repacked groups ``pk`` dequantized, r < 8 (``out`` float32 2-D, C order)."""
    rec_bytes = 8 * block_bytes

    def typer(typingctx, pk, g, out, o0, nb):
        sig = nbt.void(pk, nbt.intp, out, nbt.intp, nbt.intp)

        def codegen(context, b, signature, args):
            pa = context.make_array(signature.args[0])(context, b, args[0])
            oa = context.make_array(signature.args[2])(context, b, args[2])
            pstride = cgutils.unpack_tuple(b, pa.strides, 2)[0]
            ostride = cgutils.unpack_tuple(b, oa.strides, 2)[0]
            base = b.gep(b.bitcast(pa.data, ir.PointerType(_I8)), [b.mul(args[1], pstride)])
            obase = b.gep(b.bitcast(oa.data, ir.PointerType(_I8)), [b.mul(args[3], ostride)])
            rows = [b.bitcast(b.gep(obase, [b.mul(ostride, ir.Constant(_I64, r))]),
                              ir.PointerType(_F32)) for r in range(8)]
            with cgutils.for_range(b, args[4]) as loop:
                i = loop.index
                rec = b.gep(base, [b.mul(i, ir.Constant(_I64, rec_bytes))])
                col = b.mul(i, ir.Constant(_I64, _N))
                for r in range(8):
                    w = _x8_weights(b, rec, r, block_bytes, has_m, has_qh, offset)
                    _store32(b, rows[r], col, w)
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typer)


deqx8_q4_0 = _x8_deq(18, False, False, 8)
deqx8_q4_1 = _x8_deq(20, True, False, 0)
deqx8_q5_0 = _x8_deq(22, False, True, 16)
deqx8_q5_1 = _x8_deq(24, True, True, 0)
deqx8_q8_0 = _x8_deq(34, False, False, 0)


# -- Q8_0 with 16-bit activations (Int16DotLinear) ----------------------------------------------
#
# 8-bit activations against 8-bit weights double Q8_0's error (docs/performance.md, "Speed"). Rounded to int16
# per block of 32 instead (scale amax / 32767), an activation moves by at most 1/65534 of its
# block's largest magnitude, ~1/250 of what the int8 rounding costs, and the products still run
# in integers: each code widened to int16 (vpmovsxbw), vpmaddwd against the 4 activations of
# its column group (one broadcast int64), int32 sums per row pair, one conversion and one
# multiply-add per record. Same interleaved records as above.

def _dot_x8_q8_i16(tt, ng=1):
    """Make an intrinsic ``dot8(pk, g, xw2, dx2, nb, y2, t0)``: y2[t0 + u, 8g + r] = row 8g+r .
    x2[t0 + u] for r < 8, u < ``tt``, Q8_0 records, the rows of x2 as int16 blocks ``xw2``
    (int16, 2-D) with scales ``dx2``; the codes widened once for the ``tt`` vectors; ``tt`` > 1:
    ``dot8(..., t0, npass)``, npass passes of ``tt`` vectors from t0 (see _passes).
    ``ng`` > 1 (one vector): ``dots8(pk, g, q, xw2, dx2, nb, y2, t0)``, the groups g, g + q, ...
    each as ``dot8`` does it (see _row_dot_x8)."""
    rec_bytes = 8 * 34
    assert ng == 1 or tt == 1
    ai = 1 if ng == 1 else 2

    def codegen(context, b, signature, args):
        arrs, gs, bases = _groups_args(context, b, signature, args, ng)
        acc = [cgutils.alloca_once_value(b, ir.Constant(_F32x8, None))
               for _ in range(max(tt, ng))]
        even = ir.Constant(_vec(_I32, 8), list(range(0, 16, 2)))
        odd = ir.Constant(_vec(_I32, 8), list(range(1, 16, 2)))
        with _passes(b, args, ai + 5, tt, acc) as t0:
            xs = _rows2(b, arrs[ai + 1], t0, tt, _I8)
            dxs, ys = (_rows2(b, arrs[ai + k], t0, tt, _F32) for k in (2, 4))
            with cgutils.for_range(b, args[ai + 3]) as loop:
                i = loop.index
                x0 = b.mul(i, ir.Constant(_I64, 2 * _N))  # bytes of int16
                recs = [b.gep(bases[k], [b.mul(i, ir.Constant(_I64, rec_bytes))])
                        for k in range(ng)]
                if tt == 1 and ng == 1:
                    _prefetch(b, recs[0], X8_PREFETCH, rec_bytes)
                units = [(k, u) for k in range(ng) for u in range(tt)]  # acc[k + u]
                lo, hi = [None] * len(units), [None] * len(units)
                for j in range(8):  # code vector j of each record, met by its units
                    # codes 4j .. 4j+3: rows 0-3 in bytes 0-15 of vector j, rows 4-7 after
                    w = [tuple(b.sext(_load(b, rec, ir.Constant(_I64, off + 32 * j),
                                            _vec(_I8, 16)), _I16x16) for off in (16, 32))
                         for rec in recs]
                    for n, (k, u) in enumerate(units):
                        xv = b.bitcast(_splat(b, _load(b, xs[u], b.add(
                            x0, ir.Constant(_I64, 8 * j)), _I64), 4), _I16x16)
                        p0, p1 = _maddwd(b, w[k][0], xv), _maddwd(b, w[k][1], xv)
                        lo[n] = p0 if lo[n] is None else b.add(lo[n], p0)
                        hi[n] = p1 if hi[n] is None else b.add(hi[n], p1)
                for n, (k, u) in enumerate(units):
                    d8 = _half8(b, recs[k], 0)
                    s32 = b.add(b.shuffle_vector(lo[n], hi[n], even),
                                b.shuffle_vector(lo[n], hi[n], odd))
                    scale = b.fmul(d8, _splat(b, b.load(b.gep(dxs[u], [i])), 8))
                    prod = b.fmul(b.sitofp(s32, _F32x8), scale, flags=_FMA)
                    b.store(b.fadd(b.load(acc[n]), prod, flags=_FMA), acc[n])
            _x8_store(b, gs, ys, acc, tt)
        return context.get_dummy_value()

    if ng > 1:
        def typer(typingctx, pk, g, q, xw, dx, nb, y, t0):
            return nbt.void(pk, nbt.intp, nbt.intp, xw, dx, nbt.intp, y, nbt.intp), codegen
    elif tt > 1:
        def typer(typingctx, pk, g, xw, dx, nb, y, t0, npass):
            return nbt.void(pk, nbt.intp, xw, dx, nbt.intp, y, nbt.intp, nbt.intp), codegen
    else:
        def typer(typingctx, pk, g, xw, dx, nb, y, t0):
            return nbt.void(pk, nbt.intp, xw, dx, nbt.intp, y, nbt.intp), codegen

    return intrinsic(typer)


dotx8w_q8_0, dotx8wt_q8_0 = (_dot_x8_q8_i16(tt) for tt in (1, 4))
dotsx8w_q8_0 = _dot_x8_q8_i16(1, X8_STREAMS)


# -- one token of a head's state (the CPU sequence recurrences of kernels/wkv.py) ---------------
#
# A head's state is kept as nk rows of nv values (row j: what key channel j holds of each value
# channel), so every update of a token is a run of vertical multiply-adds on rows: the value
# channels are taken 16 at a time (two ymm registers), the rows one after another. A sum over
# the rows goes into 4 accumulators (row j into j % 4, rows past the last multiple of 4 into the
# first) added as (a0 + a1) + (a2 + a3): 4 independent chains of multiply-adds instead of one.

_STATE_LANES = 16
_STATE_ACCS = 4
_F32x16 = _vec(_F32, _STATE_LANES)


def _lanes_at(b, p, i):
    return b.bitcast(b.gep(p, [i]), ir.PointerType(_F32x16))


def _each_row(b, nk, body):
    """body(j, acc) for the rows j = 0 .. nk - 1 in order; acc = j % 4 (0 for the last nk % 4)."""
    four = ir.Constant(_I64, _STATE_ACCS)
    whole = b.udiv(nk, four)
    with cgutils.for_range(b, whole) as loop:
        for u in range(_STATE_ACCS):
            body(b.add(b.mul(loop.index, four), ir.Constant(_I64, u)), u)
    with cgutils.for_range_slice(b, b.mul(whole, four), nk, ir.Constant(_I64, 1)) as (j, _):
        body(j, 0)


def _state_kernel(n_arrays, body):
    """An intrinsic ``f(*arrays, nk, nv, nb)`` (float32 arrays; row stride of the state nv;
    nb blocks of 16 value channels): ``body(b, ptrs, nk, nv, c0, accs)`` for each block, at
    value channel c0, with fresh zeroed <16 x float> accumulator slots (two sets of 4)."""

    def codegen(context, b, signature, args):
        ptrs = [_arg_ptr(context, b, signature, args, k) for k in range(n_arrays)]
        nk, nv, nb = args[n_arrays:]
        zero = ir.Constant(_F32x16, None)
        accs = [[cgutils.alloca_once_value(b, zero) for _ in range(_STATE_ACCS)] for _ in range(2)]
        with cgutils.for_range(b, nb) as blk:
            for a in accs[0] + accs[1]:
                b.store(zero, a)
            body(b, ptrs, nk, nv, b.mul(blk.index, ir.Constant(_I64, _STATE_LANES)), accs)
        return context.get_dummy_value()

    def sig(arrays):
        return nbt.void(*arrays, nbt.intp, nbt.intp, nbt.intp), codegen

    if n_arrays == 7:  # numba's intrinsics take no *args: one typer per arity
        def typer(typingctx, a0, a1, a2, a3, a4, a5, a6, nk, nv, nb):
            return sig((a0, a1, a2, a3, a4, a5, a6))
    else:
        def typer(typingctx, a0, a1, a2, a3, a4, a5, a6, a7, nk, nv, nb):
            return sig((a0, a1, a2, a3, a4, a5, a6, a7))

    return intrinsic(typer)


def _accumulated(b, accs):
    v = [b.load(a) for a in accs]
    return b.fadd(b.fadd(v[0], v[1]), b.fadd(v[2], v[3]))


def _bcast(b, p, j):
    return _splat(b, b.load(b.gep(p, [j])), _STATE_LANES)


def _fmadd(b, x, y, acc):
    return b.fadd(acc, b.fmul(x, y, flags=_FMA), flags=_FMA)


def _v7_token(b, ptrs, nk, nv, c0, accs):
    st, kk, w, ka, k, v, r, out = ptrs
    sas, outs = accs

    def removal(j, u):  # sa = sum_j kk[j] st[j]  (= S kk for these value channels)
        row = b.load(_lanes_at(b, st, b.add(b.mul(j, nv), c0)), align=4)
        b.store(_fmadd(b, row, _bcast(b, kk, j), b.load(sas[u])), sas[u])

    _each_row(b, nk, removal)
    sa = _accumulated(b, sas)
    vv = b.load(_lanes_at(b, v, c0), align=4)

    def update(j, u):  # st[j] = st[j] w[j] - sa ka[j] + v k[j];  out += r[j] st[j]
        p = _lanes_at(b, st, b.add(b.mul(j, nv), c0))
        x = b.fmul(b.load(p, align=4), _bcast(b, w, j))
        x = b.fsub(x, b.fmul(sa, _bcast(b, ka, j), flags=_FMA), flags=_FMA)
        x = _fmadd(b, vv, _bcast(b, k, j), x)
        b.store(x, p, align=4)
        b.store(_fmadd(b, x, _bcast(b, r, j), b.load(outs[u])), outs[u])

    _each_row(b, nk, update)
    b.store(_accumulated(b, outs), _lanes_at(b, out, c0), align=4)


def _v5_token(b, ptrs, nk, nv, c0, accs):
    st, r, k, w, u_, v, out = ptrs
    outs = accs[0]
    vv = b.load(_lanes_at(b, v, c0), align=4)

    def row(j, u):  # kv = k[j] v;  out += r[j] (st[j] + u[j] kv);  st[j] = kv + w[j] st[j]
        p = _lanes_at(b, st, b.add(b.mul(j, nv), c0))
        x = b.load(p, align=4)
        kv = b.fmul(vv, _bcast(b, k, j))
        b.store(_fmadd(b, _fmadd(b, kv, _bcast(b, u_, j), x), _bcast(b, r, j), b.load(outs[u])),
                outs[u])
        b.store(_fmadd(b, x, _bcast(b, w, j), kv), p, align=4)

    _each_row(b, nk, row)
    b.store(_accumulated(b, outs), _lanes_at(b, out, c0), align=4)


#: ``wkv7_token(st, kk, w, ka, k, v, r, out, nk, nv, nb)``: one token of v7's rule on the
#: first 16 nb value channels of a head's state st (nk rows of nv): per value channel
#: sa = S kk, S = S diag(w) - sa ka^T + v k^T, out = S r (ka = kk * a).
wkv7_token = _state_kernel(8, _v7_token)
#: ``wkv5_token(st, r, k, w, u, v, out, nk, nv, nb)``: one token of v5/v6's recurrence on the
#: first 16 nb value channels: out = r (S + u k^T v), S = k^T v + w S (rows scaled by w).
wkv5_token = _state_kernel(7, _v5_token)


# -- activations rounded to integer blocks (the int8/int16 products' inputs) --------------------

def _quantize_blocks():
    """Make an intrinsic ``quantize(x, xq, dx, sx, nb, qmax)``: for each block i of 32 float32
    values of x (1-D): dx[i] = amax / qmax, xq = rint(x / dx) as computed by x * (1 / dx), sx[i]
    = dx[i] * sum(xq) (xq int8 or int16, 1-D). A block holding a NaN or an infinity gets
    dx = sx = NaN and xq = 0 (its products come out NaN, as in float arithmetic). The float32
    operations of the scalar loop it replaced (bit for bit the same blocks), in vector code:
    512 x 3072 values 2.4 -> 0.56 ms on one thread."""

    def typer(typingctx, x, xq, dx, sx, nb, qmax):
        sig = nbt.void(x, xq, dx, sx, nbt.intp, nbt.float64)
        elem = ir.IntType(xq.dtype.bitwidth)

        def codegen(context, b, signature, args):
            xs, dxs, sxs = (_arg_ptr(context, b, signature, args, k) for k in (0, 2, 3))
            qs = _arg_ptr(context, b, signature, args, 1, elem)
            qmax = b.fptrunc(args[5], _F32)
            f32v, i32v = _vec(_F32), _vec(_I32)
            inf = ir.Constant(f32v, [float("inf")] * _N)
            with cgutils.for_range(b, args[4]) as loop:
                i = loop.index
                off = b.mul(i, ir.Constant(_I64, _N))
                v = b.load(b.bitcast(b.gep(xs, [off]), ir.PointerType(f32v)), align=4)
                a = _x86(b, "llvm.fabs.v32f32", f32v, [f32v], [v])
                finite = b.icmp_unsigned(  # every |v| < inf (false for NaN and inf)
                    "==", b.bitcast(b.fcmp_ordered("<", a, inf), ir.IntType(_N)),
                    ir.Constant(ir.IntType(_N), (1 << _N) - 1))
                n = _N
                while n > 1:  # the largest |v| (all finite where it is used)
                    lo, hi = _halves(b, a, n)
                    a = b.select(b.fcmp_ordered(">", hi, lo), hi, lo)
                    n //= 2
                amax = b.extract_element(a, ir.Constant(_I32, 0))
                d = b.fdiv(amax, qmax)
                zero = ir.Constant(_F32, 0.0)
                inv = b.select(b.fcmp_ordered(">", d, zero), b.fdiv(ir.Constant(_F32, 1.0), d),
                               zero)
                # a block of subnormals only (amax < 2^-126 qmax) has 1 / dx = inf: it counts
                # as zeros (xq = 0, sx = 0), which it is next to any normal float32 term
                usable = b.and_(finite, b.fcmp_ordered("<", inv, ir.Constant(_F32, float("inf"))))
                q = _x86(b, "llvm.rint.v32f32", f32v, [f32v], [b.fmul(v, _splat(b, inv))])
                qi = b.select(usable, b.fptosi(q, i32v), ir.Constant(i32v, None))
                b.store(b.trunc(qi, _vec(elem)),
                        b.bitcast(b.gep(qs, [off]), ir.PointerType(_vec(elem))), align=1)
                n, s = _N, qi
                while n > 1:
                    lo, hi = _halves(b, s, n)
                    s = b.add(lo, hi)
                    n //= 2
                d = b.select(finite, d, ir.Constant(_F32, float("nan")))
                b.store(d, b.gep(dxs, [i]))
                b.store(b.fmul(d, b.sitofp(b.extract_element(s, ir.Constant(_I32, 0)), _F32)),
                        b.gep(sxs, [i]))
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typer)


quantize_blocks = _quantize_blocks()


# -- exp on float32 vectors (the one-token glue's sigmoids and decays) ---------------------------
#
# numba calls the C library's scalar expf for math.exp: ~25 of the 50 ns a v7 channel took in
# the one-token step. Here: exp(x) = 2^n p(r), n = rint(x log2 e), r = x - n ln 2 in two parts
# (Cody and Waite), p Cephes' degree-7 polynomial for expf (coefficients from its expf.c), the
# power of two applied as two factors 2^(n/2) so that results down to the subnormals come out
# as exp's; x above 88.72 gives inf, below -104 gives 0, NaN stays NaN. Within 1 ulp of exp
# (tested against float64 exp over [-110, 95]).

_EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
          1.6666665459e-1, 5.0000001201e-1)
_LN2_HI, _LN2_LO, _LOG2E = 0.693359375, -2.12194440e-4, 1.44269504088896341


def _exp8(b, x):
    """exp of a <8 x float>."""
    def c(v):
        return ir.Constant(_F32x8, [v] * 8)

    def i(v):
        return ir.Constant(_I32x8, [v] * 8)

    nan = b.fcmp_unordered("uno", x, x)
    xs = b.select(nan, c(0.0), x)
    xs = b.select(b.fcmp_ordered(">", xs, c(88.8)), c(88.8), xs)
    xs = b.select(b.fcmp_ordered("<", xs, c(-104.0)), c(-104.0), xs)
    n = _x86(b, "llvm.rint.v8f32", _F32x8, [_F32x8], [b.fmul(xs, c(_LOG2E))])
    r = b.fsub(b.fsub(xs, b.fmul(n, c(_LN2_HI))), b.fmul(n, c(_LN2_LO)))
    p = c(_EXP_P[0])
    for k in _EXP_P[1:]:
        p = b.fadd(b.fmul(p, r), c(k))
    p = b.fadd(b.fadd(b.fmul(p, b.fmul(r, r)), r), c(1.0))
    ni = b.fptosi(n, _I32x8)
    n1 = b.ashr(ni, i(1))
    n2 = b.sub(ni, n1)

    def pow2(e):
        return b.bitcast(b.shl(b.add(e, i(127)), i(23)), _F32x8)

    y = b.fmul(b.fmul(p, pow2(n1)), pow2(n2))
    return b.select(nan, x, y)


def _exp_f32():
    """Make an intrinsic ``exp8(x, y, n8)``: y[:8 n8] = exp(x[:8 n8]) (float32 1-D arrays,
    y may be x)."""

    def typer(typingctx, x, y, n8):
        sig = nbt.void(x, y, nbt.intp)

        def codegen(context, b, signature, args):
            xs, ys = (_arg_ptr(context, b, signature, args, k, _F32x8) for k in (0, 1))
            with cgutils.for_range(b, args[2]) as loop:
                v = b.load(b.gep(xs, [loop.index]), align=4)
                b.store(_exp8(b, v), b.gep(ys, [loop.index]), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typer)


exp8_f32 = _exp_f32()
