"""K-quant (Q2_K .. Q6_K) row kernels: explicit LLVM vector code (numba intrinsics) on ggml's
super-blocks of 256 weights, read as stored (no repacking); their numba drivers are in
kernels/linear/kquant_drivers.py, the interleaved groups in kquants_x8.py.

Two families, as for the 32-weight formats (kernels/ir/rows.py, kernels/ir/x8.py):

* exact (``kdot_*``, ``kdeq_*``): each super-block decoded exactly as ggml's
  ``dequantize_row_*_K`` (the sub-block factors ``d * sc`` and ``dmin * m`` rounded to float32,
  then ``d1 * q - m1`` or ``d1 * q``, each operation rounded: no fused multiply-add), 32 weights
  at a time, each multiplied by its float32 activation and added to its lane in one fused
  multiply-add; the 32 lanes are summed at the end of the row. So the result is the float32
  ``dequantize(W) @ x`` in another summation order, NaN and inf included.
* integer (``kdotq_*``, x86 AVX2): the activations rounded per 256 values to int8 as ggml's
  Q8_K does (one float32 scale ``amax/127``, 16 sums of 16 codes as int16), the codes multiplied
  with vpmaddubsw and the sub-block scales applied with vpmaddwd, ggml's own method (its
  ``ggml_vec_dot_q*_K_q8_K``): per super-block one <8 x i32> integer sum converted once and
  scaled by ``d * dx``; the mins (Q2_K/Q4_K/Q5_K) and the code offsets (Q3_K: 4, Q6_K: 32) come
  back through the activation's 16-value sums. Lossy through the activations only, exactly as
  llama.cpp is.

Integer ranges: vpmaddubsw adds two code x activation products, at most 2 * 63 * 127 = 16002
(6-bit codes), inside int16; vpmaddwd then multiplies the pairs by the sub-block scale (at most
63, or 127 in magnitude for Q6_K) and adds two, and 8 such vectors make a super-block's sum:
below 2^26 per lane.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils
from numba.core import types as nbt
from numba.extending import intrinsic

from ...quant import get_format
from .base import (
    _F32,
    _FMA,
    _I8,
    _I16,
    _I32,
    _I64,
    _arg_ptr,
    _codes_to_float,
    _const,
    _F32x8,
    _halves,
    _hsum,
    _I16x16,
    _I32x8,
    _load,
    _maddubs,
    _maddwd,
    _splat,
    _vec,
    _x86,
)

QK_K = 256
#: (name, ggml bytes per super-block: quant's format class) of the kinds 0..4 the drivers take.
KINDS = tuple((n, get_format(n).type_size) for n in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"))
KIND = {name: k for k, (name, _) in enumerate(KINDS)}

_c64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
_c32 = lambda v: ir.Constant(_I32, v)  # noqa: E731


def _byte(b, blk, off):
    return _load(b, blk, _c64(off), _I8)


def _hf(b, blk, off):
    """float32 of the IEEE half at byte blk + off."""
    return b.fpext(b.bitcast(_load(b, blk, _c64(off), _I16), ir.HalfType()), _F32)


def _v32(b, blk, off):
    """<32 x i8> at blk + off."""
    return _load(b, blk, _c64(off), _vec(_I8))


def _bits(b, v8, mask):
    """<32 x i1>: v8 & mask != 0."""
    return b.icmp_unsigned("!=", b.and_(v8, _const(_I8, [mask] * 32)), _const(_I8, [0] * 32))


def _shr_and(b, v8, shift, mask):
    if shift:
        v8 = b.lshr(v8, _const(_I8, [shift] * 32))
    return b.and_(v8, _const(_I8, [mask] * 32))


def _u32(b, blk, off):
    return _load(b, blk, _c64(off), _I32)


def _k4_scales(b, blk, off):
    """Q4_K/Q5_K's 12 bytes at blk + off -> (<8 x i8> 6-bit scales, <8 x i8> 6-bit mins), as
    ggml's get_scale_min_k4 gives them for sub-blocks 0..7 (three 32-bit words rearranged)."""
    u0, u1, u2 = (_u32(b, blk, off + 4 * k) for k in range(3))
    m6, m4, m2 = _c32(0x3F3F3F3F), _c32(0x0F0F0F0F), _c32(0x03030303)
    hi_s = b.shl(b.and_(b.lshr(u0, _c32(6)), m2), _c32(4))
    hi_m = b.shl(b.and_(b.lshr(u1, _c32(6)), m2), _c32(4))
    sc = [b.and_(u0, m6), b.or_(b.and_(u2, m4), hi_s)]
    mn = [b.and_(u1, m6), b.or_(b.and_(b.lshr(u2, _c32(4)), m4), hi_m)]

    def vec8(words):
        v = ir.Constant(_vec(_I32, 2), ir.Undefined)
        for k, w in enumerate(words):
            v = b.insert_element(v, w, _c32(k))
        return b.bitcast(v, _vec(_I8, 8))

    return vec8(sc), vec8(mn)


