"""K-quant (Q2_K .. Q6_K) row kernels: explicit LLVM vector code (numba intrinsics) on ggml's
super-blocks of 256 weights, read as stored (no repacking), and their numba drivers.

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

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils
from numba.core import types as nbt
from numba.extending import intrinsic

from .ir.base import (_F32, _FMA, _I8, _I16, _I32, _I64, _arg_ptr, _codes_to_float, _const,
                      _F32x8, _halves, _hsum, _I16x16, _I32x8, _load, _maddubs, _maddwd,
                      _ones16, _splat, _vec, _x86)
from .ir.x8 import (X8_PREFETCH, X8_STREAMS, _bcast4, _fma8, _groups_args, _half8, _passes,
                    _prefetch, _rows2, _x8_store)

QK_K = 256
#: (name, ggml bytes per super-block) of the kinds 0..4 the drivers take.
KINDS = (("Q2_K", 84), ("Q3_K", 110), ("Q4_K", 144), ("Q5_K", 176), ("Q6_K", 210))
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
    words = [b.or_(b.and_(u0, m4), b.shl(b.and_(u2, m2), _c32(4))),
             b.or_(b.and_(u1, m4), b.shl(b.and_(b.lshr(u2, _c32(2)), m2), _c32(4))),
             b.or_(b.and_(b.lshr(u0, _c32(4)), m4), b.shl(b.and_(b.lshr(u2, _c32(4)), m2), _c32(4))),
             b.or_(b.and_(b.lshr(u1, _c32(4)), m4), b.shl(b.and_(b.lshr(u2, _c32(6)), m2), _c32(4)))]
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
            high = b.select(_bits(b, hm, 1 << (4 * n + j)), _const(_I8, [4] * 32),
                            _const(_I8, [0] * 32))
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
                c = b.or_(c, b.select(_bits(b, qh, 1 << (2 * g + h)), _const(_I8, [16] * 32),
                                      _const(_I8, [0] * 32)))
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


_PARTS = (_parts_q2k, _parts_q3k, lambda b, blk: _parts_q45k(b, blk, False),
          lambda b, blk: _parts_q45k(b, blk, True), _parts_q6k)


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
                    b.store(_exact_weights(b, d1, m1, code, offset, j),
                            b.bitcast(yp, ir.PointerType(_vec(_F32))), align=4)
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
                bsv = b.load(b.bitcast(b.gep(bss, [b.mul(i, _c64(16))]),
                                       ir.PointerType(_I16x16)), align=2)
                isum = ir.Constant(_I32x8, None)
                for j, code in enumerate(codes):
                    xv = _load(b, xb, _c64(32 * j), _vec(_I8))
                    s16 = b.shuffle_vector(sc16, sc16, ir.Constant(
                        _vec(_I32, 16), [2 * j] * 8 + [2 * j + 1] * 8))
                    isum = b.add(isum, _maddwd(b, _maddubs(b, code, xv), s16))
                if offset:  # sum (q - o) sc x = sum q sc x - o sum sc bs
                    corr = b.mul(_maddwd(b, sc16, bsv), ir.Constant(_I32x8, [offset] * 8))
                    isum = b.sub(isum, corr)
                dxi = b.load(b.gep(dxs, [i]))
                s = b.fmul(d, dxi)
                b.store(b.fadd(b.load(acc), b.fmul(b.sitofp(isum, _F32x8), _splat(b, s, 8),
                                                   flags=_FMA), flags=_FMA), acc)
                if mn16 is not None:  # the mins: dmin dx sum m bs, subtracted at the end
                    msum = b.sitofp(_maddwd(b, mn16, bsv), _F32x8)
                    sm = b.fmul(dmin, dxi)
                    b.store(b.fadd(b.load(accm), b.fmul(msum, _splat(b, sm, 8), flags=_FMA),
                                   flags=_FMA), accm)
            return b.fsub(_hsum(b, b.load(acc), 8), _hsum(b, b.load(accm), 8))

        return sig, codegen

    return intrinsic(typer)


kdot_q2_k, kdot_q3_k, kdot_q4_k, kdot_q5_k, kdot_q6_k = (_kdot(k) for k in range(5))
kdeq_q2_k, kdeq_q3_k, kdeq_q4_k, kdeq_q5_k, kdeq_q6_k = (_kdeq(k) for k in range(5))
kdotq_q2_k, kdotq_q3_k, kdotq_q4_k, kdotq_q5_k, kdotq_q6_k = (_kdotq(k) for k in range(5))


# -- 8 interleaved rows (Q4_K, Q5_K, Q6_K; kernels/kquants.py KQuantX8Linear) ----------------
#
# Read row by row, each super-block of a row pays its scale decode, its 8-lane integer sum,
# conversions and float multiply-adds, and ggml's layout puts 32 codes of one row in a vector:
# the kernels above stay compute-bound at about half of Q4_0/Q8_0's speed per byte. As for
# those (kernels/ir/x8.py), the rows are repacked once into groups of 8 and each
# super-block column of a group is one record of 8 * super-block bytes (the same bytes, moved;
# X8_FIELDS): a field's dword w of row r lands at 32 w + 4 r, the float16 factors side by side.
# One 32-byte load then holds 4 consecutive codes of each of the 8 rows, the 4 activations they
# meet are one broadcast int32, and vpmaddubsw + vpmaddwd (by a vector of the 8 rows'
# sub-block scales) leave each row's sum in its own lane: no lane sums, one conversion and one
# or two multiply-adds per super-block and 8 rows. The integers are the row kernels' (the same
# Q8_K activations, quantize_q8k); only the float32 summation differs (one lane per row instead
# of 8 lanes summed at the end).
#
# Integer ranges: vpmaddubsw pairs are <= 2 * 15 * 127 = 3810 (Q4_K), 7874 (Q5_K), 16002
# (Q6_K), so a sub-block's 8 Q4_K products add up in int16 (<= 30480), Q5_K's 4 at a time and
# Q6_K's 2 at a time before their vpmaddwd by the scales.

#: Per kind (2 Q4_K, 3 Q5_K, 4 Q6_K): the fields of ggml's super-block moved into a record,
#: in record order: (offset in the super-block, bytes, unit). Unit 2: one float16 per row, the
#: 8 side by side (16 bytes); unit 4: dword w of row r at 32 w + 4 r (8 x bytes). The order is
#: the order the kernels read in, so that a record streams front to back: Q6_K's high bits of
#: each half (128 elements) just before that half's low bits (with ggml's order, qh then ql,
#: each group read as two streams far apart: from memory, one thread, 12 GB/s against 15 for
#: the row kernels).
X8_FIELDS = {
    2: ((0, 2, 2), (2, 2, 2), (4, 12, 4), (16, 128, 4)),               # d, dmin, scales, qs
    3: ((0, 2, 2), (2, 2, 2), (4, 12, 4), (16, 32, 4), (48, 128, 4)),  # ... qh, qs
    4: ((208, 2, 2), (192, 16, 4), (128, 32, 4), (0, 64, 4),           # d, scales, qh, ql of
        (160, 32, 4), (64, 64, 4)),                                     # half 0, of half 1
}
X8_KINDS = tuple(X8_FIELDS)


def x8_table(kind) -> np.ndarray:
    """X8_FIELDS[kind] with each field's record offset: int64 (n, 4) rows (super-block offset,
    bytes, unit, record offset), the form the repack drivers take."""
    rows, at = [], 0
    for off, n, unit in X8_FIELDS[kind]:
        rows.append((off, n, unit, at))
        at += 8 * n
    assert at == 8 * KINDS[kind][1]
    return np.array(rows, np.int64)


def _i32x8(v):
    return ir.Constant(_I32x8, [v] * 8)


def _pick16(b, words, picks, signed=False):
    """<16 x i16> from <8 x i32> ``words``: lane 2r + h = byte picks[h] of word r, zero- (or
    sign-) extended (one vpshufb, and a shift for the sign)."""
    v8 = b.bitcast(words, _vec(_I8))
    mask = []
    for r in range(8):
        for p in picks:
            mask += [32, 4 * r + p] if signed else [4 * r + p, 32]
    v = b.bitcast(b.shuffle_vector(v8, ir.Constant(_vec(_I8), None),
                                   ir.Constant(_vec(_I32), mask)), _I16x16)
    return b.ashr(v, ir.Constant(_I16x16, [8] * 16)) if signed else v


def _pairs_of(b, v16, j):
    """<16 x i16>: lanes 2j and 2j + 1 of ``v16`` repeated 8 times (one broadcast dword)."""
    w = b.bitcast(v16, _I32x8)
    return b.bitcast(b.shuffle_vector(w, w, ir.Constant(_I32x8, [j] * 8)), _I16x16)


class _X8Rec:
    """One record (8 rows x one super-block) at i8* ``rec``: its factors, the vectors of its
    sub-block scales and its codes. The codes come in 4 quarters of 8 steps: ``step(q, i)``
    (q an i64 value, the quarter) gives a list of (slot, codes, offset of the 4 activations
    they meet in the super-block), and after step i the int16 sums of the slots in
    ``_x8_closes(kind, i)`` are scaled by the scale vector ``scale_index(q, i, slot)``."""

    def __init__(self, b, kind, rec):
        self.b, self.kind, self.rec = b, kind, rec
        self.at = {int(off): int(r_off) for off, _, _, r_off in x8_table(kind)}
        self._words = None

    def _c8(self, v):
        return _const(_I8, [v] * 32)

    def _load32(self, off, t=_I16x16):
        off = _c64(off) if isinstance(off, int) else off
        return _load(self.b, self.rec, off, t)

    def d8(self):
        return _half8(self.b, self.rec, self.at[208 if self.kind == 4 else 0])

    def dmin8(self):
        return _half8(self.b, self.rec, self.at[2])

    def words(self):
        """Q4_K/Q5_K: (scales of sub-blocks 0-3, 4-7, mins 0-3, 4-7) as <8 x i32>, byte s of
        lane r the 6-bit value of row r (ggml's get_scale_min_k4, lane-wise); Q6_K: the 4 dwords
        of int8 scales."""
        if self._words is None:
            b = self.b
            if self.kind == 4:
                self._words = [self._load32(self.at[192] + 32 * k, _I32x8) for k in range(4)]
            else:
                u0, u1, u2 = (self._load32(self.at[4] + 32 * k, _I32x8) for k in range(3))
                m6, m4, m2 = _i32x8(0x3F3F3F3F), _i32x8(0x0F0F0F0F), _i32x8(0x03030303)
                hi_s = b.shl(b.and_(b.lshr(u0, _i32x8(6)), m2), _i32x8(4))
                hi_m = b.shl(b.and_(b.lshr(u1, _i32x8(6)), m2), _i32x8(4))
                self._words = [b.and_(u0, m6), b.or_(b.and_(u2, m4), hi_s), b.and_(u1, m6),
                               b.or_(b.and_(b.lshr(u2, _i32x8(4)), m4), hi_m)]
        return self._words

    def n_scales(self):
        return 16 if self.kind == 4 else 8

    def scale(self, s):
        """<16 x i16>: lanes 2r, 2r + 1 the scale of row r's sub-block (Q6_K: run of 16) s."""
        return _pick16(self.b, self.words()[s // 4], (s % 4, s % 4), signed=self.kind == 4)

    def mins(self, bs16):
        """Q4_K/Q5_K: <8 x i32>, lane r = sum over sub-blocks s of m(r, s) * (sum of the 32
        activation codes of s), from ``bs16`` (the 16 sums of 16 codes)."""
        b = self.b
        sums = b.trunc(_ones16(b, bs16), _vec(_I16, 8))  # the 8 sub-blocks' sums
        pairs = b.bitcast(b.shuffle_vector(sums, sums, ir.Constant(
            _vec(_I32, 16), list(range(8)) * 2)), _I16x16)
        w, out = self.words(), None
        for j in range(4):
            p = _maddwd(b, _pick16(b, w[2 + j // 2], (2 * (j % 2), 2 * (j % 2) + 1)),
                        _pairs_of(b, pairs, j))
            out = p if out is None else b.add(out, p)
        return out

    def offset_sum(self, bs16):
        """Q6_K: <8 x i32>, lane r = sum over runs k of sc(r, k) * (sum of the run's 16
        activation codes): the code offset 32 comes back as 32 times this."""
        b, w, out = self.b, self.words(), None
        for j in range(8):
            p = _maddwd(b, _pick16(b, w[j // 2], (2 * (j % 2), 2 * (j % 2) + 1), signed=True),
                        _pairs_of(b, bs16, j))
            out = p if out is None else b.add(out, p)
        return out

    def quarter(self, q):
        """Per-quarter values (i64 q): (i64 offsets of the first code vector and of the first
        qh vector, i64 element offset of the low codes, i64 index of the first low scale,
        <16 x i16> shift of the qh bits)."""
        b, c = self.b, _c64
        if self.kind == 4:  # quarter q = (p, kk): half p = q // 2 of 128 elements, kk = q % 2
            p, kk = b.lshr(q, c(1)), b.and_(q, c(1))
            x_lo = b.add(b.mul(p, c(128)), b.mul(kk, c(32)))
            s_lo = b.add(b.mul(p, c(8)), b.mul(kk, c(2)))
            at = self.at
            codes = b.add(b.add(c(at[0]), b.mul(p, c(at[64] - at[0]))), b.mul(kk, c(256)))
            qh = b.add(c(at[128]), b.mul(p, c(at[160] - at[128])))
            shift = b.mul(kk, c(2))
        else:  # quarter q: elements 64q .. 64q + 63, sub-blocks 2q (low), 2q + 1 (high)
            x_lo, s_lo = b.mul(q, c(64)), b.mul(q, c(2))
            codes = b.add(c(self.at[16 if self.kind == 2 else 48]), b.mul(q, c(256)))
            qh = c(self.at[16]) if self.kind == 3 else None
            shift = b.mul(q, c(2))
        sh = _splat(b, b.trunc(shift, _I16), 16)
        return codes, qh, x_lo, s_lo, sh

    def step(self, qv, i):
        """Step i of the quarter ``qv`` (quarter()'s values)."""
        b, kind = self.b, self.kind
        codes, qh_at, x_lo, _, sh = qv
        packed = self._load32(b.add(codes, _c64(32 * i)))
        lo = b.and_(b.bitcast(packed, _vec(_I8)), self._c8(15))
        hi = b.and_(b.bitcast(b.lshr(packed, ir.Constant(_I16x16, [4] * 16)), _vec(_I8)),
                    self._c8(15))
        if kind != 2:  # the high bits: Q5_K bits 2q, 2q + 1 of qh byte 4i + t -> bit 4 (low,
            # high codes); Q6_K bits 2kk, 2kk + 1 -> 4, 5 (low), bits 4 + 2kk, 5 + 2kk (high)
            h = b.lshr(self._load32(b.add(qh_at, _c64(32 * i))), sh)
            h4 = b.and_(b.bitcast(b.shl(h, ir.Constant(_I16x16, [4] * 16)), _vec(_I8)),
                        self._c8(16 if kind == 3 else 0x30))
            if kind == 3:
                h3 = b.shl(h, ir.Constant(_I16x16, [3] * 16))
                hh = b.and_(b.bitcast(h3, _vec(_I8)), self._c8(16))
            else:
                hh = b.and_(b.bitcast(h, _vec(_I8)), self._c8(0x30))
            lo, hi = b.or_(lo, h4), b.or_(hi, hh)
        x_hi = 64 if kind == 4 else 32
        return [(0, lo, b.add(x_lo, _c64(4 * i))), (1, hi, b.add(x_lo, _c64(x_hi + 4 * i)))]


def _x8_closes(kind, i):
    """After step i of a quarter: the slots whose int16 sums are scaled now, with the offset of
    their scale from the quarter's first low scale."""
    if kind == 4:  # runs of 16 (4 steps), 2 steps per int16 sum
        return [(0, i // 4), (1, 4 + i // 4)] if i % 2 else []
    if i == 7 or (kind == 3 and i == 3):  # sub-blocks of 32; Q5_K: 4 steps per int16 sum
        return [(0, 0), (1, 1)]
    return []


def _kdotx8(kind, tt, ng=1):
    """Make an intrinsic ``dot8(pk, g, xq2, dx2, bs2, nb, y2, t0)``: y2[t0 + u, 8g + r] = row
    8g + r . x2[t0 + u] for r < 8, u < ``tt``, from the repacked group pk[g] and the rows of x2
    as Q8_K-like blocks (xq2 int8, dx2 float32, bs2 int16: quantize_q8k's, 2-D). ``tt`` > 1
    (prompts): ``dot8(..., t0, npass)``, npass passes of ``tt`` vectors from t0, the codes made
    once per pass for all of them; ``ng`` > 1 (one vector): ``dots8(pk, g, q, ...)`` the groups
    g, g + q, ..., ``ng`` streams of weights at once. Every (group, vector) pair is computed by
    the same operations in the same order in each variant: the same float32 results.

    Per super-block: the scale vectors of each record stored once (a small stack array), the
    mins (Q4_K/Q5_K, in float32 first) or the code offset (Q6_K, in the integer sum), then a
    loop over the 4 quarters of the super-block (64 elements each, 8 steps of code vectors):
    a straight run of all 32 steps with 4 streams kept more values live than registers."""
    rec_bytes = 8 * KINDS[kind][1]
    assert ng == 1 or tt == 1
    ai = 1 if ng == 1 else 2  # the arguments after g (and q)

    def codegen(context, b, signature, args):
        arrs, gs, bases = _groups_args(context, b, signature, args, ng)
        acc = [cgutils.alloca_once_value(b, ir.Constant(_F32x8, None))
               for _ in range(max(tt, ng))]
        units = [(k, u) for k in range(ng) for u in range(tt)]  # acc[k + u]
        s32 = [cgutils.alloca_once(b, _I32x8) for _ in units]
        n_sc = 16 if kind == 4 else 8
        sc = [cgutils.alloca_once(b, _I16x16, size=n_sc) for _ in range(ng)]
        with _passes(b, args, ai + 6, tt, acc) as t0:
            xs = _rows2(b, arrs[ai + 1], t0, tt, _I8)
            dxs, ys = (_rows2(b, arrs[ai + k], t0, tt, _F32) for k in (2, 5))
            bss = _rows2(b, arrs[ai + 3], t0, tt, _I16)
            with cgutils.for_range(b, args[ai + 4]) as loop:
                i = loop.index
                recs = [b.gep(bases[k], [b.mul(i, _c64(rec_bytes))]) for k in range(ng)]
                if tt == 1 and ng == 1:
                    _prefetch(b, recs[0], X8_PREFETCH, rec_bytes)
                recs = [_X8Rec(b, kind, r) for r in recs]
                xb = [b.gep(x, [b.mul(i, _c64(QK_K))]) for x in xs]
                dx = [_splat(b, b.load(b.gep(d, [i])), 8) for d in dxs]
                for k, rec in enumerate(recs):
                    for s in range(n_sc):
                        b.store(rec.scale(s), b.gep(sc[k], [_c32(s)]))
                for n, (k, u) in enumerate(units):
                    bs16 = b.load(b.bitcast(b.gep(bss[u], [b.mul(i, _c64(16))]),
                                            ir.PointerType(_I16x16)), align=2)
                    if kind == 4:  # sum sc (q - 32) x = sum sc q x - 32 sum sc bs
                        b.store(b.sub(ir.Constant(_I32x8, None),
                                      b.shl(recs[k].offset_sum(bs16), _i32x8(5))), s32[n])
                    else:  # acc -= dmin dx sum m bs; then the integer sum from zero
                        msum = b.fmul(b.sitofp(recs[k].mins(bs16), _F32x8), b.fneg(dx[u]))
                        b.store(_fma8(b, recs[k].dmin8(), msum, b.load(acc[n])), acc[n])
                        b.store(ir.Constant(_I32x8, None), s32[n])
                with cgutils.for_range(b, _c64(4)) as quarter:
                    qvs = [rec.quarter(quarter.index) for rec in recs]
                    s16 = [[None, None] for _ in units]
                    for st in range(8):
                        made, xv = {}, {}
                        for n, (k, u) in enumerate(units):
                            if k not in made:
                                made[k] = recs[k].step(qvs[k], st)
                            for slot, codes, xo in made[k]:
                                if (u, slot) not in xv:
                                    xv[u, slot] = _bcast4(b, xb[u], xo)
                                p = _maddubs(b, codes, xv[u, slot])
                                s16[n][slot] = p if s16[n][slot] is None else b.add(
                                    s16[n][slot], p)
                        for slot, ds in _x8_closes(kind, st):
                            for n, (k, _) in enumerate(units):
                                at = b.gep(sc[k], [b.add(qvs[k][3], _c64(ds))])
                                p = _maddwd(b, s16[n][slot], b.load(at))
                                b.store(b.add(b.load(s32[n]), p), s32[n])
                                s16[n][slot] = None
                for n, (k, u) in enumerate(units):
                    t = b.fmul(b.sitofp(b.load(s32[n]), _F32x8), dx[u])
                    b.store(_fma8(b, recs[k].d8(), t, b.load(acc[n])), acc[n])
            _x8_store(b, gs, ys, acc, tt)
        return context.get_dummy_value()

    if ng > 1:
        def typer(typingctx, pk, g, q, xq, dx, bs, nb, y, t0):
            return nbt.void(pk, nbt.intp, nbt.intp, xq, dx, bs, nbt.intp, y, nbt.intp), codegen
    elif tt > 1:
        def typer(typingctx, pk, g, xq, dx, bs, nb, y, t0, npass):
            return nbt.void(pk, nbt.intp, xq, dx, bs, nbt.intp, y, nbt.intp, nbt.intp), codegen
    else:
        def typer(typingctx, pk, g, xq, dx, bs, nb, y, t0):
            return nbt.void(pk, nbt.intp, xq, dx, bs, nbt.intp, y, nbt.intp), codegen

    return intrinsic(typer)


#: dotx8_<fmt>: one vector, one group; dotx8t_<fmt>: passes of 4 vectors (prompts);
#: dotsx8_<fmt>: one vector, X8_STREAMS groups a stride apart
dotx8_q4_k, dotx8_q5_k, dotx8_q6_k = (_kdotx8(k, 1) for k in X8_KINDS)
dotx8t_q4_k, dotx8t_q5_k, dotx8t_q6_k = (_kdotx8(k, 4) for k in X8_KINDS)
dotsx8_q4_k, dotsx8_q5_k, dotsx8_q6_k = (_kdotx8(k, 1, X8_STREAMS) for k in X8_KINDS)


# -- drivers ---------------------------------------------------------------------------------

_NB = {"cache": True, "nogil": True}


@njit(inline="always", **_NB)
def _dot(kind, row, x, nb):
    if kind == 0:
        return kdot_q2_k(row, x, nb)
    elif kind == 1:
        return kdot_q3_k(row, x, nb)
    elif kind == 2:
        return kdot_q4_k(row, x, nb)
    elif kind == 3:
        return kdot_q5_k(row, x, nb)
    return kdot_q6_k(row, x, nb)


@njit(inline="always", **_NB)
def _dotq(kind, row, xq, dx, bs, nb):
    if kind == 0:
        return kdotq_q2_k(row, xq, dx, bs, nb)
    elif kind == 1:
        return kdotq_q3_k(row, xq, dx, bs, nb)
    elif kind == 2:
        return kdotq_q4_k(row, xq, dx, bs, nb)
    elif kind == 3:
        return kdotq_q5_k(row, xq, dx, bs, nb)
    return kdotq_q6_k(row, xq, dx, bs, nb)


@njit(**_NB)
def dec_row(kind, row, out):
    nb = out.shape[0] // QK_K
    if kind == 0:
        kdeq_q2_k(row, out, nb)
    elif kind == 1:
        kdeq_q3_k(row, out, nb)
    elif kind == 2:
        kdeq_q4_k(row, out, nb)
    elif kind == 3:
        kdeq_q5_k(row, out, nb)
    else:
        kdeq_q6_k(row, out, nb)


@njit(**_NB)
def mv_rows(kind, raw2, x2, y2, r0, r1):
    """y2[t, r] = row r . x2[t] (exact) for r in [r0, r1)."""
    nb = x2.shape[1] // QK_K
    for r in range(r0, r1):
        row = raw2[r]
        for t in range(x2.shape[0]):
            y2[t, r] = _dot(kind, row, x2[t], nb)


@njit(parallel=True, **_NB)
def mv_par(kind, raw2, x2, y2, chunk):
    n = raw2.shape[0]
    for c in prange((n + chunk - 1) // chunk):
        mv_rows(kind, raw2, x2, y2, c * chunk, min(n, (c + 1) * chunk))


def _quantize_q8k():
    """Make an intrinsic ``quantize(x, xq, dx, bs, nb)`` (1-D arrays): for each block i of 256
    float32 values of x, dx[i] = amax / 127, xq = rint(x * (127 / amax)) (int8), bs[16 i + k] =
    the sum of xq[256 i + 16 k: +16] (int16). A block holding a NaN or an infinity gets dx = NaN
    (its products come out NaN, as in float arithmetic), xq = 0 and bs = 0; an all-zero block,
    or one so small that 127 / amax overflows, gets xq = 0 and bs = 0 (and dx = amax / 127).
    Vector code (8 x 32 lanes a block), no branches: 2048 values in 0.8 us on one thread
    against 6.1 us for the scalar loop it replaced, whose float32 operations it keeps."""

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
                vs = [b.load(b.bitcast(b.gep(xs, [b.add(o, _c64(32 * j))]),
                                       ir.PointerType(f32v)), align=4) for j in range(8)]
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
                finite = b.icmp_unsigned("==", b.bitcast(ok, ir.IntType(32)),
                                         ir.Constant(ir.IntType(32), (1 << 32) - 1))
                inv = b.fdiv(ir.Constant(_F32, 127.0), amax)
                usable = b.and_(finite, b.fcmp_ordered("<", inv, inf))
                d = b.fdiv(amax, ir.Constant(_F32, 127.0))
                b.store(b.select(finite, d, ir.Constant(_F32, float("nan"))), b.gep(dxs, [i]))
                for j, v in enumerate(vs):
                    q = _x86(b, "llvm.rint.v32f32", f32v, [f32v], [b.fmul(v, _splat(b, inv))])
                    qi = b.select(usable, b.fptosi(q, i32v), ir.Constant(i32v, None))
                    b.store(b.trunc(qi, _vec(_I8)), b.bitcast(
                        b.gep(qs, [b.add(o, _c64(32 * j))]), ir.PointerType(_vec(_I8))), align=1)
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


@njit(**_NB)
def quantize_q8k(x, xq, dx, bs):
    """x (256 nb,) float32 -> Q8_K-like blocks xq (int8), dx (float32), bs (int16): see
    _quantize_q8k."""
    _quantize_q8k_ir(x, xq, dx, bs, dx.shape[0])


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
            y2[t, r] = _dotq(kind, row, xq2[t], dx2[t], bs2[t], nb)


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

#: Vectors of a prompt per pass over a chunk of groups (mvx8_groups): each record is read once
#: per tile, and the tile's int8 activations stay in the core's cache.
X8_TOKENS = 64


@njit(inline="always", **_NB)
def _x8_moves(table, f, i):
    """Field f of super-block i: (offset in a row, offset in the group's row of records, dwords
    or halves, unit). The last field ends the record: super-block bytes = its end / 8."""
    size = table[-1, 3] // 8 + table[-1, 1]
    off, n, unit, at = table[f, 0], table[f, 1], table[f, 2], table[f, 3]
    return i * size + off, i * 8 * size + at, n // unit, unit


@njit(**_NB)
def repack_groups(table, raw2, pk, g0, g1):
    """pk[g] = rows 8g .. 8g + 7 of raw2 (ggml's rows) as records of 8 rows (X8_FIELDS, as
    x8_table gives them), for g in [g0, g1)."""
    nb = pk.shape[1] // (8 * (table[-1, 3] // 8 + table[-1, 1]))
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


@njit(**_NB)
def unpack_groups(table, pk, raw2, g0, g1):
    """The inverse of repack_groups: rows 8 (g - g0) .. + 7 of raw2 = group g of pk."""
    nb = pk.shape[1] // (8 * (table[-1, 3] // 8 + table[-1, 1]))
    for g in range(g0, g1):
        rec = pk[g]
        for i in range(nb):
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


@njit(inline="always", **_NB)
def _dotx8(kind, pk, g, xq2, dx2, bs2, nb, y2, t):
    if kind == 2:
        dotx8_q4_k(pk, g, xq2, dx2, bs2, nb, y2, t)
    elif kind == 3:
        dotx8_q5_k(pk, g, xq2, dx2, bs2, nb, y2, t)
    else:
        dotx8_q6_k(pk, g, xq2, dx2, bs2, nb, y2, t)


@njit(**_NB)
def _dotx8t(kind, pk, g, xq2, dx2, bs2, nb, y2, t, n4):
    """Called, not inlined (as kernels.linear._dotx8t: the three formats' prompt kernels
    inlined into one loop compile to slower code)."""
    if kind == 2:
        dotx8t_q4_k(pk, g, xq2, dx2, bs2, nb, y2, t, n4)
    elif kind == 3:
        dotx8t_q5_k(pk, g, xq2, dx2, bs2, nb, y2, t, n4)
    else:
        dotx8t_q6_k(pk, g, xq2, dx2, bs2, nb, y2, t, n4)


@njit(inline="always", **_NB)
def _dotsx8(kind, pk, g, q, xq2, dx2, bs2, nb, y2):
    if kind == 2:
        dotsx8_q4_k(pk, g, q, xq2, dx2, bs2, nb, y2, 0)
    elif kind == 3:
        dotsx8_q5_k(pk, g, q, xq2, dx2, bs2, nb, y2, 0)
    else:
        dotsx8_q6_k(pk, g, q, xq2, dx2, bs2, nb, y2, 0)


@njit(**_NB)
def mvx8_groups(kind, pk, xq2, dx2, bs2, y2, g0, g1):
    """Groups g0 .. g1 for every vector: one vector as X8_STREAMS parts of the range read at
    once (then the groups after the last whole part one by one); prompts in tiles of
    X8_TOKENS vectors, 4 per pass (kernels.linear._mvx8_groups' plan)."""
    nb, T = dx2.shape[1], xq2.shape[0]
    if T == 1:
        ns = X8_STREAMS
        q = (g1 - g0) // ns
        for i in range(q):
            _dotsx8(kind, pk, g0 + i, q, xq2, dx2, bs2, nb, y2)
        g0 += ns * q
    for t0 in range(0, T, X8_TOKENS):
        t1 = min(T, t0 + X8_TOKENS)
        n4 = (t1 - t0) // 4
        for g in range(g0, g1):
            if n4:
                _dotx8t(kind, pk, g, xq2, dx2, bs2, nb, y2, t0, n4)
            for t in range(t0 + 4 * n4, t1):
                _dotx8(kind, pk, g, xq2, dx2, bs2, nb, y2, t)


@njit(**_NB)
def _q8k_arrays(T, K):
    return (np.empty((T, K), np.int8), np.empty((T, K // QK_K), np.float32),
            np.empty((T, K // 16), np.int16))


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
    mvq_rows(kind, tail, xq2, dx2, bs2, y2[:, 8 * G:], np.int64(0), tail.shape[0])
