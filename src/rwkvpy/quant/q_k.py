"""What the K-quants (Q2_K .. Q6_K: super-blocks of 256 weights) share: ggml's rounding
helper, its scale searches (``make_qkx2_quants``, ``make_qx_quants``, ``make_q3_quants``) and
the 6-bit scale/min packing of Q4_K and Q5_K.

The searches are ggml's reference ones (ggml-quants.c, used by ``quantize_row_q*_K_ref``, that
is by llama-quantize without an importance matrix), vectorized over many sub-blocks at once:
every float operation is a float32 numpy ufunc in the order the C code applies it, the sums
over a sub-block's elements are sequential (``np.add.accumulate``), and each comparison is the
C one, so NaN inputs, ties and zero signs go the same way. The C code is compiled without
fused multiply-adds (ggml-base is built for the baseline x86-64), so no product is fused here.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
#: ggml's GROUP_MAX_EPS: a sub-block whose largest magnitude is below this is all zeros.
GROUP_MAX_EPS = np.float32(1e-15)

_F = np.float32


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: ``v + 12582912.f`` in float32, its low 23 bits minus 2^22
    (round half to even for ``|v| <= 4194303``; any other float gives the same bits as C)."""
    t = (np.asarray(v, dtype=_F) + _F(12582912)).view(np.int32)
    return (t & 0x007FFFFF) - 0x00400000


def seqsum(terms: np.ndarray) -> np.ndarray:
    """``s = 0; for i: s += terms[..., i]`` in float32, as C sums a sub-block (the ``+ 0``
    turns an all-``-0`` sum into C's ``+0``)."""
    return np.add.accumulate(terms, axis=-1, dtype=_F)[..., -1] + _F(0)


def fold_max(v: np.ndarray, start: float = 0.0) -> np.ndarray:
    """``m = start; for j: if (v[j] > m) m = v[j];`` over the last axis."""
    m = np.full(v.shape[:-1], _F(start), dtype=_F)
    for j in range(v.shape[-1]):
        m = np.where(v[..., j] > m, v[..., j], m)
    return m