def _q3_scales(b, blk, off):
    """Q3_K's 12 bytes at blk + off -> <16 x i8> of the 6-bit scales (0..63, before - 32)."""
    u0, u1, u2 = (_u32(b, blk, off + 4 * k) for k in range(3))
    m4, m2 = _c32(0x0F0F0F0F), _c32(0x03030303)
    words = [
        b.or_(b.and_(u0, m4), b.shl(b.and_(u2, m2), _c32(4))),
        b.or_(b.and_(u1, m4), b.shl(b.and_(b.lshr(u2, _c32(2)), m2), _c32(4))),
        b.or_(b.and_(b.lshr(u0, _c32(4)), m4), b.shl(b.and_(b.lshr(u2, _c32(4)), m2), _c32(4))),
        b.or_(b.and_(b.lshr(u1, _c32(4)), m4), b.shl(b.and_(b.lshr(u2, _c32(6)), m2), _c32(4))),
    ]
    v = ir.Constant(_vec(_I32, 4), ir.Undefined)
    for k, w in enumerate(words):
        v = b.insert_element(v, w, _c32(k))
    return b.bitcast(v, _vec(_I8, 16))


# -- per format: the super-block as 8 chunks of 32 consecutive elements ----------------------
#
# Each ``_parts_*`` returns (d, dmin, codes, sc16, mn16, offset): the super-block factors
# (float32; dmin None without mins), the 8 chunks' codes (<32 x i8>, unsigned, element order),
# the scales and mins of the 16 runs of 16 elements (<16 x i16>; Q4_K/Q5_K's 32-element
# sub-blocks give two equal runs), and the codes' offset (0, Q3_K 4, Q6_K 32):
#   element e = d * sc16[e // 16] * (code - offset) - dmin * mn16[e // 16]
# evaluated by the exact family as ggml does (``(d * sc) * q - dmin * m``, each rounded) and by
# the integer family as vpmaddubsw(code, xq) then vpmaddwd with the chunk's scales, the mins and
# offsets through the activation's 16-element sums.

_I16x8 = _vec(_I16, 8)


def _wide16(b, v8, signed=False):
    """<n x i8> -> <n x i16>."""
    t = _vec(_I16, v8.type.count)
    return b.sext(v8, t) if signed else b.zext(v8, t)


