"""Products and decoding of block-format rows repacked into groups of 8 interleaved rows (the
layout of kernels.linear's integer products; the layout is described below).

* ``dotx8_<fmt>``, ``dotx8t_<fmt>`` (4 vectors per pass), ``dotsx8_<fmt>`` (X8_STREAMS groups
  at once): the 8 rows of a group against activations rounded to int8 blocks;
* ``dotx8w_q8_0``, ``dotx8wt_q8_0``, ``dotsx8w_q8_0``: Q8_0 against int16 blocks;
* ``deqx8_<fmt>``: a group's 8 rows decoded to float32 (exactly, prompt tiles).
"""

from __future__ import annotations

import contextlib
import functools

from llvmlite import ir
from numba.core import cgutils
from numba.core import types as nbt
from numba.extending import intrinsic

from ..kinds import BLOCK_KINDS, Kind
from .base import (
    _F32,
    _FMA,
    _I8,
    _I16,
    _I32,
    _I64,
    _N,
    _codes_to_float,
    _const,
    _F32x8,
    _half,
    _I16x16,
    _load,
    _maddubs,
    _maddwd,
    _nibbles,
    _ones16,
    _signed_to_float,
    _splat,
    _store32,
    _vec,
    _wide,
    _with_high,
    _x86,
)

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
# and one multiply-add per 8 blocks: ~6 instructions per block instead of ~16 on ggml's rows
# (docs/kernels.md has the measured speeds).
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
#: (one prefetch per 64-byte line of a record). The hardware prefetcher alone leaves these
#: kernels well below torch.sum's read bandwidth; 2048 bytes ahead measured faster than 1024
#: and 4096. The F16 row kernels gain nothing from it and do not prefetch (docs/kernels.md).
X8_PREFETCH = 2048


def _prefetch(b, p, ahead, nbytes):
    """Hint the cache lines of bytes [p + ahead, p + ahead + nbytes) (i8* p) into L1: a hint
    only, never a fault (addresses past the array's end are allowed)."""
    fn = cgutils.get_or_insert_function(
        b.module,
        ir.FunctionType(ir.VoidType(), [ir.PointerType(_I8)] + [_I32] * 3),
        "llvm.prefetch.p0i8",
    )
    for q in range(0, nbytes, 64):  # read, high locality, data cache
        b.call(
            fn,
            [
                b.gep(p, [ir.Constant(_I64, ahead + q)]),
                ir.Constant(_I32, 0),
                ir.Constant(_I32, 3),
                ir.Constant(_I32, 1),
            ],
        )


def _x8_layout(kind):
    """Byte offsets inside one record of ``kind`` (a kernels.kinds.Kind): (m, qh, codes)."""
    has_m, has_qh = kind.has_min, kind.has_high_bits
    m = 16 if has_m else None
    qh = 16 + 16 * has_m if has_qh else None
    return m, qh, 16 + 16 * has_m + 32 * has_qh


def _rows2(b, arr, t0, n, elem):
    """Pointers (``elem``*) to rows t0 .. t0+n-1 of a C-order 2-D array."""
    st = cgutils.unpack_tuple(b, arr.strides, 2)[0]
    base = b.bitcast(arr.data, ir.PointerType(_I8))
    return [
        b.bitcast(b.gep(base, [b.mul(b.add(t0, ir.Constant(_I64, u)), st)]), ir.PointerType(elem))
        for u in range(n)
    ]


