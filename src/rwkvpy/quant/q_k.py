"""What the K-quants (Q2_K .. Q6_K: super-blocks of 256 weights) share: ggml's rounding helper,
the bit packing of their codes, and their quantizers, compiled with numba.

The quantizers are ggml's reference ones (ggml-quants.c, ``quantize_row_q*_K_ref``, what
llama-quantize runs without an importance matrix) and write the same bytes:

* the scale searches ``make_qkx2_quants`` (Q2_K, Q4_K, Q5_K), ``make_qx_quants`` with
  ``rmse_type=1`` (Q6_K) and ``make_q3_quants`` with ``do_rmse`` (Q3_K), then each format's
  quantization of the sub-block scales against the super-block's largest, its float16 factors
  and the re-coding of every element with the stored scales;
* every float operation is a float32 operation in the order the C code applies it: numba's
  fastmath stays off (no reassociation, no fused multiply-add: ggml-base is built for the
  baseline x86-64, without FMA), every constant is a ``np.float32`` and every integer is
  converted with ``np.float32(..)`` before it meets a float (numba would otherwise compute in
  float64), and the sums over a sub-block's elements are sequential, from 0, as in C;
* comparisons are C's (ordered: false with a NaN), so NaN inputs, ties and zero signs go the
  same way; ``nearest_int`` is ggml's bit trick (add 1.5 * 2^23, keep the low 23 bits),
  reproduced bit for bit, also for NaN/inf/huge arguments;
* float32 -> float16 rounds to nearest even as ggml's ``GGML_FP32_TO_FP16``, in integer code.

The searches run on many sub-blocks at once: a group of super-blocks is transposed so that
each sub-block is one lane (``xt[i, lane]`` is element i of that sub-block), and every loop over
a sub-block's elements is an outer loop around a loop over the lanes. Each lane's sums keep
C's sequential order while the lane loop is vector code; a lane's branches are selects.
Groups run in parallel (``prange``, numba's thread count).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import types as nbt
from numba.extending import intrinsic

from .. import numba_cache  # noqa: F401  (numba's cache folder, before any njit)

QK_K = 256
#: ggml's GROUP_MAX_EPS: a sub-block whose largest magnitude is below this is all zeros.
GROUP_MAX_EPS = np.float32(1e-15)

_F = np.float32
# fastmath stays off (numba's default); division by zero gives inf/NaN as in C
_NB = dict(cache=True, nogil=True, error_model="numpy")

_MAGIC = np.float32(12582912.0)  # 1.5 * 2^23: ggml's nearest_int
_Z = np.float32(0.0)
_ONE = np.float32(1.0)
_TENTH = np.float32(0.1)  # make_qkx2_quants' rdelta, make_qx_quants' step
_F63 = np.float32(63.0)
_F15 = np.float32(15.0)
_F32_ = np.float32(32.0)
_TWO_M24 = np.float32(2.0**-24)

#: super-blocks per group: the lanes of one search (8 or 16 sub-blocks each)
_G = 16


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int`` on an array: ``v + 12582912.f`` in float32, its low 23 bits minus
    2^22 (round half to even for ``|v| <= 4194303``; any other float gives the same bits as C)."""
    t = (np.asarray(v, dtype=_F) + _F(12582912)).view(np.int32)
    return (t & 0x007FFFFF) - 0x00400000


# ---------------------------------------------------------------------------- scalar helpers


@intrinsic
def _f32_bits(typingctx, v):
    """float32 -> its bits as int32."""
    if v != nbt.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return nbt.int32(nbt.float32), codegen


@intrinsic
def _bits_f32(typingctx, v):
    """int32 bits -> float32."""
    if v != nbt.int32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return nbt.float32(nbt.int32), codegen


@njit(**_NB)
def _nint(v):
    """ggml's nearest_int of a float32 (int32: numba would widen the bit operations to int64,
    halving the vector lanes)."""
    return np.int32((_f32_bits(v + _MAGIC) & 0x007FFFFF) - 0x00400000)