def _dup16(b, v8x16):
    """<8 x i16> -> <16 x i16> with each lane twice (a 32-element sub-block's two runs)."""
    return b.shuffle_vector(v8x16, v8x16, ir.Constant(_vec(_I32, 16), [k // 2 for k in range(16)]))


def _parts_q2k(b, blk):
    d, dmin = _hf(b, blk, 80), _hf(b, blk, 82)
    s = _load(b, blk, _c64(0), _vec(_I8, 16))
    sc16 = _wide16(b, b.and_(s, _const(_I8, [15] * 16)))
    mn16 = _wide16(b, b.lshr(s, _const(_I8, [4] * 16)))
    codes = []
    for n in range(2):
        qs = _v32(b, blk, 16 + 32 * n)
        codes += [_shr_and(b, qs, 2 * j, 3) for j in range(4)]
    return d, dmin, codes, sc16, mn16, 0


def _parts_q3k(b, blk):
    d = _hf(b, blk, 108)
    sc16 = b.sub(_wide16(b, _q3_scales(b, blk, 96)), _const(_I16, [32] * 16))
    hm = _v32(b, blk, 0)
    codes = []
    for n in range(2):
        qs = _v32(b, blk, 32 + 32 * n)
        for j in range(4):
            high = b.select(
                _bits(b, hm, 1 << (4 * n + j)), _const(_I8, [4] * 32), _const(_I8, [0] * 32)
            )
            codes.append(b.or_(_shr_and(b, qs, 2 * j, 3), high))
    return d, None, codes, sc16, None, 4


def _parts_q45k(b, blk, five):
    d, dmin = _hf(b, blk, 0), _hf(b, blk, 2)
    sc8, mn8 = _k4_scales(b, blk, 4)
    qh = _v32(b, blk, 16) if five else None
    q0 = 48 if five else 16
    codes = []
    for g in range(4):
        packed = _v32(b, blk, q0 + 32 * g)
        for h in range(2):
            c = _shr_and(b, packed, 4 * h, 15)
            if five:
                c = b.or_(
                    c,
                    b.select(
                        _bits(b, qh, 1 << (2 * g + h)),
                        _const(_I8, [16] * 32),
                        _const(_I8, [0] * 32),
                    ),
                )
            codes.append(c)
    return d, dmin, codes, _dup16(b, _wide16(b, sc8)), _dup16(b, _wide16(b, mn8)), 0


def _parts_q6k(b, blk):
    d = _hf(b, blk, 208)
    sc16 = _wide16(b, _load(b, blk, _c64(192), _vec(_I8, 16)), signed=True)
    codes = []
    for p in range(2):
        qh = _v32(b, blk, 128 + 32 * p)
        for k in range(4):
            lo = _shr_and(b, _v32(b, blk, 64 * p + 32 * (k % 2)), 4 * (k // 2), 15)
            hi = b.shl(_shr_and(b, qh, 2 * k, 3), _const(_I8, [4] * 32))
            codes.append(b.or_(lo, hi))
    return d, None, codes, sc16, None, 32


_PARTS = (
    _parts_q2k,
    _parts_q3k,
    lambda b, blk: _parts_q45k(b, blk, False),
    lambda b, blk: _parts_q45k(b, blk, True),
    _parts_q6k,
)


def _runs32(b, v16, j):
    """<32 x t> from <16 x t>: lanes 0-15 = v16[2j], lanes 16-31 = v16[2j + 1]."""
    return b.shuffle_vector(v16, v16, ir.Constant(_vec(_I32), [2 * j] * 16 + [2 * j + 1] * 16))


def _factors(b, d, dmin, sc16, mn16):
    """<16 x float> d * sc and dmin * m per run, each one float32 product as ggml rounds it."""
    d1 = b.fmul(_splat(b, d, 16), b.sitofp(sc16, _vec(_F32, 16)))
    m1 = None if mn16 is None else b.fmul(_splat(b, dmin, 16), b.sitofp(mn16, _vec(_F32, 16)))
    return d1, m1


def _exact_weights(b, d1, m1, code, offset, j):
    """Chunk j's 32 weights as ggml's dequantize_row_*_K computes them."""
    q = _codes_to_float(b, b.zext(code, _vec(_I32)), offset)
    w = b.fmul(_runs32(b, d1, j), q)
    if m1 is not None:
        w = b.fsub(w, _runs32(b, m1, j))
    return w


def _kdot(kind):
    """Make an intrinsic ``dot(row, x, nb) -> float32``: the first nb super-blocks of a row
    (1-D uint8) . x (float32, 256 nb), exact (see the module docstring)."""
    size, parts = KINDS[kind][1], _PARTS[kind]

    def typer(typingctx, row, x, nb):
        sig = nbt.float32(row, x, nbt.intp)

        def codegen(context, b, signature, args):
            base = _arg_ptr(context, b, signature, args, 0, _I8)
            xs = _arg_ptr(context, b, signature, args, 1)
            acc = cgutils.alloca_once_value(b, ir.Constant(_vec(_F32), None))
            with cgutils.for_range(b, args[2]) as loop:
                i = loop.index
                blk = b.gep(base, [b.mul(i, _c64(size))])
                d, dmin, codes, sc16, mn16, offset = parts(b, blk)
                d1, m1 = _factors(b, d, dmin, sc16, mn16)
                for j, code in enumerate(codes):
                    w = _exact_weights(b, d1, m1, code, offset, j)
                    xp = b.gep(xs, [b.add(b.mul(i, _c64(QK_K)), _c64(32 * j))])
                    xv = b.load(b.bitcast(xp, ir.PointerType(_vec(_F32))), align=4)
                    b.store(b.fadd(b.load(acc), b.fmul(w, xv, flags=_FMA), flags=_FMA), acc)
            return _hsum(b, b.load(acc), 32)

        return sig, codegen

    return intrinsic(typer)


def _kdeq(kind):
    """Make an intrinsic ``deq(row, out, nb)``: out[:256 nb] = the row's first nb super-blocks
    dequantized, bit for bit ggml's dequantize_row_*_K."""
    size, parts = KINDS[kind][1], _PARTS[kind]

    def typer(typingctx, row, out, nb):
        sig = nbt.void(row, out, nbt.intp)

        def codegen(context, b, signature, args):
            base = _arg_ptr(context, b, signature, args, 0, _I8)
            ys = _arg_ptr(context, b, signature, args, 1)
            with cgutils.for_range(b, args[2]) as loop:
                i = loop.index
                blk = b.gep(base, [b.mul(i, _c64(size))])
                d, dmin, codes, sc16, mn16, offset = parts(b, blk)
                d1, m1 = _factors(b, d, dmin, sc16, mn16)
                for j, code in enumerate(codes):
                    yp = b.gep(ys, [b.add(b.mul(i, _c64(QK_K)), _c64(32 * j))])
                    b.store(
                        _exact_weights(b, d1, m1, code, offset, j),
                        b.bitcast(yp, ir.PointerType(_vec(_F32))),
                        align=4,
                    )
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typer)


def _kdotq(kind):
    """Make an intrinsic ``dotq(row, xq, dx, bs, nb) -> float32``: the first nb super-blocks of
    a row . x given as Q8_K-like blocks (xq int8 256 nb, dx float32 nb, bs int16 16 nb: the sums
    of each 16 codes)."""
    size, parts = KINDS[kind][1], _PARTS[kind]

    def typer(typingctx, row, xq, dx, bs, nb):
        sig = nbt.float32(row, xq, dx, bs, nbt.intp)

        def codegen(context, b, signature, args):
            base = _arg_ptr(context, b, signature, args, 0, _I8)
            xqs = _arg_ptr(context, b, signature, args, 1, _I8)
            dxs = _arg_ptr(context, b, signature, args, 2)
            bss = _arg_ptr(context, b, signature, args, 3, _I16)
            acc = cgutils.alloca_once_value(b, ir.Constant(_F32x8, None))
            accm = cgutils.alloca_once_value(b, ir.Constant(_F32x8, None))
            with cgutils.for_range(b, args[4]) as loop:
                i = loop.index
                blk = b.gep(base, [b.mul(i, _c64(size))])
                d, dmin, codes, sc16, mn16, offset = parts(b, blk)
                xb = b.gep(xqs, [b.mul(i, _c64(QK_K))])
                bsv = b.load(
                    b.bitcast(b.gep(bss, [b.mul(i, _c64(16))]), ir.PointerType(_I16x16)), align=2
                )
                isum = ir.Constant(_I32x8, None)
                for j, code in enumerate(codes):
                    xv = _load(b, xb, _c64(32 * j), _vec(_I8))
                    s16 = b.shuffle_vector(
                        sc16, sc16, ir.Constant(_vec(_I32, 16), [2 * j] * 8 + [2 * j + 1] * 8)
                    )
                    isum = b.add(isum, _maddwd(b, _maddubs(b, code, xv), s16))
                if offset:  # sum (q - o) sc x = sum q sc x - o sum sc bs
                    corr = b.mul(_maddwd(b, sc16, bsv), ir.Constant(_I32x8, [offset] * 8))
                    isum = b.sub(isum, corr)
                dxi = b.load(b.gep(dxs, [i]))
                s = b.fmul(d, dxi)
                b.store(
                    b.fadd(
                        b.load(acc),
                        b.fmul(b.sitofp(isum, _F32x8), _splat(b, s, 8), flags=_FMA),
                        flags=_FMA,
                    ),
                    acc,
                )
                if mn16 is not None:  # the mins: dmin dx sum m bs, subtracted at the end
                    msum = b.sitofp(_maddwd(b, mn16, bsv), _F32x8)
                    sm = b.fmul(dmin, dxi)
                    b.store(
                        b.fadd(
                            b.load(accm), b.fmul(msum, _splat(b, sm, 8), flags=_FMA), flags=_FMA
                        ),
                        accm,
                    )
            return b.fsub(_hsum(b, b.load(acc), 8), _hsum(b, b.load(accm), 8))

        return sig, codegen

    return intrinsic(typer)


kdot_q2_k, kdot_q3_k, kdot_q4_k, kdot_q5_k, kdot_q6_k = (_kdot(k) for k in range(5))
kdeq_q2_k, kdeq_q3_k, kdeq_q4_k, kdeq_q5_k, kdeq_q6_k = (_kdeq(k) for k in range(5))
kdotq_q2_k, kdotq_q3_k, kdotq_q4_k, kdotq_q5_k, kdotq_q6_k = (_kdotq(k) for k in range(5))


def _quantize_q8k():
    """Make an intrinsic ``quantize(x, xq, dx, bs, nb)`` (1-D arrays): for each block i of 256
    float32 values of x, dx[i] = amax / 127, xq = rint(x * (127 / amax)) (int8), bs[16 i + k] =
    the sum of xq[256 i + 16 k: +16] (int16). A block holding a NaN or an infinity gets dx = NaN
    (its products come out NaN, as in float arithmetic), xq = 0 and bs = 0; an all-zero block,
    or one so small that 127 / amax overflows, gets xq = 0 and bs = 0 (and dx = amax / 127).
    Vector code (8 x 32 lanes a block), no branches, with the float32 operations of the plain
    scalar loop (docs/kernels.md has their speeds)."""

    def typer(typingctx, x, xq, dx, bs, nb):
        sig = nbt.void(x, xq, dx, bs, nbt.intp)

        def codegen(context, b, signature, args):
            xs, dxs = (_arg_ptr(context, b, signature, args, k) for k in (0, 2))
            qs = _arg_ptr(context, b, signature, args, 1, _I8)
            bss = _arg_ptr(context, b, signature, args, 3, _I16)
            f32v, i32v = _vec(_F32), _vec(_I32)
            inf = ir.Constant(_F32, float("inf"))
            with cgutils.for_range(b, args[4]) as loop:
                i = loop.index
                o = b.mul(i, _c64(QK_K))
                vs = [
                    b.load(
                        b.bitcast(b.gep(xs, [b.add(o, _c64(32 * j))]), ir.PointerType(f32v)),
                        align=4,
                    )
                    for j in range(8)
                ]
                ab = [_x86(b, "llvm.fabs.v32f32", f32v, [f32v], [v]) for v in vs]
                ok, m = None, None
                for a in ab:  # every |x| < inf (false for NaN, inf), and the largest |x|
                    f = b.fcmp_ordered("<", a, ir.Constant(f32v, [float("inf")] * 32))
                    ok = f if ok is None else b.and_(ok, f)
                    m = a if m is None else b.select(b.fcmp_ordered(">", a, m), a, m)
                n = 32
                while n > 1:
                    lo, hi = _halves(b, m, n)
                    m = b.select(b.fcmp_ordered(">", hi, lo), hi, lo)
                    n //= 2
                amax = b.extract_element(m, _c32(0))
                finite = b.icmp_unsigned(
                    "==", b.bitcast(ok, ir.IntType(32)), ir.Constant(ir.IntType(32), (1 << 32) - 1)
                )
                inv = b.fdiv(ir.Constant(_F32, 127.0), amax)
                usable = b.and_(finite, b.fcmp_ordered("<", inv, inf))
                d = b.fdiv(amax, ir.Constant(_F32, 127.0))
                b.store(b.select(finite, d, ir.Constant(_F32, float("nan"))), b.gep(dxs, [i]))
                for j, v in enumerate(vs):
                    q = _x86(b, "llvm.rint.v32f32", f32v, [f32v], [b.fmul(v, _splat(b, inv))])
                    qi = b.select(usable, b.fptosi(q, i32v), ir.Constant(i32v, None))
                    b.store(
                        b.trunc(qi, _vec(_I8)),
                        b.bitcast(b.gep(qs, [b.add(o, _c64(32 * j))]), ir.PointerType(_vec(_I8))),
                        align=1,
                    )
                    for h, half in enumerate(_halves(b, qi, 32)):
                        s, n = half, 16
                        while n > 1:
                            lo, hi = _halves(b, s, n)
                            s = b.add(lo, hi)
                            n //= 2
                        k = b.add(b.mul(i, _c64(16)), _c64(2 * j + h))
                        b.store(b.trunc(b.extract_element(s, _c32(0)), _I16), b.gep(bss, [k]))
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typer)


_quantize_q8k_ir = _quantize_q8k()
