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
weight is ``q * d`` (or ``q * d + m``) rounded to float32, multiplied by its activation and
added to its lane; the lanes are summed in order at the end. No fast-math flags: the result is
the float32 ``dequantize(W) @ x`` up to summation order, NaN and inf included.

Every function has the signature ``dot(row, x, nb) -> float32``: ``row`` a 1-D uint8 array of
``nb`` blocks (F16/BF16/F32: ``nb`` chunks of 32 values), ``x`` float32 with at least
``32 * nb`` values. Plain LLVM IR, no target intrinsics: other CPUs get their own lowering.
"""

from __future__ import annotations

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


def _half(b, base, offset):
    """The float32 value of the IEEE half at byte ``base + offset`` (exact)."""
    return b.fpext(b.bitcast(_load(b, base, offset, _I16), ir.HalfType()), _F32)


def _codes_to_float(b, codes_i32, offset):
    """float32(code - offset) for integer codes in 0..255 (exact): the code goes into the
    mantissa of 2^23, then 2^23 + offset is subtracted."""
    bits = b.or_(codes_i32, _const(_I32, [_MAGIC] * _N))
    return b.fsub(b.bitcast(bits, _vec(_F32)), _const(_F32, [_TWO23 + offset] * _N))


def _nibbles(b, packed16):
    """<16 x i8> packed nibbles -> <32 x i32> codes: low nibbles first (ggml's order)."""
    lo = b.and_(packed16, _const(_I8, [15] * 16))
    hi = b.lshr(packed16, _const(_I8, [4] * 16))
    both = b.shuffle_vector(lo, hi, ir.Constant(_vec(_I32), list(range(_N))))
    return b.zext(both, _vec(_I32))


def _fifth_bits(b, qh):
    """Bit j of the 32-bit ``qh`` moved to bit 4 of lane j (Q5_x's high bits)."""
    bits = b.lshr(_splat(b, qh), _const(_I32, range(_N)))
    return b.shl(b.and_(bits, _const(_I32, [1] * _N)), _const(_I32, [4] * _N))


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
                b.store(b.fadd(b.load(acc), b.fmul(w, xv)), acc)
            lanes = b.load(acc)
            s = b.extract_element(lanes, ir.Constant(_I32, 0))
            for j in range(1, _N):
                s = b.fadd(s, b.extract_element(lanes, ir.Constant(_I32, j)))
            return s

        return sig, codegen

    return intrinsic(typer)


def _q4_0(b, blk):  # d (f16), 16 bytes of nibbles: w = (q - 8) * d
    d = _half(b, blk, None)
    q = _nibbles(b, _load(b, blk, ir.Constant(_I64, 2), _vec(_I8, 16)))
    return b.fmul(_codes_to_float(b, q, 8), _splat(b, d))


def _q4_1(b, blk):  # d, m (f16), 16 bytes: w = q * d + m
    d, m = _half(b, blk, None), _half(b, blk, ir.Constant(_I64, 2))
    q = _nibbles(b, _load(b, blk, ir.Constant(_I64, 4), _vec(_I8, 16)))
    return b.fadd(b.fmul(_codes_to_float(b, q, 0), _splat(b, d)), _splat(b, m))


def _q5_0(b, blk):  # d, qh (u32), 16 bytes: w = (q | hbit << 4) - 16) * d
    d = _half(b, blk, None)
    qh = _load(b, blk, ir.Constant(_I64, 2), _I32)
    q = b.or_(_nibbles(b, _load(b, blk, ir.Constant(_I64, 6), _vec(_I8, 16))), _fifth_bits(b, qh))
    return b.fmul(_codes_to_float(b, q, 16), _splat(b, d))


def _q5_1(b, blk):  # d, m, qh, 16 bytes: w = (q | hbit << 4) * d + m
    d, m = _half(b, blk, None), _half(b, blk, ir.Constant(_I64, 2))
    qh = _load(b, blk, ir.Constant(_I64, 4), _I32)
    q = b.or_(_nibbles(b, _load(b, blk, ir.Constant(_I64, 8), _vec(_I8, 16))), _fifth_bits(b, qh))
    return b.fadd(b.fmul(_codes_to_float(b, q, 0), _splat(b, d)), _splat(b, m))


def _q8_0(b, blk):  # d, 32 signed bytes: w = q * d
    d = _half(b, blk, None)
    q = b.sext(_load(b, blk, ir.Constant(_I64, 2), _vec(_I8)), _vec(_I32))
    bits = b.add(q, _const(_I32, [_MAGIC + 128] * _N))  # 2^23 + (q + 128): one add, no or
    w = b.fsub(b.bitcast(bits, _vec(_F32)), _const(_F32, [_TWO23 + 128] * _N))
    return b.fmul(w, _splat(b, d))


def _f16(b, blk):
    h = _load(b, blk, None, _vec(_I16), align=2)
    return b.fpext(b.bitcast(h, _vec(ir.HalfType())), _vec(_F32))


def _bf16(b, blk):
    h = b.zext(_load(b, blk, None, _vec(_I16), align=2), _vec(_I32))
    return b.bitcast(b.shl(h, _const(_I32, [16] * _N)), _vec(_F32))


def _f32(b, blk):
    return _load(b, blk, None, _vec(_F32), align=4)


dot_q4_0 = _row_dot(18, _q4_0)
dot_q4_1 = _row_dot(20, _q4_1)
dot_q5_0 = _row_dot(22, _q5_0)
dot_q5_1 = _row_dot(24, _q5_1)
dot_q8_0 = _row_dot(34, _q8_0)
dot_f16 = _row_dot(64, _f16)
dot_bf16 = _row_dot(64, _bf16)
dot_f32 = _row_dot(128, _f32)
