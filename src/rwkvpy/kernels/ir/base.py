"""The vocabulary of the LLVM vector kernels: IR types and helpers, each block format's decoder
(32 weights of a block as a <32 x float>, exactly as ggml's ``dequantize_row_*`` computes them)
and the x86 integer multiply-add instructions of the integer products.

Decoding without ``cvtdq2ps`` (slow on the CPUs these were written on): an integer code ``c``
(0..255) is or-ed into the mantissa of 2^23, and 2^23 (+ the format's offset) is subtracted,
exact for any ``c < 2^23``. fp16 scales and F16 weights are widened by ``fpext half -> float``
(one ``vcvtph2ps`` with F16C).
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils

from ..kinds import Kind

_F32, _I8, _I16, _I32, _I64 = (
    ir.FloatType(),
    ir.IntType(8),
    ir.IntType(16),
    ir.IntType(32),
    ir.IntType(64),
)
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
    return b.shuffle_vector(
        u, ir.Constant(_vec(v.type, n), ir.Undefined), ir.Constant(_vec(_I32, n), [0] * n)
    )


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
    high = b.select(
        b.icmp_unsigned("!=", bit, _const(_I8, [0] * _N)),
        _const(_I8, [16] * _N),
        _const(_I8, [0] * _N),
    )
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


def _store32(b, out_row, col, w):
    p = b.bitcast(b.gep(out_row, [col]), ir.PointerType(_vec(_F32)))
    b.store(w, p, align=4)


#: The decoder of each kind's blocks (kernels.kinds.Kind): ``w(b, blk)`` -> <32 x float>.
WEIGHTS = {
    Kind.Q4_0: _q4_0,
    Kind.Q4_1: _q4_1,
    Kind.Q5_0: _q5_0,
    Kind.Q5_1: _q5_1,
    Kind.Q8_0: _q8_0,
    Kind.F16: _f16,
    Kind.BF16: _bf16,
    Kind.F32: _f32,
}