@njit(**_NB)
def _clamp(v, lo, hi):
    """``MAX(lo, MIN(hi, v))``."""
    v = hi if v > hi else v
    return lo if v < lo else v


@njit(**_NB)
def _to_f16(f):
    """float32 -> float16 bits (int64 0..65535), round to nearest even, overflow to inf; a NaN
    keeps its sign and top payload bits (made non-zero), as numpy's conversion."""
    x = np.int64(_f32_bits(f)) & 0xFFFFFFFF
    sign = (x >> 16) & 0x8000
    a = x & 0x7FFFFFFF
    if a > 0x7F800000:
        h = 0x7C00 + ((a & 0x7FFFFF) >> 13)
        return sign | (h + 1 if h == 0x7C00 else h)
    if a >= 0x477FF000:  # 65520 and up: past the largest float16 (65504) after rounding
        return sign | 0x7C00
    if a >= 0x38800000:  # float16 normals (2^-14 and up): rebias, round the 13 dropped bits
        m = a - 0x38000000
        return sign | ((m + 0xFFF + ((m >> 13) & 1)) >> 13)
    if a <= 0x33000000:  # 2^-25 and below round to zero (2^-25 itself: the tie goes to even)
        return sign
    shift = 126 - (a >> 23)  # float16 subnormals: value / 2^-24, 14..24 bits dropped
    mant = (a & 0x7FFFFF) | 0x800000
    q = mant >> shift
    rem = mant & ((np.int64(1) << shift) - 1)
    half = np.int64(1) << (shift - 1)
    if rem > half or (rem == half and (q & 1) == 1):
        q += 1
    return sign | q


@njit(**_NB)
def _from_f16(h):
    """float16 bits -> float32, exact."""
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = np.float32(m) * _TWO_M24
        return -v if sign else v
    bits = sign | ((0xFF if e == 31 else e + 112) << 23) | (m << 13)
    return _bits_f32(np.int32(np.int64(bits) - (np.int64(1) << 32) if sign else bits))


@njit(**_NB)
def float16_bits(f):
    """The quantizers' float32 -> float16 on an array f (1-D): (bits uint16, the float16 values
    back as float32)."""
    h = np.empty(f.size, np.uint16)
    back = np.empty(f.size, np.float32)
    for k in range(f.size):
        b = _to_f16(f[k])
        h[k] = b
        back[k] = _from_f16(b)
    return h, back


@njit(**_NB)
def _put_f16(row, off, h):
    row[off] = np.uint8(h & 0xFF)
    row[off + 1] = np.uint8(h >> 8)


# ---------------------------------------------------------------------------- the searches


