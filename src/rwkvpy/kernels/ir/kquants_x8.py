"""K-quant (Q4_K, Q5_K, Q6_K) products on super-blocks repacked into groups of 8 interleaved
rows (kernels/kquants.py's KQuantX8Linear): the record layout (X8_FIELDS) and the explicit LLVM
vector code of the integer products (``dotx8_*``, ``dotx8t_*``, ``dotsx8_*``).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba.core import cgutils
from numba.core import types as nbt
from numba.extending import intrinsic

from .base import (
    _F32,
    _I8,
    _I16,
    _I32,
    _const,
    _F32x8,
    _I16x16,
    _I32x8,
    _load,
    _maddubs,
    _maddwd,
    _ones16,
    _splat,
    _vec,
)
from .kquants import KINDS, QK_K, _c32, _c64
from .x8 import (
    X8_PREFETCH,
    X8_STREAMS,
    _bcast4,
    _fma8,
    _groups_args,
    _half8,
    _passes,
    _prefetch,
    _rows2,
    _x8_store,
)

# -- 8 interleaved rows (Q4_K, Q5_K, Q6_K; kernels/kquants.py KQuantX8Linear) ----------------
#
# Read row by row, each super-block of a row pays its scale decode, its 8-lane integer sum,
# conversions and float multiply-adds, and ggml's layout puts 32 codes of one row in a vector:
# the kernels above stay compute-bound at about half of Q4_0/Q8_0's speed per byte. As for
# those (kernels/ir/x8.py), the rows are repacked once into groups of 8 and each
# super-block column of a group is one record of 8 * super-block bytes (ggml's bytes moved,
# X8_FIELDS: a field's dword w of row r lands at 32 w + 4 r, the float16 factors side by side;
# Q5_K's and Q6_K's codes then recoded so that each code vector takes few operations to build:
# Q5K_QUARTER, Q6K_QUARTER). One 32-byte load then holds 4 consecutive codes of each of the 8
# rows, the 4 activations they meet are one broadcast int32, and vpmaddubsw + vpmaddwd (by a
# vector of the 8 rows' sub-block scales) leave each row's sum in its own lane: no lane sums,
# one conversion and one or two multiply-adds per super-block and 8 rows. The integers are the
# row kernels' (the same Q8_K activations, quantize_q8k); only the float32 summation differs
# (one lane per row instead of 8 lanes summed at the end).
#
# Integer ranges: vpmaddubsw pairs are <= 2 * 15 * 127 = 3810 (Q4_K), 7874 (Q5_K), 16002
# (Q6_K), so a sub-block's 8 Q4_K products add up in int16 (<= 30480), Q5_K's 4 at a time and
# Q6_K's 2 at a time before their vpmaddwd by the scales.

#: Per kind (2 Q4_K, 3 Q5_K, 4 Q6_K): the fields of ggml's super-block moved into a record,
#: in record order: (offset in the super-block, bytes, unit). Unit 2: one float16 per row, the
#: 8 side by side (16 bytes); unit 4: dword w of row r at 32 w + 4 r (8 x bytes). The factors
#: and scales come first, in the order the kernels read them; the codes' fields are the input
#: of the recoding (X8_RECODE), whose quarters the kernels read front to back.
X8_FIELDS = {
    2: ((0, 2, 2), (2, 2, 2), (4, 12, 4), (16, 128, 4)),  # d, dmin, scales, qs
    3: ((0, 2, 2), (2, 2, 2), (4, 12, 4), (16, 32, 4), (48, 128, 4)),  # ... qh, qs
    4: (
        (208, 2, 2),
        (192, 16, 4),
        (128, 32, 4),
        (0, 64, 4),  # d, scales, qh, ql of
        (160, 32, 4),
        (64, 64, 4),
    ),  # half 0, of half 1
}
X8_KINDS = tuple(X8_FIELDS)


#: Per kind: the super-block offset of the field from which the codes are recoded (the rest
#: of the record, after the moves; x8_table's column 4). Q5_K: qh and qs recoded into
#: Q5K_QUARTER's quarters; Q6_K: both halves' qh and ql into Q6K_QUARTER's. The recoding is
#: kernels/linear/kquant_drivers.py's (_q5k_recode, _q6k_recode, and their inverses).
X8_RECODE = {3: 16, 4: 128}


def x8_table(kind) -> np.ndarray:
    """X8_FIELDS[kind] with each field's record offset: int64 (n, 5) rows (super-block offset,
    bytes, unit, record offset, recode), the form the repack drivers take; recode: the kind on
    the field where the record's codes are recoded after the moves (X8_RECODE), else 0."""
    rows, at = [], 0
    for off, n, unit in X8_FIELDS[kind]:
        rows.append((off, n, unit, at, kind if X8_RECODE.get(kind) == off else 0))
        at += 8 * n
    assert at == 8 * KINDS[kind][1]
    return np.array(rows, np.int64)