def _x8_code_steps(b, rec, kind):
    """The codes of the record at ``rec`` as a list of steps, each a list of (j, codes): the
    vectors of 4 codes x 8 rows that meet activations 4j .. 4j+3 (Q8_0: (|code|, code) pairs,
    for the sign trick). Q4: step m holds j = m (the low nibbles of packed vector m) and
    j = m + 4 (its high nibbles), from one load; Q5 and Q8_0: step j holds j alone, in order
    (Q5's int16 sums close after j = 3: _x8_integer_sums). A step's vectors are made where the
    step is used, so that few stay live at once."""
    _, qh_off, c_off = _x8_layout(kind)
    has_qh = kind.has_high_bits
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
        if kind.signed:  # |code| (<= 128), and the code for its sign
            c = _load(b, rec, ir.Constant(_I64, c_off + 32 * m), _vec(_I8))
            return [
                (
                    m,
                    (
                        _x86(
                            b,
                            "llvm.abs.v32i8",
                            _vec(_I8),
                            [_vec(_I8), ir.IntType(1)],
                            [c, ir.Constant(ir.IntType(1), 0)],
                        ),
                        c,
                    ),
                )
            ]
        if has_qh:
            return [(m, nibbles(m))]
        return [(m, nibbles(m)), (m + 4, nibbles(m + 4))]

    return [functools.partial(step, m) for m in range(8 if has_qh or kind.signed else 4)]


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
                    xv = _x86(
                        b, "llvm.x86.avx2.psign.b", _vec(_I8), [_vec(_I8), _vec(_I8)], [xv, c]
                    )
                    p = _ones16(b, _maddubs(b, a, xv))
                    s32[n] = p if s32[n] is None else b.add(s32[n], p)
                    continue
                p = _maddubs(b, codes, xv)
                s16[n] = p if s16[n] is None else b.add(s16[n], p)
                if per_madd == 4 and j == 3:  # 5-bit codes: j < 4 summed in int16, then j >= 4
                    s32[n], s16[n] = _ones16(b, s16[n]), None
    if q8:
        return s32
    return [
        _ones16(b, s) if s32[n] is None else b.add(s32[n], _ones16(b, s)) for n, s in enumerate(s16)
    ]


def _x8_scale_add(b, s32, d8, m8, dx, cx, acc, offset):
    """acc += the 8 rows' block products from their integer sums ``s32`` (dx: the vector's
    block scale, cx = dx sum(xq))."""
    # offset formats: acc += d (dx sum(c xq) - offset dx sum(xq)), two fused multiply-adds;
    # m formats: acc += d (dx sum(c xq)) + m dx sum(xq). One accumulator: a second one for
    # the offset/m terms costs a multiply, a multiply-add and 8 more registers a vector, and
    # measured slower in one-vector products (docs/kernels.md).
    # (explicit fused multiply-adds: 'contract' leaves fusing to LLVM, which decided it
    # differently in the one-group and the 4-stream kernels)
    if offset:
        t = _fma8(
            b,
            b.sitofp(s32, _F32x8),
            _splat(b, dx, 8),
            _splat(b, b.fmul(cx, ir.Constant(_F32, -offset)), 8),
        )
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
    arrs = [
        context.make_array(t)(context, b, a) if isinstance(t, nbt.Array) else None
        for t, a in zip(signature.args, args)
    ]
    stride = cgutils.unpack_tuple(b, arrs[0].strides, 2)[0]
    gs = [
        args[1] if k == 0 else b.add(args[1], b.mul(args[2], ir.Constant(_I64, k)))
        for k in range(ng)
    ]
    bases = [b.gep(b.bitcast(arrs[0].data, ir.PointerType(_I8)), [b.mul(g, stride)]) for g in gs]
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
            b.store(
                b.load(acc[k + u]), b.bitcast(b.gep(ys[u], [col]), ir.PointerType(_F32x8)), align=4
            )


def _row_dot_x8(kind, tt, ng=1):
    """Make an intrinsic ``dot8(pk, g, xq2, dx2, sx2, nb, y2, t0)``: y2[t0 + u, 8g + r] = row
    8g+r . x2[t0 + u] for r < 8, u < ``tt``, from the repacked group ``pk[g]`` (uint8 2-D) and
    the rows of x2 as int8 blocks (``xq2``, ``dx2``, ``sx2``, 2-D: see _row_dot_q8). The codes
    of a block column are unpacked once for the ``tt`` vectors (prompts: faster than torch's
    float32 GEMM on dequantized tiles, docs/kernels.md); ``tt`` > 1:
    ``dot8(..., t0, npass)``, npass passes of ``tt`` vectors from t0 (see _passes).

    The code vectors are made step by step and each step met by every vector (or stream) before
    the next (_x8_integer_sums), instead of all 8 code vectors first and then each vector's
    whole sum: fewer values live at once, fewer spilled to the stack, the same integers
    (docs/kernels.md has the measurements).

    ``ng`` > 1 (one vector): ``dots8(pk, g, q, xq2, dx2, sx2, nb, y2, t0)`` does the groups g,
    g + q, ..., g + (ng - 1) q, record after record, each exactly as ``dot8`` does it: ``ng``
    streams of weights at once instead of one (see X8_STREAMS); no prefetch hints then."""
    m_off = _x8_layout(kind)[0]
    has_m, offset, q8 = kind.has_min, kind.code_offset, kind.signed
    rec_bytes = 8 * kind.chunk_bytes
    per_madd = 4 if kind.has_high_bits else 8  # int16 headroom (see above)
    assert ng == 1 or tt == 1
    ai = 1 if ng == 1 else 2  # the arguments after g (and q)

    def codegen(context, b, signature, args):
        arrs, gs, bases = _groups_args(context, b, signature, args, ng)
        acc = [cgutils.alloca_once_value(b, ir.Constant(_F32x8, None)) for _ in range(max(tt, ng))]
        with _passes(b, args, ai + 6, tt, acc) as t0:
            xs = _rows2(b, arrs[ai + 1], t0, tt, _I8)
            dxs, sxs, ys = (_rows2(b, arrs[ai + k], t0, tt, _F32) for k in (2, 3, 5))
            with cgutils.for_range(b, args[ai + 4]) as loop:
                i = loop.index
                x0 = b.mul(i, ir.Constant(_I64, _N))
                recs = [
                    b.gep(bases[k], [b.mul(i, ir.Constant(_I64, rec_bytes))]) for k in range(ng)
                ]
                if tt == 1 and ng == 1:  # the records stream from memory once: X8_PREFETCH
                    _prefetch(b, recs[0], X8_PREFETCH, rec_bytes)
                steps = [_x8_code_steps(b, rec, kind) for rec in recs]
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