@njit(**_NB)
def _qkx2(xt, wt, nmax, rmin, nstep, use_mad, L, laux, scales, mins, t, upd):
    """make_qkx2_quants(n, nmax, x, weights, L, &the_min, Laux, rmin, 0.1f, nstep, use_mad) on
    each lane of xt (n, lanes) with weights wt: codes L (n, lanes) 0..nmax, the lanes' scales
    and mins (the_min). t: float32 scratch (12, lanes); upd: uint8 scratch (lanes,)."""
    ne, nl = xt.shape
    mn, mx, sw, sx = t[0], t[1], t[2], t[3]
    best, isc, sl, sl2, sxl, tsc, tmn, mn0 = t[4], t[5], t[6], t[7], t[8], t[9], t[10], t[11]
    fnmax = np.float32(nmax)
    lo = np.int32(0)
    hi = np.int32(nmax)
    for j in range(nl):
        x0 = xt[0, j]
        w0 = wt[0, j]
        mn[j] = x0
        mx[j] = x0
        sw[j] = w0  # C starts these sums from element 0's term
        sx[j] = w0 * x0
    for i in range(1, ne):
        for j in range(nl):
            xi = xt[i, j]
            wi = wt[i, j]
            a = mn[j]
            mn[j] = xi if xi < a else a
            b = mx[j]
            mx[j] = xi if xi > b else b
            sw[j] += wi
            sx[j] += wi * xi
    for j in range(nl):
        a = mn[j]
        a = _Z if a > _Z else a
        mn[j] = a
        mn0[j] = a
        isc[j] = fnmax / (mx[j] - a)
        scales[j] = _ONE / isc[j]
        best[j] = _Z
    for i in range(ne):
        for j in range(nl):
            xi = xt[i, j]
            l = _clamp(_nint(isc[j] * (xi - mn[j])), lo, hi)
            L[i, j] = l
            diff = (scales[j] * np.float32(l) + mn[j]) - xi
            diff = abs(diff) if use_mad else diff * diff
            best[j] += wt[i, j] * diff
    for s in range(nstep + 1):
        num = (rmin + _TENTH * np.float32(s)) + fnmax
        for j in range(nl):
            isc[j] = num / (mx[j] - mn[j])
            sl[j] = _Z
            sl2[j] = _Z
            sxl[j] = _Z
        for i in range(ne):
            for j in range(nl):
                xi = xt[i, j]
                l = _clamp(_nint(isc[j] * (xi - mn[j])), lo, hi)
                laux[i, j] = l
                lf = np.float32(l)
                wl = wt[i, j] * lf
                sl[j] += wl
                sl2[j] += wl * lf
                sxl[j] += wl * xi
        for j in range(nl):
            D = sw[j] * sl2[j] - sl[j] * sl[j]
            upd[j] = 1 if D > _Z else 0
            ts = (sw[j] * sxl[j] - sx[j] * sl[j]) / D
            tm = (sl2[j] * sx[j] - sl[j] * sxl[j]) / D
            pos = tm > _Z
            tsc[j] = sxl[j] / sl2[j] if pos else ts
            tmn[j] = _Z if pos else tm
            sl[j] = _Z  # this trial's error
        if use_mad:
            for i in range(ne):
                for j in range(nl):
                    diff = (tsc[j] * np.float32(laux[i, j]) + tmn[j]) - xt[i, j]
                    sl[j] += wt[i, j] * abs(diff)
        else:
            for i in range(ne):
                for j in range(nl):
                    diff = (tsc[j] * np.float32(laux[i, j]) + tmn[j]) - xt[i, j]
                    sl[j] += wt[i, j] * (diff * diff)
        for j in range(nl):
            u = upd[j] != 0 and sl[j] < best[j]
            upd[j] = 1 if u else 0
            if u:
                best[j] = sl[j]
                scales[j] = tsc[j]
                mn[j] = tmn[j]
        for i in range(ne):
            for j in range(nl):
                L[i, j] = laux[i, j] if upd[j] != 0 else L[i, j]
    for j in range(nl):
        flat = mx[j] == mn0[j]  # C returns early: codes 0, scale 0, the min as found
        scales[j] = _Z if flat else scales[j]
        mins[j] = -(mn0[j] if flat else mn[j])
        upd[j] = 1 if flat else 0
    for i in range(ne):
        for j in range(nl):
            L[i, j] = 0 if upd[j] != 0 else L[i, j]


@njit(**_NB)
def _signed_absmax(xt, amax, mx):
    """``amax = 0, max = 0; for i: if (fabsf(x[i]) > amax) { amax = |x[i]|; max = x[i]; }`` on
    each lane of xt (n, lanes)."""
    ne, nl = xt.shape
    for j in range(nl):
        amax[j] = _Z
        mx[j] = _Z
    for i in range(ne):
        for j in range(nl):
            v = xt[i, j]
            a = abs(v)
            win = a > amax[j]
            amax[j] = a if win else amax[j]
            mx[j] = v if win else mx[j]