#: Q5_K's codes in a record: 4 quarters of Q5K_QUARTER bytes, one per 64 elements of each row
#: (sub-blocks 2q and 2q + 1), each two halves of 160 bytes for steps 4a .. 4a + 3 (a = 0, 1):
#:   H (32 bytes): byte 4r + t, bits 2j, 2j + 1 = bits 3, 4 of code (r, 64q + 32 + 4(4a + j) + t)
#:   V_j (4 x 32 bytes): byte 4r + t = code (r, 64q + 4i + t)  (5 bits)
#:                                     | (code (r, 64q + 32 + 4i + t) & 7) << 5,  i = 4a + j
#: so a step's first code vector is V & 31 (one and) and its second (V >> 5) & 7 | the H bits
#: moved to bits 3, 4, where ggml's layout (4-bit codes in pairs, the fifth bits in qh) costs a
#: shift, a mask and an or per vector for the fifth bits and a shift of qh per quarter.
Q5K_QUARTER = 320

#: Q6_K's codes in a record: 4 quarters (q = 2p + kk: half p of 128 elements; low codes
#: 128p + 32kk + l, high codes 128p + 64 + 32kk + l, l < 32) of Q6K_QUARTER bytes, each 4 pairs
#: of steps m (steps i = 2m, 2m + 1) of 96 bytes:
#:   V_e (2 x 32 bytes): byte 4r + t = low code (r, l) | (high code (r, l) >> 4) << 6,
#:                       l = 4i + t, i = 2m + e
#:   N (32 bytes): byte 4r + t, bits 4e .. 4e + 3 = bits 0-3 of high code (r, 4(2m + e) + t)
#: so the low code vector is V & 63 and the high one (N >> 4e) & 15 | (V >> 2) & 48, where
#: ggml's layout (4-bit codes in pairs, 2 bits each in qh) costs a shift and a mask of qh per
#: vector, an or each and a shift of qh per quarter.
Q6K_QUARTER = 384


def _i32x8(v):
    return ir.Constant(_I32x8, [v] * 8)


def _i16(v):
    return ir.Constant(_I16x16, [v] * 16)


