"""One token of a head's state for the sequence-mode recurrences of kernels/wkv/serial.py
(``wkv7_token``, ``wkv5_token``), as explicit LLVM vector code on rows of 16 value channels.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils
from numba.core import types as nbt
from numba.extending import intrinsic

from .base import _F32, _FMA, _I64, _arg_ptr, _splat, _vec

# -- one token of a head's state (the CPU sequence recurrences of kernels/wkv/) ---------------
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
        b.store(
            _fmadd(b, _fmadd(b, kv, _bcast(b, u_, j), x), _bcast(b, r, j), b.load(outs[u])), outs[u]
        )
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