def fold_signed_absmax(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``amax = 0, max = 0; for j: if (fabsf(v[j]) > amax) { amax = |v[j]|; max = v[j]; }``
    over the last axis: (amax, max)."""
    amax = np.zeros(v.shape[:-1], dtype=_F)
    mx = np.zeros(v.shape[:-1], dtype=_F)
    for j in range(v.shape[-1]):
        a = np.abs(v[..., j])
        win = a > amax
        amax = np.where(win, a, amax)
        mx = np.where(win, v[..., j], mx)
    return amax, mx


def clamp(v: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """``MAX(lo, MIN(hi, v))`` on ints."""
    return np.minimum(np.maximum(v, lo), hi)


def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                     nstep: int, use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's ``make_qkx2_quants`` on each row of ``x`` (m, n) with weights ``w`` (m, n):
    codes 0..nmax for ``x ~ scale * L - the_min``, the scale and min chosen among
    ``nstep + 1`` trial inverse scales by weighted squared (or absolute) error.
    Returns (scale (m,), the_min (m,), L (m, n) uint8)."""
    f = _F
    mn = x[:, 0].copy()
    mx = x[:, 0].copy()
    for i in range(1, x.shape[1]):
        xi = x[:, i]
        mn = np.where(xi < mn, xi, mn)
        mx = np.where(xi > mx, xi, mx)
    # C starts these sums from element 0's term (not from 0)
    sum_w = np.add.accumulate(w, axis=1, dtype=f)[:, -1]
    sum_x = np.add.accumulate(w * x, axis=1, dtype=f)[:, -1]
    mn = np.where(mn > 0, f(0), mn)
    flat = mx == mn

    def err(scale, lv, mnv):
        diff = (scale[:, None] * lv.astype(f) + mnv[:, None]) - x
        diff = np.abs(diff) if use_mad else diff * diff
        return seqsum(w * diff)

    iscale = f(nmax) / (mx - mn)
    scale = f(1) / iscale
    L = clamp(nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    best = err(scale, L, mn)
    minv = mn.copy()
    if nstep >= 1:
        for s in range(nstep + 1):
            # the trials use the min of the best fit so far (C updates ``min`` in the loop)
            isc = ((f(rmin) + f(rdelta) * f(s)) + f(nmax)) / (mx - minv)
            la = clamp(nearest_int(isc[:, None] * (x - minv[:, None])), 0, nmax)
            lf = la.astype(f)
            wl = w * lf
            sum_l = seqsum(wl)
            sum_l2 = seqsum(wl * lf)
            sum_xl = seqsum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            ok = D > 0
            t_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            t_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = t_min > 0
            t_min = np.where(pos, f(0), t_min)
            t_scale = np.where(pos, sum_xl / sum_l2, t_scale)
            cur = err(t_scale, la, t_min)
            upd = ok & (cur < best)
            L = np.where(upd[:, None], la, L)
            best = np.where(upd, cur, best)
            scale = np.where(upd, t_scale, scale)
            minv = np.where(upd, t_min, minv)
    L = np.where(flat[:, None], 0, L)
    scale = np.where(flat, f(0), scale)
    minv = np.where(flat, mn, minv)
    return scale, -minv, L.astype(np.uint8)


def make_qx_quants_rmse1(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``make_qx_quants(n, nmax, x, L, rmse_type=1, NULL)`` on each row of ``x``
    (m, n): symmetric codes ``L - nmax`` in -nmax..nmax-1, weights x², 19 trial scales.
    Returns (scale (m,), L (m, n) int8 holding 0..2 nmax - 1)."""
    f = _F
    amax, mx = fold_signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    w = x * x
    wx = w * x

    def trial(iscale):
        lv = clamp(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        lf = lv.astype(f)
        return lv, seqsum(wx * lf), seqsum((w * lf) * lf)

    L, sumlx, suml2 = trial(f(-nmax) / mx)
    scale = np.where(suml2 != 0, sumlx / suml2, f(0))
    best = scale * sumlx
    for s in range(-9, 10):
        if s == 0:
            continue
        lv, slx, sl2 = trial(-(f(nmax) + f(0.1) * f(s)) / mx)
        upd = (sl2 > 0) & (slx * slx > best * sl2)
        L = np.where(upd[:, None], lv, L)
        scale = np.where(upd, slx / sl2, scale)
        best = np.where(upd, scale * slx, best)
    L = np.where(zero[:, None], 0, L + nmax)
    scale = np.where(zero, f(0), scale)
    return scale, L.astype(np.int8)


def make_q3_quants_rmse(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``make_q3_quants(n, nmax, x, L, do_rmse=true)`` on each row of ``x`` (m, n):
    codes from the first scale -nmax/max, then up to 5 passes that move one code at a time
    when that improves the weighted (x²) fit. Returns (scale (m,), L (m, n) int8 in
    0..2 nmax - 1)."""
    f = _F
    m, n = x.shape
    amax, mx = fold_signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    iscale = f(-nmax) / mx
    L = clamp(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = seqsum(wx * L.astype(f))
    suml2 = seqsum((w * L.astype(f)) * L.astype(f))
    active = ~zero
    for _ in range(5):
        changed = np.zeros(m, dtype=bool)
        for i in range(n):
            li = L[:, i]
            lif = li.astype(f)
            slx = sumlx - wx[:, i] * lif
            go = active & (slx > 0)
            sl2 = suml2 - (w[:, i] * lif) * lif
            new_l = clamp(nearest_int((x[:, i] * sl2) / slx), -nmax, nmax - 1)
            go &= new_l != li
            nf = new_l.astype(f)
            slx = slx + wx[:, i] * nf
            sl2 = sl2 + (w[:, i] * nf) * nf
            go &= (sl2 > 0) & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
            L[:, i] = np.where(go, new_l, li)
            sumlx = np.where(go, slx, sumlx)
            suml2 = np.where(go, sl2, suml2)
            changed |= go
        active &= changed
        if not active.any():
            break
    scale = np.where(suml2 > 0, sumlx / suml2, f(0))
    L = np.where(zero[:, None], 0, L + nmax)
    scale = np.where(zero, f(0), scale)
    return scale, L.astype(np.int8)


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


def pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """The inverse of :func:`unpack_scale_min_k4` for 6-bit values (n, 8) -> (n, 12)."""
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, :4]
    out[:, 4:8] = lm[:, :4]
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    out[:, 0:4] |= (ls[:, 4:] >> 4) << 6
    out[:, 4:8] |= (lm[:, 4:] >> 4) << 6
    return out


def pack_2bit(L: np.ndarray) -> np.ndarray:
    """Codes 0..3 (n, 256) -> Q2_K/Q3_K's qs (n, 64): for each half h (128 codes), byte
    32 h + l holds codes 128 h + l, +32, +64, +96 in bits 0-1, 2-3, 4-5, 6-7."""
    q = L.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def unpack_2bit(qs: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K's qs (n, 64) -> codes 0..3 (n, 256), the inverse of :func:`pack_2bit`."""
    q = qs.reshape(-1, 2, 1, 32)
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    return ((q >> shifts) & 3).reshape(-1, QK_K)