def _pick16(b, words, picks, signed=False):
    """<16 x i16> from <8 x i32> ``words``: lane 2r + h = byte picks[h] of word r, zero- (or
    sign-) extended (one vpshufb, and a shift for the sign)."""
    v8 = b.bitcast(words, _vec(_I8))
    mask = []
    for r in range(8):
        for p in picks:
            mask += [32, 4 * r + p] if signed else [4 * r + p, 32]
    v = b.bitcast(
        b.shuffle_vector(v8, ir.Constant(_vec(_I8), None), ir.Constant(_vec(_I32), mask)), _I16x16
    )
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
        self.at = {int(row[0]): int(row[3]) for row in x8_table(kind)}
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
                self._words = [
                    b.and_(u0, m6),
                    b.or_(b.and_(u2, m4), hi_s),
                    b.and_(u1, m6),
                    b.or_(b.and_(b.lshr(u2, _i32x8(4)), m4), hi_m),
                ]
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
        pairs = b.bitcast(
            b.shuffle_vector(sums, sums, ir.Constant(_vec(_I32, 16), list(range(8)) * 2)), _I16x16
        )
        w, out = self.words(), None
        for j in range(4):
            p = _maddwd(
                b, _pick16(b, w[2 + j // 2], (2 * (j % 2), 2 * (j % 2) + 1)), _pairs_of(b, pairs, j)
            )
            out = p if out is None else b.add(out, p)
        return out

    def offset_sum(self, bs16):
        """Q6_K: <8 x i32>, lane r = sum over runs k of sc(r, k) * (sum of the run's 16
        activation codes): the code offset 32 comes back as 32 times this."""
        b, w, out = self.b, self.words(), None
        for j in range(8):
            p = _maddwd(
                b,
                _pick16(b, w[j // 2], (2 * (j % 2), 2 * (j % 2) + 1), signed=True),
                _pairs_of(b, bs16, j),
            )
            out = p if out is None else b.add(out, p)
        return out

    def quarter(self, q):
        """Per-quarter values (i64 q): (i64 offset of the quarter's codes in the record, i64
        element offset of the low codes, i64 index of the first low scale)."""
        b, c = self.b, _c64
        if self.kind == 4:  # quarter q = (p, kk): half p = q // 2 of 128 elements, kk = q % 2
            p, kk = b.lshr(q, c(1)), b.and_(q, c(1))
            x_lo = b.add(b.mul(p, c(128)), b.mul(kk, c(32)))
            s_lo = b.add(b.mul(p, c(8)), b.mul(kk, c(2)))
            codes = b.add(c(self.at[128]), b.mul(q, c(Q6K_QUARTER)))
        else:  # quarter q: elements 64q .. 64q + 63, sub-blocks 2q (low), 2q + 1 (high)
            x_lo, s_lo = b.mul(q, c(64)), b.mul(q, c(2))
            size = Q5K_QUARTER if self.kind == 3 else 256
            codes = b.add(c(self.at[16]), b.mul(q, c(size)))
        return codes, x_lo, s_lo

    def step(self, qv, i):
        """Step i of the quarter ``qv`` (quarter()'s values): [(slot, codes, activation
        offset)] for the low (slot 0) and the high (slot 1) codes."""
        b, kind = self.b, self.kind
        codes, x_lo, _ = qv
        byte = lambda v: b.bitcast(v, _vec(_I8))  # noqa: E731
        if kind == 2:  # 4-bit codes in pairs: low and high nibbles
            packed = self._load32(b.add(codes, _c64(32 * i)))
            lo = b.and_(byte(packed), self._c8(15))
            hi = b.and_(byte(b.lshr(packed, _i16(4))), self._c8(15))
        elif kind == 3:  # Q5K_QUARTER's layout
            a, j = divmod(i, 4)
            v = self._load32(b.add(codes, _c64(160 * a + 32 + 32 * j)))
            h = self._load32(b.add(codes, _c64(160 * a)))
            h = b.shl(h, _i16(3 - 2 * j)) if j < 2 else b.lshr(h, _i16(2 * j - 3))
            lo = b.and_(byte(v), self._c8(31))
            hi = b.or_(
                b.and_(byte(b.lshr(v, _i16(5))), self._c8(7)), b.and_(byte(h), self._c8(0x18))
            )
        else:  # Q6K_QUARTER's layout
            m, e = divmod(i, 2)
            v = self._load32(b.add(codes, _c64(96 * m + 32 * e)))
            n = self._load32(b.add(codes, _c64(96 * m + 64)))
            if e:
                n = b.lshr(n, _i16(4))
            lo = b.and_(byte(v), self._c8(63))
            hi = b.or_(
                b.and_(byte(n), self._c8(15)), b.and_(byte(b.lshr(v, _i16(2))), self._c8(0x30))
            )
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
        acc = [cgutils.alloca_once_value(b, ir.Constant(_F32x8, None)) for _ in range(max(tt, ng))]
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
                    bs16 = b.load(
                        b.bitcast(b.gep(bss[u], [b.mul(i, _c64(16))]), ir.PointerType(_I16x16)),
                        align=2,
                    )
                    if kind == 4:  # sum sc (q - 32) x = sum sc q x - 32 sum sc bs
                        b.store(
                            b.sub(
                                ir.Constant(_I32x8, None),
                                b.shl(recs[k].offset_sum(bs16), _i32x8(5)),
                            ),
                            s32[n],
                        )
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
                                s16[n][slot] = p if s16[n][slot] is None else b.add(s16[n][slot], p)
                        for slot, ds in _x8_closes(kind, st):
                            for n, (k, _) in enumerate(units):
                                at = b.gep(sc[k], [b.add(qvs[k][2], _c64(ds))])
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