@njit(**_NB)
def _qx_rmse1(xt, nmax, L, laux, scales, t, upd):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, NULL) on each lane of xt (n, lanes): codes
    L (n, lanes) 0..2 nmax - 1 (0 for an all-zero lane), the lanes' scales. t: float32
    scratch (6, lanes); upd: uint8 scratch (lanes,)."""
    ne, nl = xt.shape
    amax, mx, isc, slx, sl2, best = t[0], t[1], t[2], t[3], t[4], t[5]
    _signed_absmax(xt, amax, mx)
    fn = np.float32(nmax)
    lo = np.int32(-nmax)
    hi = np.int32(nmax - 1)
    for j in range(nl):
        isc[j] = np.float32(-nmax) / mx[j]
        slx[j] = _Z
        sl2[j] = _Z
    for i in range(ne):
        for j in range(nl):
            v = xt[i, j]
            l = _clamp(_nint(isc[j] * v), lo, hi)
            L[i, j] = l
            lf = np.float32(l)
            w = v * v
            slx[j] += (w * v) * lf
            sl2[j] += (w * lf) * lf
    for j in range(nl):
        sc = slx[j] / sl2[j] if sl2[j] != _Z else _Z
        scales[j] = sc
        best[j] = sc * slx[j]
    for s in range(-9, 10):
        if s == 0:
            continue
        num = -(fn + _TENTH * np.float32(s))
        for j in range(nl):
            isc[j] = num / mx[j]
            slx[j] = _Z
            sl2[j] = _Z
        for i in range(ne):
            for j in range(nl):
                v = xt[i, j]
                l = _clamp(_nint(isc[j] * v), lo, hi)
                laux[i, j] = l
                lf = np.float32(l)
                w = v * v
                slx[j] += (w * v) * lf
                sl2[j] += (w * lf) * lf
        for j in range(nl):
            a = slx[j]
            b = sl2[j]
            u = b > _Z and a * a > best[j] * b
            upd[j] = 1 if u else 0
            if u:
                sc = a / b
                scales[j] = sc
                best[j] = sc * a
        for i in range(ne):
            for j in range(nl):
                L[i, j] = laux[i, j] if upd[j] != 0 else L[i, j]
    for j in range(nl):
        z = amax[j] < GROUP_MAX_EPS
        upd[j] = 1 if z else 0
        scales[j] = _Z if z else scales[j]
    for i in range(ne):
        for j in range(nl):
            L[i, j] = 0 if upd[j] != 0 else L[i, j] + nmax


@njit(**_NB)
def _q3_rmse(xt, nmax, L, scales, t, active, changed):
    """make_q3_quants(n, nmax, x, L, do_rmse=true) on each lane of xt (n, lanes): codes from
    the scale -nmax/max, then up to 5 passes that move one code at a time when that improves
    the x²-weighted fit. Codes L (n, lanes) 0..2 nmax - 1 (0 for an all-zero lane), the lanes'
    scales. t: float32 scratch (4, lanes); active, changed: uint8 scratch (lanes,)."""
    ne, nl = xt.shape
    amax, mx, slx, sl2 = t[0], t[1], t[2], t[3]
    _signed_absmax(xt, amax, mx)
    lo = np.int32(-nmax)
    hi = np.int32(nmax - 1)
    for j in range(nl):
        mx[j] = np.float32(-nmax) / mx[j]  # iscale
        slx[j] = _Z
        sl2[j] = _Z
        active[j] = 0 if amax[j] < GROUP_MAX_EPS else 1
    for i in range(ne):
        for j in range(nl):
            v = xt[i, j]
            l = _clamp(_nint(mx[j] * v), lo, hi)
            L[i, j] = l
            lf = np.float32(l)
            w = v * v
            slx[j] += (w * v) * lf
            sl2[j] += (w * lf) * lf
    for _ in range(5):
        for j in range(nl):
            changed[j] = 0
        for i in range(ne):
            for j in range(nl):
                v = xt[i, j]
                w = v * v
                li = L[i, j]
                lf = np.float32(li)
                a = slx[j] - (w * v) * lf
                b = sl2[j] - (w * lf) * lf
                new_l = _clamp(_nint((v * b) / a), lo, hi)
                nf = np.float32(new_l)
                a2 = a + (w * v) * nf
                b2 = b + (w * nf) * nf
                go = (
                    active[j] != 0
                    and a > _Z
                    and new_l != li
                    and b2 > _Z
                    and (a2 * a2) * sl2[j] > (slx[j] * slx[j]) * b2
                )
                L[i, j] = new_l if go else li
                slx[j] = a2 if go else slx[j]
                sl2[j] = b2 if go else sl2[j]
                changed[j] = 1 if go else changed[j]
        any_active = False
        for j in range(nl):
            a = active[j] != 0 and changed[j] != 0
            active[j] = 1 if a else 0
            any_active |= a
        if not any_active:
            break
    for j in range(nl):
        z = amax[j] < GROUP_MAX_EPS
        scales[j] = _Z if z else (slx[j] / sl2[j] if sl2[j] > _Z else _Z)
        active[j] = 1 if z else 0
    for i in range(ne):
        for j in range(nl):
            L[i, j] = 0 if active[j] != 0 else L[i, j] + nmax


@njit(**_NB)
def _transpose(x, s0, nsb, nsub, xt):
    """xt[i, b * nsub + j] = x[s0 + b, n * j + i]: the nsub sub-blocks (n elements each) of
    super-blocks s0 .. s0 + nsb - 1 as lanes."""
    ne = QK_K // nsub
    for b in range(nsb):
        for j in range(nsub):
            for i in range(ne):
                xt[i, b * nsub + j] = x[s0 + b, ne * j + i]


# ---------------------------------------------------------------------------- the formats


@njit(parallel=True, **_NB)
def quantize_q4_k_q5_k(x, out, nmax):
    """quantize_row_q4_K_ref (nmax 15; out (n, 144)) or quantize_row_q5_K_ref (nmax 31;
    out (n, 176)) of x (n, 256) float32."""
    n = x.shape[0]
    q5 = nmax == 31
    rmin = np.float32(-0.5) if q5 else np.float32(-1.0)
    nstep = 15 if q5 else 20
    for g in prange((n + _G - 1) // _G):
        s0 = g * _G
        nsb = min(_G, n - s0)
        nl = nsb * 8
        xt = np.empty((32, nl), np.float32)
        wt = np.empty((32, nl), np.float32)
        L = np.empty((32, nl), np.int32)
        laux = np.empty((32, nl), np.int32)
        scales = np.empty(nl, np.float32)
        mins = np.empty(nl, np.float32)
        t = np.empty((12, nl), np.float32)
        upd = np.empty(nl, np.uint8)
        codes = np.empty(QK_K, np.int32)
        ls = np.empty(8, np.int32)
        lm = np.empty(8, np.int32)
        _transpose(x, s0, nsb, 8, xt)
        for j in range(nl):
            s = _Z
            for i in range(32):
                s += xt[i, j] * xt[i, j]
            av = np.sqrt(s / _F32_)
            for i in range(32):
                wt[i, j] = av + abs(xt[i, j])
        _qkx2(xt, wt, nmax, rmin, nstep, False, L, laux, scales, mins, t, upd)
        for b in range(nsb):
            row = out[s0 + b]
            xr = x[s0 + b]
            max_scale = _Z
            max_min = _Z
            for j in range(8):
                sc = scales[b * 8 + j]
                max_scale = sc if sc > max_scale else max_scale
                m = mins[b * 8 + j]
                max_min = m if m > max_min else max_min
            inv_scale = _F63 / max_scale if max_scale > _Z else _Z
            inv_min = _F63 / max_min if max_min > _Z else _Z
            for j in range(8):
                ls[j] = min(63, _nint(inv_scale * scales[b * 8 + j]) & 0xFF)
                lm[j] = min(63, _nint(inv_min * mins[b * 8 + j]) & 0xFF)
            for j in range(4):
                row[4 + j] = np.uint8(ls[j] | ((ls[j + 4] >> 4) << 6))
                row[8 + j] = np.uint8(lm[j] | ((lm[j + 4] >> 4) << 6))
                row[12 + j] = np.uint8((ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4))
            dh = _to_f16(max_scale / _F63)
            mh = _to_f16(max_min / _F63)
            _put_f16(row, 0, dh)
            _put_f16(row, 2, mh)
            d0 = _from_f16(dh)
            m0 = _from_f16(mh)
            for j in range(8):
                d = d0 * np.float32(ls[j])
                if d == _Z:  # C keeps the search's codes
                    for i in range(32):
                        codes[32 * j + i] = L[i, b * 8 + j]
                else:
                    dm = m0 * np.float32(lm[j])
                    for i in range(32):
                        codes[32 * j + i] = _clamp(_nint((xr[32 * j + i] + dm) / d), 0, nmax)
            if q5:
                for l in range(32):
                    h = 0
                    for k in range(8):
                        h |= ((codes[32 * k + l] >> 4) & 1) << k
                    row[16 + l] = np.uint8(h)
                qs = 48
            else:
                qs = 16
            for g4 in range(4):
                for l in range(32):
                    row[qs + 32 * g4 + l] = np.uint8(
                        (codes[64 * g4 + l] & 0xF) | ((codes[64 * g4 + 32 + l] & 0xF) << 4)
                    )


@njit(**_NB)
def _pack_2bit(codes, row, off):
    """Codes 0..3 (256) -> 64 bytes at row[off]: byte 32 h + l holds codes 128 h + l, +32, +64,
    +96 in bits 0-1, 2-3, 4-5, 6-7."""
    for h in range(2):
        for l in range(32):
            c = 128 * h + l
            row[off + 32 * h + l] = np.uint8(
                (codes[c] & 3)
                | ((codes[c + 32] & 3) << 2)
                | ((codes[c + 64] & 3) << 4)
                | ((codes[c + 96] & 3) << 6)
            )


@njit(parallel=True, **_NB)
def quantize_q2_k(x, out):
    """quantize_row_q2_K_ref of x (n, 256) float32 into out (n, 84)."""
    n = x.shape[0]
    G = _G // 2
    for g in prange((n + G - 1) // G):
        s0 = g * G
        nsb = min(G, n - s0)
        nl = nsb * 16
        xt = np.empty((16, nl), np.float32)
        wt = np.empty((16, nl), np.float32)
        L = np.empty((16, nl), np.int32)
        laux = np.empty((16, nl), np.int32)
        scales = np.empty(nl, np.float32)
        mins = np.empty(nl, np.float32)
        t = np.empty((12, nl), np.float32)
        upd = np.empty(nl, np.uint8)
        codes = np.empty(QK_K, np.int32)
        _transpose(x, s0, nsb, 16, xt)
        for i in range(16):
            for j in range(nl):
                wt[i, j] = abs(xt[i, j])
        _qkx2(xt, wt, 3, np.float32(-0.5), 15, True, L, laux, scales, mins, t, upd)
        for b in range(nsb):
            row = out[s0 + b]
            xr = x[s0 + b]
            max_scale = _Z
            max_min = _Z
            for j in range(16):
                sc = scales[b * 16 + j]
                max_scale = sc if sc > max_scale else max_scale
                m = mins[b * 16 + j]
                max_min = m if m > max_min else max_min
            if max_scale > _Z:
                iscale = _F15 / max_scale
                for j in range(16):
                    row[j] = np.uint8(_nint(iscale * scales[b * 16 + j]) & 0xFF)
                dh = _to_f16(max_scale / _F15)
            else:
                for j in range(16):
                    row[j] = 0
                dh = _to_f16(_Z)
            if max_min > _Z:
                iscale = _F15 / max_min
                for j in range(16):
                    row[j] = np.uint8((row[j] | (_nint(iscale * mins[b * 16 + j]) << 4)) & 0xFF)
                mh = _to_f16(max_min / _F15)
            else:
                mh = _to_f16(_Z)
            _put_f16(row, 80, dh)
            _put_f16(row, 82, mh)
            d0 = _from_f16(dh)
            m0 = _from_f16(mh)
            for j in range(16):
                d = d0 * np.float32(row[j] & 0xF)
                if d == _Z:
                    for i in range(16):
                        codes[16 * j + i] = L[i, b * 16 + j]
                else:
                    dm = m0 * np.float32(row[j] >> 4)
                    for i in range(16):
                        codes[16 * j + i] = _clamp(_nint((xr[16 * j + i] + dm) / d), 0, 3)
            _pack_2bit(codes, row, 16)


@njit(parallel=True, **_NB)
def quantize_q3_k(x, out):
    """quantize_row_q3_K_ref of x (n, 256) float32 into out (n, 110)."""
    n = x.shape[0]
    # one super-block per search: make_q3_quants' passes stop when none of its lanes changes,
    # which comes sooner with fewer lanes (measured faster than 8 super-blocks at a time)
    G = 1
    for g in prange((n + G - 1) // G):
        s0 = g * G
        nsb = min(G, n - s0)
        nl = nsb * 16
        xt = np.empty((16, nl), np.float32)
        L = np.empty((16, nl), np.int32)
        scales = np.empty(nl, np.float32)
        t = np.empty((4, nl), np.float32)
        active = np.empty(nl, np.uint8)
        changed = np.empty(nl, np.uint8)
        codes = np.empty(QK_K, np.int32)
        ls = np.empty(16, np.int32)
        _transpose(x, s0, nsb, 16, xt)
        _q3_rmse(xt, 4, L, scales, t, active, changed)
        for b in range(nsb):
            row = out[s0 + b]
            xr = x[s0 + b]
            max_scale = _Z
            amax = _Z
            for j in range(16):
                sc = scales[b * 16 + j]
                a = abs(sc)
                win = a > amax
                amax = a if win else amax
                max_scale = sc if win else max_scale
            if max_scale != _Z:
                iscale = np.float32(-32.0) / max_scale
                for j in range(16):
                    l = _nint(iscale * scales[b * 16 + j]) & 0xFF
                    l = (l ^ 0x80) - 0x80  # C stores it in an int8_t
                    ls[j] = _clamp(l, -32, 31) + 32
                dh = _to_f16(_ONE / iscale)
            else:
                for j in range(16):
                    ls[j] = 0
                dh = _to_f16(_Z)
            for j in range(8):
                row[96 + j] = np.uint8((ls[j] & 0xF) | ((ls[j + 8] & 0xF) << 4))
            for k in range(4):
                row[104 + k] = np.uint8(
                    (ls[k] >> 4)
                    | ((ls[k + 4] >> 4) << 2)
                    | ((ls[k + 8] >> 4) << 4)
                    | ((ls[k + 12] >> 4) << 6)
                )
            _put_f16(row, 108, dh)
            d0 = _from_f16(dh)
            for j in range(16):
                d = d0 * np.float32(ls[j] - 32)
                if d == _Z:
                    for i in range(16):
                        codes[16 * j + i] = L[i, b * 16 + j]
                else:
                    for i in range(16):
                        codes[16 * j + i] = _clamp(_nint(xr[16 * j + i] / d), -4, 3) + 4
            for l in range(32):
                h = 0
                for k in range(8):
                    c = codes[32 * k + l]
                    if c > 3:
                        h |= 1 << k
                        codes[32 * k + l] = c - 4
                row[l] = np.uint8(h)
            _pack_2bit(codes, row, 32)


@njit(parallel=True, **_NB)
def quantize_q6_k(x, out):
    """quantize_row_q6_K_ref of x (n, 256) float32 into out (n, 210)."""
    n = x.shape[0]
    G = _G // 2
    for g in prange((n + G - 1) // G):
        s0 = g * G
        nsb = min(G, n - s0)
        nl = nsb * 16
        xt = np.empty((16, nl), np.float32)
        L = np.empty((16, nl), np.int32)
        laux = np.empty((16, nl), np.int32)
        scales = np.empty(nl, np.float32)
        t = np.empty((6, nl), np.float32)
        upd = np.empty(nl, np.uint8)
        codes = np.empty(QK_K, np.int32)
        sc = np.empty(16, np.int32)
        _transpose(x, s0, nsb, 16, xt)
        _qx_rmse1(xt, 32, L, laux, scales, t, upd)
        for b in range(nsb):
            row = out[s0 + b]
            xr = x[s0 + b]
            max_scale = _Z
            amax = _Z
            for j in range(16):
                s = scales[b * 16 + j]
                a = abs(s)
                win = a > amax
                amax = a if win else amax
                max_scale = s if win else max_scale
            if amax < GROUP_MAX_EPS:
                for k in range(210):
                    row[k] = 0
                continue
            iscale = np.float32(-128.0) / max_scale
            dh = _to_f16(_ONE / iscale)
            for j in range(16):
                v = min(127, _nint(iscale * scales[b * 16 + j])) & 0xFF
                row[192 + j] = np.uint8(v)
                sc[j] = (v ^ 0x80) - 0x80  # the int8_t stored
            _put_f16(row, 208, dh)
            d0 = _from_f16(dh)
            for j in range(16):
                d = d0 * np.float32(sc[j])
                if d == _Z:
                    for i in range(16):
                        codes[16 * j + i] = L[i, b * 16 + j]
                else:
                    for i in range(16):
                        codes[16 * j + i] = _clamp(_nint(xr[16 * j + i] / d), -32, 31) + 32
            for h in range(2):
                for l in range(32):
                    c = 128 * h + l
                    q1, q2, q3, q4 = codes[c], codes[c + 32], codes[c + 64], codes[c + 96]
                    row[64 * h + l] = np.uint8((q1 & 0xF) | ((q3 & 0xF) << 4))
                    row[64 * h + 32 + l] = np.uint8((q2 & 0xF) | ((q4 & 0xF) << 4))
                    row[128 + 32 * h + l] = np.uint8(
                        (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)
                    )


def block_bytes(x: np.ndarray, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The float32 super-blocks (n, 256), C-contiguous, and records' bytes (n, type_size)."""
    raw = records.view(np.uint8).reshape(records.shape[0], records.dtype.itemsize)
    return np.ascontiguousarray(x, dtype=np.float32), raw


# ---------------------------------------------------------------------------- bit packing


def unpack_scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes (n, 12) -> 6-bit (scale, min) per sub-block, (n, 8) each, as
    ggml's ``get_scale_min_k4``: sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) and
    4-7 (mins); 4-7 from the nibbles of bytes 8-11 and the top 2 bits of bytes 0-7."""
    q = scales.astype(np.uint8)
    sc = np.empty((q.shape[0], 8), np.uint8)
    mn = np.empty((q.shape[0], 8), np.uint8)
    sc[:, :4] = q[:, 0:4] & 63
    mn[:, :4] = q[:, 4:8] & 63
    sc[:, 4:] = (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return sc, mn


def unpack_2bit(qs: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K's qs (n, 64) -> codes 0..3 (n, 256): for each half h (128 codes), byte
    32 h + l holds codes 128 h + l, +32, +64, +96 in bits 0-1, 2-3, 4-5, 6-7."""
    q = qs.reshape(-1, 2, 1, 32)
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    return ((q >> shifts) & 3).reshape(-1, QK_K)