#: Groups a one-vector x8 product reads at once (_row_dot_x8's ``ng``; the driver takes
#: the groups a quarter of a thread's chunk apart): 4 streams read faster than 1 or 2
#: (docs/kernels.md).
X8_STREAMS = 4


#: dotx8_<fmt>: one vector; dotx8t_<fmt>: 4 vectors at once (prompts)
dotx8_q4_0, dotx8t_q4_0 = (_row_dot_x8(Kind.Q4_0, tt) for tt in (1, 4))
dotx8_q4_1, dotx8t_q4_1 = (_row_dot_x8(Kind.Q4_1, tt) for tt in (1, 4))
dotx8_q5_0, dotx8t_q5_0 = (_row_dot_x8(Kind.Q5_0, tt) for tt in (1, 4))
dotx8_q5_1, dotx8t_q5_1 = (_row_dot_x8(Kind.Q5_1, tt) for tt in (1, 4))
dotx8_q8_0, dotx8t_q8_0 = (_row_dot_x8(Kind.Q8_0, tt) for tt in (1, 4))
#: dotsx8_<fmt>: one vector, X8_STREAMS groups a stride apart
dotsx8_q4_0, dotsx8_q4_1, dotsx8_q5_0, dotsx8_q5_1, dotsx8_q8_0 = (
    _row_dot_x8(k, 1, X8_STREAMS) for k in BLOCK_KINDS
)


def _x8_weights(b, rec, r, kind):
    """<32 x float> weights of row ``r`` (0..7) in the record at ``rec`` (layout above)."""
    m_off, qh_off, c_off = _x8_layout(kind)
    d = _half(b, rec, ir.Constant(_I64, 2 * r))
    if kind.signed:  # Q8_0: dword j holds codes 4j .. 4j+3
        words = ir.Constant(_vec(_I32, 8), ir.Undefined)
        for j in range(8):
            words = b.insert_element(
                words,
                _load(b, rec, ir.Constant(_I64, 16 + 32 * j + 4 * r), _I32),
                ir.Constant(_I32, j),
            )
        return b.fmul(_signed_to_float(b, b.bitcast(words, _vec(_I8))), _splat(b, d))
    words = ir.Constant(_vec(_I32, 4), ir.Undefined)
    for i in range(4):  # vector i's dword r: codes 4i+t (low nibbles), 16+4i+t (high)
        words = b.insert_element(
            words,
            _load(b, rec, ir.Constant(_I64, c_off + 32 * i + 4 * r), _I32),
            ir.Constant(_I32, i),
        )
    codes = _nibbles(b, b.bitcast(words, _vec(_I8, 16)))
    if kind.has_high_bits:  # code 4j+t: bit j of qh byte 4r+t
        qh = _load(b, rec, ir.Constant(_I64, qh_off + 4 * r), _vec(_I8, 4))
        codes = _with_high(b, codes, qh, lambda k: k % 4, lambda k: k // 4)
    w = b.fmul(_codes_to_float(b, _wide(b, codes), kind.code_offset), _splat(b, d))
    if kind.has_min:
        w = b.fadd(w, _splat(b, _half(b, rec, ir.Constant(_I64, m_off + 2 * r))))
    return w


def _x8_deq(kind):
    """Make an intrinsic ``deqx8(pk, g, out, o0, nb)``: out[o0 + r] = row 8g + r of the
    repacked groups ``pk`` dequantized, r < 8 (``out`` float32 2-D, C order)."""
    rec_bytes = 8 * kind.chunk_bytes

    def typer(typingctx, pk, g, out, o0, nb):
        sig = nbt.void(pk, nbt.intp, out, nbt.intp, nbt.intp)

        def codegen(context, b, signature, args):
            pa = context.make_array(signature.args[0])(context, b, args[0])
            oa = context.make_array(signature.args[2])(context, b, args[2])
            pstride = cgutils.unpack_tuple(b, pa.strides, 2)[0]
            ostride = cgutils.unpack_tuple(b, oa.strides, 2)[0]
            base = b.gep(b.bitcast(pa.data, ir.PointerType(_I8)), [b.mul(args[1], pstride)])
            obase = b.gep(b.bitcast(oa.data, ir.PointerType(_I8)), [b.mul(args[3], ostride)])
            rows = [
                b.bitcast(
                    b.gep(obase, [b.mul(ostride, ir.Constant(_I64, r))]), ir.PointerType(_F32)
                )
                for r in range(8)
            ]
            with cgutils.for_range(b, args[4]) as loop:
                i = loop.index
                rec = b.gep(base, [b.mul(i, ir.Constant(_I64, rec_bytes))])
                col = b.mul(i, ir.Constant(_I64, _N))
                for r in range(8):
                    w = _x8_weights(b, rec, r, kind)
                    _store32(b, rows[r], col, w)
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typer)


