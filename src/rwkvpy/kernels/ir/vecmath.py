"""Vector arithmetic of the one-token glue and of the integer products' inputs, as explicit LLVM
vector code with a fixed operation order (the same numbers wherever it is inlined):

* ``axpys_<fmt>``: several float rows scaled and added into one output (the LoRAs);
* ``dot16_f32``: short float32 dot products (per-head recurrences);
* ``quantize_blocks``: activations rounded to int8/int16 blocks of 32 with their scales;
* ``exp8_f32``: exp on 8 float32 values at a time, within 1 ulp of exp.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils
from numba.core import types as nbt
from numba.extending import intrinsic

from ..kinds import FLOAT_KINDS
from .base import (
    _F32,
    _FMA,
    _I8,
    _I32,
    _I64,
    _N,
    WEIGHTS,
    _arg_ptr,
    _F32x8,
    _halves,
    _I32x8,
    _splat,
    _vec,
    _x86,
)

# -- axpy on float rows (the fused step's low-rank products) -------------------------------------

#: Rows an axpy intrinsic adds in one pass over the output (each output chunk loaded once,
#: the rows added to it in order, stored once): the same operations in the same order as one
#: row at a time, without a load and a store of the output per row. 8 measured faster than
#: 1, 4 and 16 (docs/kernels.md).
AXPY_ROWS = 8


def _rows_axpy(kind):
    """Make an intrinsic ``axpys(out, W, x, c0, c1, off, n32)``: for each row c in [c0, c1),
    in order, out[:32 n32] += x[c] * W[c, off:] (W: the uint8 bytes of F32/F16/BF16 rows,
    ``off`` a byte offset into each row), the row widened exactly to float32; multiply, then
    add. AXPY_ROWS rows at a time, then the rest one by one. The loop over the rows inside:
    called once per row from numba, the slicing around each call cost more than the row itself
    for the LoRAs' short rows."""
    load = WEIGHTS[kind]

    def typer(typingctx, out, W, x, c0, c1, off, n32):
        sig = nbt.void(out, W, x, nbt.intp, nbt.intp, nbt.intp, nbt.intp)

        def codegen(context, b, signature, args):
            w_arr = context.make_array(signature.args[1])(context, b, args[1])
            ys, xs = (_arg_ptr(context, b, signature, args, k) for k in (0, 2))
            stride = cgutils.unpack_tuple(b, w_arr.strides, 2)[0]
            base = b.gep(b.bitcast(w_arr.data, ir.PointerType(_I8)), [args[5]])
            nbytes = kind.chunk_bytes

            def rows(c, n):  # out += x[c] W[c] + ... + x[c + n - 1] W[c + n - 1], in order
                cs = [b.add(c, ir.Constant(_I64, u)) for u in range(n)]
                avs = [_splat(b, b.load(b.gep(xs, [cu]))) for cu in cs]
                ptrs = [b.gep(base, [b.mul(cu, stride)]) for cu in cs]
                with cgutils.for_range(b, args[6]) as loop:
                    i = loop.index
                    yp = b.bitcast(
                        b.gep(ys, [b.mul(i, ir.Constant(_I64, _N))]), ir.PointerType(_vec(_F32))
                    )
                    y = b.load(yp, align=4)
                    for av, p in zip(avs, ptrs):
                        y = b.fadd(
                            y, b.fmul(av, load(b, b.gep(p, [b.mul(i, ir.Constant(_I64, nbytes))])))
                        )
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


axpys_f16, axpys_bf16, axpys_f32 = (_rows_axpy(k) for k in FLOAT_KINDS)


# -- short float32 dot products (the per-head recurrences of kernels/decode/) -------------------


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
                    av, xv = (
                        b.load(b.bitcast(b.gep(p, [off]), ir.PointerType(_F32x8)), align=4)
                        for p in ptrs
                    )
                    b.store(b.fadd(b.load(acc), b.fmul(av, xv, flags=_FMA), flags=_FMA), acc)
            v = b.fadd(b.load(accs[0]), b.load(accs[1]))
            for n in (8, 4, 2):
                lo, hi = _halves(b, v, n)
                v = b.fadd(lo, hi)
            return b.extract_element(v, ir.Constant(_I32, 0))

        return sig, codegen

    return intrinsic(typer)


dot16_f32 = _dot_f32x16()


# -- activations rounded to integer blocks (the int8/int16 products' inputs) --------------------


def _quantize_blocks():
    """Make an intrinsic ``quantize(x, xq, dx, sx, nb, qmax)``: for each block i of 32 float32
    values of x (1-D): dx[i] = amax / qmax, xq = rint(x / dx) as computed by x * (1 / dx), sx[i]
    = dx[i] * sum(xq) (xq int8 or int16, 1-D). A block holding a NaN or an infinity gets
    dx = sx = NaN and xq = 0 (its products come out NaN, as in float arithmetic). The float32
    operations of the plain scalar loop (bit for bit the same blocks), in vector code
    (docs/kernels.md has both speeds)."""

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
                    "==",
                    b.bitcast(b.fcmp_ordered("<", a, inf), ir.IntType(_N)),
                    ir.Constant(ir.IntType(_N), (1 << _N) - 1),
                )
                n = _N
                while n > 1:  # the largest |v| (all finite where it is used)
                    lo, hi = _halves(b, a, n)
                    a = b.select(b.fcmp_ordered(">", hi, lo), hi, lo)
                    n //= 2
                amax = b.extract_element(a, ir.Constant(_I32, 0))
                d = b.fdiv(amax, qmax)
                zero = ir.Constant(_F32, 0.0)
                inv = b.select(
                    b.fcmp_ordered(">", d, zero), b.fdiv(ir.Constant(_F32, 1.0), d), zero
                )
                # a block of subnormals only (amax < 2^-126 qmax) has 1 / dx = inf: it counts
                # as zeros (xq = 0, sx = 0), which it is next to any normal float32 term
                usable = b.and_(finite, b.fcmp_ordered("<", inv, ir.Constant(_F32, float("inf"))))
                q = _x86(b, "llvm.rint.v32f32", f32v, [f32v], [b.fmul(v, _splat(b, inv))])
                qi = b.select(usable, b.fptosi(q, i32v), ir.Constant(i32v, None))
                b.store(
                    b.trunc(qi, _vec(elem)),
                    b.bitcast(b.gep(qs, [off]), ir.PointerType(_vec(elem))),
                    align=1,
                )
                n, s = _N, qi
                while n > 1:
                    lo, hi = _halves(b, s, n)
                    s = b.add(lo, hi)
                    n //= 2
                d = b.select(finite, d, ir.Constant(_F32, float("nan")))
                b.store(d, b.gep(dxs, [i]))
                b.store(
                    b.fmul(d, b.sitofp(b.extract_element(s, ir.Constant(_I32, 0)), _F32)),
                    b.gep(sxs, [i]),
                )
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

_EXP_P = (
    1.9875691500e-4,
    1.3981999507e-3,
    8.3334519073e-3,
    4.1665795894e-2,
    1.6666665459e-1,
    5.0000001201e-1,
)
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