deqx8_q4_0, deqx8_q4_1, deqx8_q5_0, deqx8_q5_1, deqx8_q8_0 = (_x8_deq(k) for k in BLOCK_KINDS)


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
    rec_bytes = 8 * Kind.Q8_0.chunk_bytes
    assert ng == 1 or tt == 1
    ai = 1 if ng == 1 else 2

    def codegen(context, b, signature, args):
        arrs, gs, bases = _groups_args(context, b, signature, args, ng)
        acc = [cgutils.alloca_once_value(b, ir.Constant(_F32x8, None)) for _ in range(max(tt, ng))]
        even = ir.Constant(_vec(_I32, 8), list(range(0, 16, 2)))
        odd = ir.Constant(_vec(_I32, 8), list(range(1, 16, 2)))
        with _passes(b, args, ai + 5, tt, acc) as t0:
            xs = _rows2(b, arrs[ai + 1], t0, tt, _I8)
            dxs, ys = (_rows2(b, arrs[ai + k], t0, tt, _F32) for k in (2, 4))
            with cgutils.for_range(b, args[ai + 3]) as loop:
                i = loop.index
                x0 = b.mul(i, ir.Constant(_I64, 2 * _N))  # bytes of int16
                recs = [
                    b.gep(bases[k], [b.mul(i, ir.Constant(_I64, rec_bytes))]) for k in range(ng)
                ]
                if tt == 1 and ng == 1:
                    _prefetch(b, recs[0], X8_PREFETCH, rec_bytes)
                units = [(k, u) for k in range(ng) for u in range(tt)]  # acc[k + u]
                lo, hi = [None] * len(units), [None] * len(units)
                for j in range(8):  # code vector j of each record, met by its units
                    # codes 4j .. 4j+3: rows 0-3 in bytes 0-15 of vector j, rows 4-7 after
                    w = [
                        tuple(
                            b.sext(
                                _load(b, rec, ir.Constant(_I64, off + 32 * j), _vec(_I8, 16)),
                                _I16x16,
                            )
                            for off in (16, 32)
                        )
                        for rec in recs
                    ]
                    for n, (k, u) in enumerate(units):
                        xv = b.bitcast(
                            _splat(
                                b, _load(b, xs[u], b.add(x0, ir.Constant(_I64, 8 * j)), _I64), 4
                            ),
                            _I16x16,
                        )
                        p0, p1 = _maddwd(b, w[k][0], xv), _maddwd(b, w[k][1], xv)
                        lo[n] = p0 if lo[n] is None else b.add(lo[n], p0)
                        hi[n] = p1 if hi[n] is None else b.add(hi[n], p1)
                for n, (k, u) in enumerate(units):
                    d8 = _half8(b, recs[k], 0)
                    s32 = b.add(
                        b.shuffle_vector(lo[n], hi[n], even), b.shuffle_vector(lo[n], hi[n], odd)
                    )
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
