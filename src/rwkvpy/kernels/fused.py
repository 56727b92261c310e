"""One-token decode with the per-token glue fused into numba kernels.

For T = 1 the matrix-vector products are memory-bound and fast (see kernels.linear); what costs
is everything between them: dozens of tiny torch ops per layer, ~1 us each. Here each version's
norms, token-shift mixes, LoRAs, recurrence and most gates run in numba kernels on numpy views
of torch tensors (no copies, no second thread pool): one call per layer, its products and (v7)
its LoRAs and recurrence on numba's threads, the rest serial.

The math is that of models/v4.py ... v7.py; tests/test_fast_paths.py holds each step to the
float32 reference.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
import torch.nn.functional as F

from ..models.config import Version
from ..state import State
from . import simd as _simd
from .linear import PARALLEL_LOCK, _float_at, _mv_par, _mv_rows, _numba_threads, row_product
from .wkv import wkv4_step

DECAY_SCALE = math.exp(-0.5)


@numba.njit(inline="always", cache=True, nogil=True)
def _sig(x):
    """sigmoid(x) in float32."""
    return np.float32(1.0) / (np.float32(1.0) + np.float32(math.exp(-x)))


@numba.njit(cache=True, nogil=True)
def _vexp(x):
    """x = exp(x) in place (float32 1-D): kernels.simd.exp8_f32, 8 values at a time (the last
    ones through a padded copy: every value gets the same function)."""
    n = x.shape[0]
    n8 = n // 8
    _simd.exp8_f32(x, x, n8)
    if n > 8 * n8:
        # element loops, not slice copies: a slice copy brings numba's shape-mismatch error
        # (message formatting, ~150 KB of IR) into this function and every caller's compile
        t = np.zeros(8, np.float32)
        for j in range(8 * n8, n):
            t[j - 8 * n8] = x[j]
        _simd.exp8_f32(t, t, 1)
        for j in range(8 * n8, n):
            x[j] = t[j - 8 * n8]


@numba.njit(cache=True, nogil=True)
def _vsigmoid(x):
    """x = sigmoid(x) = 1 / (1 + exp(-x)) in place (float32 1-D; exp in vector code: _vexp)."""
    one = np.float32(1.0)
    for j in range(x.shape[0]):
        x[j] = -x[j]
    _vexp(x)
    for j in range(x.shape[0]):
        x[j] = one / (one + x[j])


@numba.njit(inline="always", cache=True, nogil=True)
def _dot(a, b):
    """sum(a * b) over a's length (float32): explicit vector code (kernels.simd.dot16_f32),
    then a scalar tail; the same sum in every function that inlines it."""
    n = a.shape[0]
    n16 = n // 16
    s = _simd.dot16_f32(a, b, n16)
    for j in range(16 * n16, n):
        s += a[j] * b[j]
    return s


@numba.njit(cache=True, nogil=True)
def _norm_stats(out, eps):
    """Mean and 1/sqrt(variance + eps) of one head's output (group norm statistics)."""
    N = out.shape[0]
    mean = np.float32(0.0)
    for i in range(N):
        mean += out[i]
    mean /= N
    var = np.float32(0.0)
    for i in range(N):
        d = out[i] - mean
        var += d * d
    return mean, np.float32(1.0) / np.float32(math.sqrt(var / N + eps))


@numba.njit(cache=True, nogil=True)
def _layer_norm(x, w, b, eps, out):
    """out = layer_norm(x) * w + b for one vector (float32 mean and biased variance)."""
    mean, inv = _norm_stats(x, eps)
    for c in range(x.shape[0]):
        out[c] = (x[c] - mean) * inv * w[c] + b[c]


@numba.njit(cache=True, nogil=True)
def _mix_in(x, delta, lnw, lnb, eps, prev, mix, xx, out, kind):
    """The start of a time- or channel-mix block, for each of B sequences (rows):
    x += delta (the previous block's output; skipped when delta has no rows),
    xx = layer_norm(x), and the token-shift mixes out[j] = xx + (prev - xx) * mix[j]
    (kind 0: v6, v7) or prev + (xx - prev) * mix[j] (kind 1: v4, v5, as their papers write
    x * m + prev * (1 - m)).

    x, delta, prev, xx (B, C); mix (M, C); out (M, B, C). xx is the block's new shift state.
    """
    B, C = x.shape
    for b in range(B):
        if delta.shape[0] > 0:
            for c in range(C):
                x[b, c] += delta[b, c]
        _layer_norm(x[b], lnw, lnb, eps, xx[b])
        for j in range(mix.shape[0]):
            for c in range(C):
                if kind == 0:
                    out[j, b, c] = xx[b, c] + (prev[b, c] - xx[b, c]) * mix[j, c]
                else:
                    out[j, b, c] = prev[b, c] + (xx[b, c] - prev[b, c]) * mix[j, c]


@numba.njit(cache=True, nogil=True)
def _vec_mat_part(x, W, kind, out, c0, c1, d0, d1):
    """out[d0:d1] = x[c0:c1] @ W[c0:c1, d0:d1]: rows c0 .. c1 added in order, one axpy per
    row (no reduction across lanes). W: the rows' bytes (C, D * size), kind 7 float32, 5
    float16, 6 bfloat16, widened exactly (kernels/simd.py); the columns past the last whole 32
    in scalar code. Each column is the same sum whichever range of columns is computed."""
    size = 4 if kind == 7 else 2
    n32 = (d1 - d0) // 32
    e = d0 + 32 * n32
    for d in range(d0, d1):
        out[d] = 0.0
    o = out[d0:e]
    if kind == 7:
        _simd.axpys_f32(o, W, x, c0, c1, d0 * size, n32)
    elif kind == 5:
        _simd.axpys_f16(o, W, x, c0, c1, d0 * size, n32)
    else:
        _simd.axpys_bf16(o, W, x, c0, c1, d0 * size, n32)
    for c in range(c0, c1):  # the columns past the last whole 32 (each its own sum: the
        xc = x[c]            # same order of rows as the vector part)
        row = W[c]
        for d in range(e, d1):
            out[d] += xc * _float_at(kind, row, d)


#: A LoRA's products here (v6's four, v7's second ones) sum the rows of their matrix in this
#: many parts, each a whole output vector, then add the parts in order: the serial and the
#: threaded kernels alike, so the numbers do not depend on the thread count. Threads take
#: whole parts, so each reads whole rows one after another: the 24 layers' v7 LoRA second
#: products of v7 1.5B on two threads 3.9 ms split by columns (each thread half of every row),
#: 2.3-2.5 by parts (one process, alternating, median of 15).
LORA_PARTS = 4


@numba.njit(cache=True, nogil=True)
def _vm_part(x, W, kind, out, p):
    """out = x[rows] @ W[rows] over part p of W's rows (see LORA_PARTS)."""
    n = W.shape[0]
    _vec_mat_part(x, W, kind, out, p * n // LORA_PARTS, (p + 1) * n // LORA_PARTS, 0,
                  out.shape[0])


@numba.njit(parallel=True, cache=True, nogil=True)
def _vm_parts_par(xs, Ws, kind, parts):
    for i in numba.prange(len(Ws) * LORA_PARTS):
        j, p = i // LORA_PARTS, i % LORA_PARTS
        _vm_part(xs[j], Ws[j], kind, parts[j, p], p)


@numba.njit(cache=True, nogil=True)
def _vm_parts(xs, Ws, kind, parts, threads):
    """parts[j, p] = part p of xs[j] @ Ws[j] for every matrix j (a tuple) and part p, on
    numba's threads when ``threads`` > 1."""
    if threads > 1:
        _vm_parts_par(xs, Ws, kind, parts)
    else:
        for j in range(len(Ws)):
            for p in range(LORA_PARTS):
                _vm_part(xs[j], Ws[j], kind, parts[j, p], p)


@numba.njit(cache=True, nogil=True)
def _col_dots(x2, WT, kind, y2, threads):
    """y2 (B, D) = x2 (B, C) @ W for a first LoRA matrix W given as its D columns (rows of
    bytes, _cols_bytes): a dot product per column as kernels.linear sums float rows, the
    columns split across numba's threads when ``threads`` > 1 (the same numbers)."""
    D = WT.shape[0]
    if threads > 1:
        _mv_par(kind, WT, x2, y2, max(1, -(-D // (8 * threads))), 32)
    else:
        _mv_rows(kind, WT, x2, y2, np.int64(0), D, 32)


@numba.njit(cache=True, nogil=True)
def _parts_sum(parts, out):
    """out = parts[0] + parts[1] + ..., in that order."""
    for c in range(out.shape[0]):
        acc = parts[0, c]
        for p in range(1, parts.shape[0]):
            acc += parts[p, c]
        out[c] = acc


@numba.njit(cache=True, nogil=True)
def _v7_loras(xw, xa, xv, xg, w1, w2, a1, a2, v1, v2, g1, g2, kind, wl, al, vl, g):
    """The low-rank projections of a v7 time mix, for each of B sequences (rows):
    wl = tanh(xw w1) w2, al = (xa a1) a2, vl = (xv v1) v2 (skipped when v1 has no rows:
    layer 0), g = sigmoid(xg g1) g2. The first matrices as their columns (_cols_bytes), the
    second as their rows (_rows_bytes), in the dtype stored (``kind`` as in _vec_mat_part)."""
    B = xw.shape[0]
    hid = _lora_hidden((w1, a1, v1, g1), kind, B)
    # np.int64(0), not 0: a literal argument gets a compiled version of the callee of its own
    _loras_in((xw, xa, xv, xg), (w1, a1, v1, g1), kind, hid, np.int64(0), _lora_units(hid))
    parts = np.empty((4, B, LORA_PARTS, wl.shape[1]), np.float32)
    for b in range(B):
        for p in range(LORA_PARTS):
            _lora_out_part(hid, (w2, a2, v2, g2), kind, parts, b, p)
        _lora_out_sum(parts, (wl, al, vl, g), hid[2].shape[1] > 0, b, np.int64(0), wl.shape[1])


#: the activation between the two matrices of v7's four LoRAs (w, a, v, g): 1 tanh, 2 sigmoid
_V7_ACTS = (1, 0, 0, 2)


@numba.njit(cache=True, nogil=True)
def _lora_hidden(W1s, kind, B):
    """The hidden vectors (B, D_j) of LoRAs whose first matrices are W1s (their D_j columns,
    each as a row of bytes: _cols_bytes)."""
    return (np.empty((B, W1s[0].shape[0]), np.float32),
            np.empty((B, W1s[1].shape[0]), np.float32),
            np.empty((B, W1s[2].shape[0]), np.float32),
            np.empty((B, W1s[3].shape[0]), np.float32))


@numba.njit(cache=True, nogil=True)
def _lora_units(hid):
    """Work units of the LoRAs' first products: 32 hidden columns each, LoRA after LoRA."""
    n = 0
    for j in range(len(hid)):
        n += (hid[j].shape[1] + 31) // 32
    return n


@numba.njit(cache=True, nogil=True)
def _loras_in(xs, W1s, kind, hid, u0, u1):
    """Units u0 .. u1 (_lora_units) of the four v7 LoRAs' first products and activations:
    hid[j][b, cols] = act_j(xs[j][b] @ W1s[j][:, cols]), each hidden value the dot product of
    a column of the first matrix (W1s[j]: the columns as rows of bytes) with x, as the float
    rows of kernels.linear sum it (4 columns a quarter of the unit apart at once for one
    sequence). Against an axpy per row of the matrix as stored (C, D): the first products of
    v7 1.5B's layers 1-23 on two threads 2.05 -> 1.41 ms, 23.5 -> 34.1 GB/s (one process,
    alternating, median of 15)."""
    o = 0
    for j in range(len(hid)):
        D = hid[j].shape[1]
        n = (D + 31) // 32
        lo, hi = max(u0, o) - o, min(u1, o + n) - o
        o += n
        if hi <= lo:
            continue
        d0, d1 = 32 * lo, min(D, 32 * hi)
        act = _V7_ACTS[j]
        _mv_rows(kind, W1s[j], xs[j], hid[j], d0, d1, 32)
        for b in range(hid[j].shape[0]):
            h = hid[j][b]
            if act == 1:
                for d in range(d0, d1):
                    h[d] = np.float32(math.tanh(h[d]))
            elif act == 2:
                for d in range(d0, d1):
                    h[d] = _sig(h[d])


@numba.njit(parallel=True, cache=True, nogil=True)
def _loras_in_par(xs, W1s, kind, hid, n):
    """_loras_in over all units, split evenly across n threads."""
    U = _lora_units(hid)
    for t in numba.prange(n):
        _loras_in(xs, W1s, kind, hid, t * U // n, (t + 1) * U // n)


@numba.njit(cache=True, nogil=True)
def _lora_out_part(hid, W2s, kind, parts, b, p):
    """parts[j, b, p] = the part p of sequence b's second product of LoRA j (its rows p D / P
    .. (p + 1) D / P); LoRAs without rows (v in layer 0) skipped."""
    for j in range(4):
        if hid[j].shape[1] > 0:
            _vm_part(hid[j][b], W2s[j], kind, parts[j, b, p], p)


@numba.njit(parallel=True, cache=True, nogil=True)
def _lora_out_par(hid, W2s, kind, parts):
    """Every part of every sequence's LoRA second products (_lora_out_part), across numba's
    threads."""
    B = parts.shape[1]
    for i in numba.prange(B * LORA_PARTS):
        _lora_out_part(hid, W2s, kind, parts, i // LORA_PARTS, i % LORA_PARTS)


@numba.njit(cache=True, nogil=True)
def _lora_out_sum(parts, outs, has_v, b, c0, c1):
    """Columns c0 .. c1 of sequence b's LoRA outputs (w, a, v, g): their parts added in
    order (v only where the layer has the value residual)."""
    for j in range(4):
        if j == 2 and not has_v:
            continue
        _parts_sum(parts[j, b, :, c0:c1], outs[j][b, c0:c1])


@numba.njit(cache=True, nogil=True)
def _v6_mix(xx, prev, xxx, w1, w2, maa, td, dw1, dw2, kind, out, dec, threads):
    """v6's data-dependent token shift and decay for each of B sequences (rows):
    h = tanh(xxx w1) (5 slices of D), x_j = xx + (prev - xx) * (maa_j + h_j w2[j]) for
    j = w, k, v, r, g into out[j], and dec = exp(-exp(td + tanh(x_w dw1) dw2)) (its exps
    in vector code: _vexp).

    w1 (C, 5D) and dw1 (C, Dd) as their columns (_cols_bytes: _col_dots), w2 (5, D, C) and
    dw2 (Dd, A) as their rows (axpys), ``kind`` as in _vec_mat_part. Each second product sums its
    rows in LORA_PARTS parts, added in order (_parts_sum): on ``threads`` > 1 the parts (and
    the first products' columns) run on numba's threads, the same numbers. 24 layers of v6
    1.6B (F32 LoRAs, 88 MB a token), one thread, all four by axpys: 5.4 ms, 16-18 GB/s."""
    B, C = xx.shape
    D = w2.shape[1]
    P = LORA_PARTS
    h2 = np.empty((1, 5 * D), np.float32)
    h = h2[0]
    m = np.empty(C, np.float32)
    hd = np.empty((1, dw1.shape[0]), np.float32)
    pm = np.empty((5, P, C), np.float32)
    pdec = np.empty((1, P, dec.shape[1]), np.float32)
    for b in range(B):
        _col_dots(xxx[b:b + 1], w1, kind, h2, threads)
        for d in range(h.shape[0]):
            h[d] = np.float32(math.tanh(h[d]))
        _vm_parts(h.reshape(5, D), (w2[0], w2[1], w2[2], w2[3], w2[4]), kind, pm, threads)
        for j in range(5):
            _parts_sum(pm[j], m)
            for c in range(C):
                out[j, b, c] = xx[b, c] + (prev[b, c] - xx[b, c]) * (maa[j, c] + m[c])
        _col_dots(out[0, b:b + 1], dw1, kind, hd, threads)
        for d in range(hd.shape[1]):
            hd[0, d] = np.float32(math.tanh(hd[0, d]))
        _vm_parts(hd, (dw2,), kind, pdec, threads)
        _parts_sum(pdec[0], dec[b])
        db = dec[b]
        for c in range(db.shape[0]):
            db[c] = td[c] + db[c]
        _vexp(db)
        for c in range(db.shape[0]):
            db[c] = -db[c]
        _vexp(db)


@numba.njit(cache=True, nogil=True)
def _sigmoid(x):
    """x = sigmoid(x) in place (B, C): _vsigmoid on each row."""
    for b in range(x.shape[0]):
        _vsigmoid(x[b])


@numba.njit(cache=True, nogil=True)
def _relu_sq(k):
    """k = relu(k) ** 2 in place (B, F)."""
    for b in range(k.shape[0]):
        for j in range(k.shape[1]):
            v = max(k[b, j], np.float32(0.0))
            k[b, j] = v * v


@numba.njit(cache=True, nogil=True)
def _v7_core(r, k, v, vfirst, wl, al, vl, g, first, w0, a0, v0, k_k, k_a, r_k, lnw, lnb, eps,
             S_in, S_out, y):
    """v7 time mix after the projections, for one token of each of B sequences.

    r, k, v, wl, al, vl, g (B, C) float32; vfirst (B, C) read (or written when first);
    S_in (B, H, N, N) as in models/v7.py, read; S_out receives the new state (may be S_in);
    y (B, C) receives (group_norm(S r) + bonus) * g.
    """
    for bi in range(S_in.shape[0]):
        _v7_heads(r[bi], k[bi], v[bi], vfirst[bi], wl[bi], al[bi], vl[bi], g[bi], first, w0,
                  a0, v0, k_k, k_a, r_k, lnw, lnb, eps, S_in[bi], S_out[bi], y[bi], np.int64(0),
                  S_in.shape[1])  # (np.int64: one compiled _v7_heads for both callers)


@numba.njit(parallel=True, cache=True, nogil=True)
def _v7_time_par(r, k, v, vfirst, parts, has_v, wl, al, vl, g, first, w0, a0, v0, k_k, k_a,
                 r_k, lnw, lnb, eps, S_in, S_out, y, n):
    """The LoRAs' outputs from their parts (_lora_out_par) and _v7_core on n threads, each
    taking a range of heads (the LoRA output columns of those heads, then their recurrence)."""
    B, H, N = S_in.shape[0], S_in.shape[1], S_in.shape[2]
    for t in numba.prange(n):
        h0, h1 = t * H // n, (t + 1) * H // n
        for bi in range(B):
            _lora_out_sum(parts, (wl, al, vl, g), has_v, bi, h0 * N, h1 * N)
            _v7_heads(r[bi], k[bi], v[bi], vfirst[bi], wl[bi], al[bi], vl[bi], g[bi], first,
                      w0, a0, v0, k_k, k_a, r_k, lnw, lnb, eps, S_in[bi], S_out[bi], y[bi],
                      h0, h1)


@numba.njit(cache=True, nogil=True)
def _v7_heads(r, k, v, vfirst, wl, al, vl, g, first, w0, a0, v0, k_k, k_a, r_k, lnw, lnb, eps,
              S, S_out, y, h0, h1):
    """Heads h0 .. h1 of one sequence's v7 recurrence (see _v7_core)."""
    N = S.shape[1]
    kk = np.empty(N, np.float32)
    kt = np.empty(N, np.float32)
    ka = np.empty(N, np.float32)
    w = np.empty(N, np.float32)
    vv = np.empty(N, np.float32)
    out = np.empty(N, np.float32)
    ea = np.empty(N, np.float32)
    ev = np.empty(N, np.float32)
    one, ds = np.float32(1.0), np.float32(-DECAY_SCALE)
    for h in range(h0, h1):
        b = h * N
        # the exponentials of the head's channels in vector code (_vsigmoid, _vexp), between
        # loops that the compiler vectorizes: a = sigmoid(a0 + al), w = exp(-e^-0.5
        # sigmoid(w0 + wl)), gate = sigmoid(v0 + vl)
        for j in range(N):
            c = b + j
            kk[j] = k[c] * k_k[c]
            ea[j] = a0[c] + al[c]
            w[j] = w0[c] + wl[c]
            ev[j] = v0[c] + vl[c]
        _vsigmoid(ea)
        _vsigmoid(w)
        if not first:
            _vsigmoid(ev)
        for j in range(N):
            w[j] = ds * w[j]
        _vexp(w)
        nrm = max(np.float32(math.sqrt(_dot(kk, kk))), np.float32(1e-12))
        for j in range(N):
            c = b + j
            kk[j] = kk[j] / nrm
            a = ea[j]
            kt[j] = k[c] * (one + (a - one) * k_a[c])
            ka[j] = kk[j] * a
        if first:
            for j in range(N):
                vfirst[b + j] = v[b + j]
                vv[j] = v[b + j]
        else:
            for j in range(N):
                c = b + j
                vv[j] = v[c] + (vfirst[c] - v[c]) * ev[j]
        rh = r[b:b + N]
        for i in range(N):
            sa = -_dot(S[h, i], kk)
            vi = vv[i]
            Si, So = S[h, i], S_out[h, i]
            for j in range(N):
                So[j] = Si[j] * w[j] + sa * ka[j] + vi * kt[j]
            out[i] = _dot(So, rh)
        mean, inv = _norm_stats(out, eps)
        for j in range(N):
            ka[j] = rh[j] * r_k[h, j]  # (ka is free again)
        bonus = _dot(ka, kt)
        for i in range(N):
            c = b + i
            y[c] = ((out[i] - mean) * inv * lnw[c] + lnb[c] + bonus * vv[i]) * g[c]


@numba.njit(cache=True, nogil=True)
def _silu_gate(y, g):
    """y *= silu(g) = g * sigmoid(g), in place (B, C; the sigmoid by _vsigmoid)."""
    e = np.empty(y.shape[1], np.float32)
    for b in range(y.shape[0]):
        gb, yb = g[b], y[b]
        e[:] = gb
        _vsigmoid(e)
        for j in range(e.shape[0]):
            yb[j] *= gb[j] * e[j]


# inlined: compiled on its own, it would link in and optimize all of row_product once more
@numba.njit(inline="always", cache=True, nogil=True)
def _products(spec, x, n_out, threads):
    """x (B, in) @ W^T as a new (B, n_out) array (kernels.linear.row_product)."""
    y = np.empty((x.shape[0], n_out), np.float32)
    row_product(spec, x, y, threads)
    return y


@numba.njit(cache=True, nogil=True)
def _v7_block(x, delta, att_prev, ffn_prev, wkv_prev, att_new, ffn_new, wkv_new, v_first,
              ln, mix, fmix, lora, lora_kind, vecs, prods, n_ffn, first, eps, threads):
    """One whole v7 block in one call (FusedStep._layer_v7's steps, no Python between them):
    x (B, C) += delta, time mix, channel mix; returns the channel mix's output (B, C).
    prods: the numba specs (kernels.linear.row_product) of receptance, key, value, output,
    ffn key (n_ffn outputs), ffn value; eps: (layer norm, group norm); threads: numba's
    threads for the products (set by the caller; 1: serial)."""
    B, C = x.shape
    ln1w, ln1b, ln2w, ln2b = ln
    w1, w2, a1, a2, v1, v2, g1, g2 = lora
    w0, a0, v0, k_k, k_a, r_k, lnw, lnb = vecs
    A = w0.shape[0]
    mn = np.empty((6, B, C), np.float32)
    _mix_in(x, delta, ln1w, ln1b, eps[0], att_prev, mix, att_new, mn, 0)
    r = _products(prods[0], mn[0], A, threads)
    k = _products(prods[1], mn[2], A, threads)
    v = _products(prods[2], mn[3], A, threads)
    wl = np.empty((B, A), np.float32)
    al = np.empty((B, A), np.float32)
    vl = np.empty((B, A), np.float32)
    g = np.empty((B, A), np.float32)
    y = np.empty((B, A), np.float32)
    if threads > 1:  # the LoRAs and the heads' recurrence split across the threads too
        xs, W1s = (mn[1], mn[4], mn[3], mn[5]), (w1, a1, v1, g1)
        hid = _lora_hidden(W1s, lora_kind, B)
        _loras_in_par(xs, W1s, lora_kind, hid, threads)
        parts = np.empty((4, B, LORA_PARTS, A), np.float32)
        _lora_out_par(hid, (w2, a2, v2, g2), lora_kind, parts)
        _v7_time_par(r, k, v, v_first, parts, hid[2].shape[1] > 0, wl, al, vl, g, first,
                     w0, a0, v0, k_k, k_a, r_k, lnw, lnb, eps[1], wkv_prev, wkv_new, y, threads)
    else:
        _v7_loras(mn[1], mn[4], mn[3], mn[5], w1, w2, a1, a2, v1, v2, g1, g2, lora_kind,
                  wl, al, vl, g)
        _v7_core(r, k, v, v_first, wl, al, vl, g, first, w0, a0, v0, k_k, k_a, r_k, lnw, lnb,
                 eps[1], wkv_prev, wkv_new, y)
    att = _products(prods[3], y, C, threads)
    kn = np.empty((1, B, C), np.float32)
    _mix_in(x, att, ln2w, ln2b, eps[0], ffn_prev, fmix, ffn_new, kn, 0)
    kk = _products(prods[4], kn[0], n_ffn, threads)
    _relu_sq(kk)
    return _products(prods[5], kk, C, threads)


@numba.njit(cache=True, nogil=True)
def _channel_mix_v4(x, att, ln2w, ln2b, eps, ffn_prev, fmix, ffn_new, kind, prods, n_ffn,
                    threads):
    """v4/v5/v6 channel mix of a whole block: x += att, then sigmoid(x_r W_r) * W_v
    relu(x_k W_k)^2 (prods[4:7]: ffn key, receptance, value)."""
    B, C = x.shape
    fn = np.empty((2, B, C), np.float32)
    _mix_in(x, att, ln2w, ln2b, eps, ffn_prev, fmix, ffn_new, fn, kind)
    kk = _products(prods[4], fn[0], n_ffn, threads)
    _relu_sq(kk)
    rr = _products(prods[5], fn[1], C, threads)
    _sigmoid(rr)
    vv = _products(prods[6], kk, C, threads)
    for b in range(B):
        for c in range(C):
            vv[b, c] *= rr[b, c]
    return vv


@numba.njit(cache=True, nogil=True)
def _v4_block(x, delta, att_prev, ffn_prev, S_prev, att_new, ffn_new, S_new,
              ln, mix, fmix, decay, u, prods, n_ffn, eps, threads):
    """One whole v4 block in one call (FusedStep._layer's steps; see _v7_block). prods:
    receptance, key, value, output, ffn key, ffn receptance, ffn value."""
    B, C = x.shape
    A = decay.shape[0]
    mn = np.empty((3, B, C), np.float32)
    _mix_in(x, delta, ln[0], ln[1], eps[0], att_prev, mix, att_new, mn, 1)
    r = _products(prods[0], mn[0], A, threads)
    k = _products(prods[1], mn[1], A, threads)
    v = _products(prods[2], mn[2], A, threads)
    _sigmoid(r)
    y = np.empty((B, A), np.float32)
    _v4_core(r, k, v, decay, u, S_prev, S_new, y)
    att = _products(prods[3], y, C, threads)
    return _channel_mix_v4(x, att, ln[2], ln[3], eps[0], ffn_prev, fmix, ffn_new, 1, prods,
                           n_ffn, threads)


@numba.njit(cache=True, nogil=True)
def _v5_block(x, delta, att_prev, ffn_prev, S_prev, att_new, ffn_new, S_new,
              ln, mix, fmix, w, u, lnx, prods, n_ffn, eps, threads):
    """One whole v5 block (5.2: with the gate, prods[7], when mix has 4 rows)."""
    B, C = x.shape
    A = u.shape[0]
    mn = np.empty((mix.shape[0], B, C), np.float32)
    _mix_in(x, delta, ln[0], ln[1], eps[0], att_prev, mix, att_new, mn, 1)
    r = _products(prods[0], mn[0], A, threads)
    k = _products(prods[1], mn[1], A, threads)
    v = _products(prods[2], mn[2], A, threads)
    y = np.empty((B, A), np.float32)
    _v5_core(r, k, v, w, u, lnx[0], lnx[1], eps[1], S_prev, S_new, y)
    if mix.shape[0] > 3:
        _silu_gate(y, _products(prods[7], mn[3], A, threads))
    att = _products(prods[3], y, C, threads)
    return _channel_mix_v4(x, att, ln[2], ln[3], eps[0], ffn_prev, fmix, ffn_new, 1, prods,
                           n_ffn, threads)


@numba.njit(cache=True, nogil=True)
def _v6_block(x, delta, att_prev, ffn_prev, S_prev, att_new, ffn_new, S_new,
              ln, mix, fmix, maa, lora, lora_kind, u, lnx, prods, n_ffn, eps, threads):
    """One whole v6 block: the data-dependent mixes and decay (_v6_mix), r/k/v/g, the v5
    recurrence, the SiLU gate (prods[7]), output, channel mix."""
    B, C = x.shape
    A = u.shape[0]
    w1, w2, td, dw1, dw2 = lora
    mn = np.empty((1, B, C), np.float32)
    _mix_in(x, delta, ln[0], ln[1], eps[0], att_prev, mix, att_new, mn, 0)
    x5 = np.empty((5, B, C), np.float32)
    dec = np.empty((B, A), np.float32)
    _v6_mix(att_new, att_prev, mn[0], w1, w2, maa, td, dw1, dw2, lora_kind, x5, dec, threads)
    r = _products(prods[0], x5[3], A, threads)
    k = _products(prods[1], x5[1], A, threads)
    v = _products(prods[2], x5[2], A, threads)
    g = _products(prods[7], x5[4], A, threads)
    y = np.empty((B, A), np.float32)
    _v5_core(r, k, v, dec, u, lnx[0], lnx[1], eps[1], S_prev, S_new, y)
    _silu_gate(y, g)
    att = _products(prods[3], y, C, threads)
    return _channel_mix_v4(x, att, ln[2], ln[3], eps[0], ffn_prev, fmix, ffn_new, 0, prods,
                           n_ffn, threads)


@numba.njit(cache=True, nogil=True)
def _v5_core(r, k, v, w, u, lnw, lnb, eps, S_in, S_out, y):
    """v5/v6 time mix for one token of each of B sequences: out = r (u k^T v + S),
    S = k^T v + w S, then group norm.

    r, k, v (B, C); w (B, C) or (1, C) decay, u (C,) bonus per channel; S_in (B, H, N, N)
    (key, value) read, S_out receives the new state (may be S_in); y (B, C).
    """
    for bi in range(S_in.shape[0]):
        _v5_one(r[bi], k[bi], v[bi], w[bi if w.shape[0] > 1 else 0], u, lnw, lnb, eps,
                S_in[bi], S_out[bi], y[bi])


@numba.njit(cache=True, nogil=True)
def _v5_one(r, k, v, w, u, lnw, lnb, eps, S, S_out, y):
    H, N = S.shape[0], S.shape[1]
    out = np.empty(N, np.float32)
    for h in range(H):
        b = h * N
        for i in range(N):
            out[i] = 0.0
        for j in range(N):  # key index
            rj, kj, wj, uj = r[b + j], k[b + j], w[b + j], u[b + j]
            for i in range(N):  # value index
                kv = kj * v[b + i]
                out[i] += rj * (uj * kv + S[h, j, i])
                S_out[h, j, i] = kv + wj * S[h, j, i]
        mean, inv = _norm_stats(out, eps)
        for i in range(N):
            y[b + i] = (out[i] - mean) * inv * lnw[b + i] + lnb[b + i]


@numba.njit(cache=True, nogil=True)
def _v4_core(r, k, v, decay, u, S_in, S_out, y):
    """v4 WKV for one token of each of B sequences (r, k, v, y (B, C)), with the numerically
    safe exponent: S_in (B, 3, C) = numerator aa, denominator bb, exponent pp, read; S_out
    receives the new ones (may be S_in)."""
    for bi in range(k.shape[0]):
        _v4_one(r[bi], k[bi], v[bi], decay, u, S_in[bi], S_out[bi], y[bi])


@numba.njit(cache=True, nogil=True)
def _v4_one(r, k, v, decay, u, S, S_out, y):
    for c in range(k.shape[0]):
        out, S_out[0, c], S_out[1, c], S_out[2, c] = wkv4_step(k[c], v[c], S[0, c], S[1, c],
                                                               S[2, c], decay[c], u[c])
        y[c] = r[c] * out


def _rows_bytes(t: torch.Tensor) -> np.ndarray:
    """A 2-D float tensor's rows as bytes (C, D * size), without a copy when it is contiguous
    (a copy of a file's tensor releases the file's pages: formats.base.release_pages)."""
    from ..formats.base import release_pages

    c = t.detach().contiguous()
    if c.data_ptr() != t.data_ptr():
        release_pages(t)
    return c.view(torch.uint8).numpy().reshape(c.shape[0], -1)


def _cols_bytes(t: torch.Tensor) -> np.ndarray:
    """A 2-D float tensor's columns as rows of bytes (D, C * size): no copy when the tensor is
    held column by column (models.base LOW_RANK_COLUMNS)."""
    return _rows_bytes(t.t())


def _low_rank(ts: list):
    """A layer's LoRA matrices (None where absent) as they are when they share one of float32,
    float16, bfloat16, else all as float32; and that dtype's kind for _vec_mat_part."""
    dtypes = {t.dtype for t in ts if t is not None}
    if len(dtypes) > 1 or not dtypes <= {torch.float32, torch.float16, torch.bfloat16}:
        ts = [None if t is None else t.float() for t in ts]
        dtypes = {torch.float32}
    return ts, {torch.float32: 7, torch.float16: 5, torch.bfloat16: 6}[dtypes.pop()]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


class FusedStep:
    """Runs one token through a built model (models.vX instance) with fused glue.

    Every step between the matrix products is a numba kernel on numpy views of torch tensors:
    the layer norms and token-shift mixes (_mix_in), the LoRAs (v6's _v6_mix, v7's _v7_loras),
    each version's recurrence; v5.2/v6's SiLU gates stay small torch ops. The states are read
    where they are and the new ones written into fresh tensors (no copy on the way in).
    Holds no weights of its own beyond per-layer views and stacks of the model's small tensors
    (a contiguous copy of a LoRA matrix only where the model holds a strided view, whose file
    pages are then released).

    Each block runs as one numba call (_v4_block, _v5_block, _v6_block, _v7_block: norms,
    mixes, products, LoRAs, the recurrence and the gates without returning to Python) where
    every product of the model has a numba spec (kernels.linear.Linear.numba_spec); else step
    by step from Python (_layer, _layer_v7). Measured in one process, alternating tokens, 2
    threads, median per token against the step-by-step path: v7 0.1B Q4_0 9.98 vs 11.18 ms,
    Q5_1 10.56 vs 11.72, Q8_0 10.73 vs 11.95, F16 13.95 vs 15.06; v4 169M Q4_0 7.21 vs 8.39,
    F16 13.45 vs 14.51; v7 1.5B Q4_0 46.9 vs 54.0; v6 1.6B Q4_0 54.6 vs 59.2. On several
    threads _v7_block also splits its LoRAs and recurrence between them (_loras_in_par,
    _v7_time_par; the same numbers): its 24 blocks of v7 1.5B Q4_0 37.6 vs 40.0 ms. The
    products are read when the step is built: a model whose ``net.lin`` changes needs a new
    FusedStep.
    """

    def __init__(self, net):
        self.net = net
        self.cfg = net.cfg
        w, L = net.w, net.cfg.n_layer
        self.layers = []
        v = self.cfg.version
        for i in range(L):
            a, f = f"blocks.{i}.att.", f"blocks.{i}.ffn."
            d = {"ln": [_np(w[f"blocks.{i}.{n}"]) for n in
                        ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias")]}
            if v is Version.V7:
                d["mix"] = _np(torch.stack([w[a + "x_" + n] for n in "rwkvag"]))    # (6, C)
                d["fmix"] = _np(w[f + "x_k"].reshape(1, -1))                        # (1, C)
                lora, d["kind"] = _low_rank([w[a + n] if (i > 0 or n[0] != "v") else None
                                             for n in ("w1", "w2", "a1", "a2", "v1", "v2",
                                                       "g1", "g2")])
                d["lora"] = [np.zeros((0, 1), np.uint8) if t is None else
                             (_rows_bytes if j % 2 else _cols_bytes)(t)
                             for j, t in enumerate(lora)]  # layer 0: no value residual LoRA
                d["np"] = [_np(w[a + n]) for n in ("w0", "a0")] + [
                    _np(w[a + "v0"]) if i > 0 else np.zeros(1, np.float32)] + [
                    _np(w[a + n]) for n in ("k_k", "k_a", "r_k", "ln_x.weight", "ln_x.bias")]
            elif v is Version.V6:
                d["mix"] = _np(w[a + "time_maa_x"].reshape(1, -1))                  # (1, C)
                d["maa"] = _np(torch.stack([w[a + "time_maa_" + n] for n in "wkvrg"]))
                (w1, w2, dw1, dw2), d["kind"] = _low_rank([w[a + "time_" + n] for n in (
                    "maa_w1", "maa_w2", "decay_w1", "decay_w2")])
                d["lora"] = (_cols_bytes(w1),
                             _rows_bytes(w2.reshape(-1, w2.shape[-1])).reshape(
                                 w2.shape[0], w2.shape[1], -1),
                             _np(w[a + "time_decay"].reshape(-1).float().contiguous()),
                             _cols_bytes(dw1), _rows_bytes(dw2))
                d["u"] = _np(w[a + "time_faaaa"].reshape(-1).contiguous())
                d["fmix"] = _np(torch.stack([w[f + "time_maa_k"], w[f + "time_maa_r"]]))
            else:  # v4, v5: x*m + prev*(1-m) = prev + (x - prev)*m
                names = "rkv" + ("g" if v is Version.V5_2 else "")
                d["mix"] = _np(torch.stack([w[a + "time_mix_" + n] for n in names]))
                d["fmix"] = _np(torch.stack([w[f + "time_mix_k"], w[f + "time_mix_r"]]))
                if v is not Version.V4:
                    d["w"] = _np(w[a + "decay"].reshape(1, -1).contiguous())
                    d["u"] = _np(w[a + "bonus"].reshape(-1).contiguous())
            self.layers.append(d)
        #: the blocks as whole numba kernels (_v4_block ... _v7_block) where every product has
        #: a numba spec; None: the blocks run step by step from Python (_layer, _layer_v7)
        self.blocks = self._numba_blocks()

    def _numba_blocks(self):
        """Per layer: the block kernel and its arguments after the per-token ones (None where
        a product has no numba spec)."""
        cfg, net, w, v = self.cfg, self.net, self.net.w, self.cfg.version
        if v is Version.V7:
            names = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key",
                     "ffn.value")
        else:
            names = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key",
                     "ffn.receptance", "ffn.value") + (
                         ("att.gate",) if v in (Version.V5_2, Version.V6) else ())
        blocks = []
        self.blocks_max_b = 1 << 62
        for i, d in enumerate(self.layers):
            lins = [net.lin[f"blocks.{i}.{n}.weight"] for n in names]
            specs = tuple(lin.numba_spec() for lin in lins)
            if any(sp is None for sp in specs):
                return None
            if v is Version.V5_0:  # no gate: a placeholder for _v5_block's unused prods[7]
                specs += specs[:1]
            self.blocks_max_b = min([self.blocks_max_b] + [lin.rows_max_t for lin in lins])
            a = f"blocks.{i}.att."
            ln = tuple(d["ln"])
            if v is Version.V7:
                blocks.append((_v7_block, (ln, d["mix"], d["fmix"], tuple(d["lora"]), d["kind"],
                                           tuple(d["np"]), specs, cfg.n_ffn, i == 0)))
            elif v is Version.V4:
                blocks.append((_v4_block, (ln, d["mix"], d["fmix"], _np(w[a + "decay"]),
                                           _np(w[a + "time_first"]), specs, cfg.n_ffn)))
            else:
                lnx = (_np(w[a + "ln_x.weight"]), _np(w[a + "ln_x.bias"]))
                if v is Version.V6:
                    blocks.append((_v6_block, (ln, d["mix"], d["fmix"], d["maa"], d["lora"],
                                               d["kind"], d["u"], lnx, specs, cfg.n_ffn)))
                else:
                    blocks.append((_v5_block, (ln, d["mix"], d["fmix"], d["w"], d["u"], lnx,
                                               specs, cfg.n_ffn)))
        return blocks

    def __call__(self, token: int, state: State):
        """One token from one state: returns (logits (V,), new State)."""
        logits, (new,) = self.batch([token], [state])
        return logits[0], new

    def batch(self, tokens: list, states: list):
        """One token for each of B independent sequences, in one pass over the weights.

        Returns (logits (B, V), list of B new States). The given states are unchanged.
        """
        net, cfg, w = self.net, self.cfg, self.net.w
        L, B, C = cfg.n_layer, len(states), cfg.n_embd

        def gather(name):  # (L, B, ...): a view for one sequence, a stacked copy for several
            ts = [getattr(s, name) for s in states]
            return ts[0].unsqueeze(1) if B == 1 else torch.stack(ts, 1)

        ins = [gather(n) for n in ("att_x", "ffn_x", "wkv")]
        outs = [torch.empty((L, B) + tuple(t.shape[2:]), dtype=torch.float32) for t in ins]
        io = [_np(t) for t in ins], [_np(t) for t in outs]
        x = net.ln(w["emb.weight"][torch.as_tensor(tokens)].float(), "blocks.0.ln0").contiguous()
        delta = np.empty((0, C), np.float32)  # nothing to add before the first block
        if self.blocks is not None and B <= self.blocks_max_b:
            delta = self._run_blocks(_np(x), delta, io)
        else:
            layer = self._layer_v7 if cfg.version is Version.V7 else self._layer
            ctx = {"B": B}
            for i in range(L):
                delta = layer(i, _np(x), delta, ins, io, ctx)
        x += torch.from_numpy(delta)
        logits = net.head(net.ln(x, "ln_out"))
        att, ffn, wkv = outs
        if B == 1:
            return logits, [State(states[0].version, att[:, 0], ffn[:, 0], wkv[:, 0],
                                  states[0].n_tokens + 1)]
        return logits, [State(s.version, att[:, b].clone(), ffn[:, b].clone(), wkv[:, b].clone(),
                              s.n_tokens + 1) for b, s in enumerate(states)]

    def _run_blocks(self, xn, delta, io):
        """Every block as one numba call each (self.blocks); the products on numba's threads
        unless another parallel launch holds kernels.linear.PARALLEL_LOCK (then serial)."""
        (att_in, ffn_in, wkv_in), (ao, fo, so) = io
        cfg = self.cfg
        eps = (np.float32(cfg.layer_norm_eps), np.float32(cfg.ln_x_eps))
        v_first = np.empty((xn.shape[0], cfg.n_att), np.float32)  # v7's value residual
        n = torch.get_num_threads()
        parallel = n > 1 and PARALLEL_LOCK.acquire(blocking=False)
        try:
            threads = _numba_threads(n) if parallel else 1
            v7 = cfg.version is Version.V7
            for i, (block, args) in enumerate(self.blocks):
                state = (att_in[i], ffn_in[i], wkv_in[i], ao[i], fo[i], so[i])
                delta = (block(xn, delta, *state, v_first, *args, eps, threads) if v7 else
                         block(xn, delta, *state, *args, eps, threads))
        finally:
            if parallel:
                PARALLEL_LOCK.release()
        return delta

    def _np_mm(self, x, name):
        """x (B, in) numpy @ W^T for a projection matrix, numpy out (Linear.np_mm)."""
        return self.net.lin[name].np_mm(x)

    def _scratch(self, ctx, name, shape):
        buf = ctx.get(name)
        if buf is None:
            buf = ctx[name] = np.empty(shape, np.float32)
        return buf

    # -- RWKV-7 ----------------------------------------------------------------------------------
    def _layer_v7(self, i, xn, delta, ins, io, ctx):
        """One v7 block: x (numpy view, updated in place) += delta, then time mix and channel
        mix; returns the channel mix's output (added by the next block)."""
        cfg, d = self.cfg, self.layers[i]
        (att_in, ffn_in, wkv_in), (ao, fo, so) = io
        B, C, A = ctx["B"], cfg.n_embd, cfg.n_att
        a, f = f"blocks.{i}.att.", f"blocks.{i}.ffn."
        ln1w, ln1b, ln2w, ln2b = d["ln"]
        ln_eps = np.float32(cfg.layer_norm_eps)
        mn = self._scratch(ctx, "mixed", (6, B, C))
        _mix_in(xn, delta, ln1w, ln1b, ln_eps, att_in[i], d["mix"], ao[i], mn, 0)
        mm = self._np_mm
        r = mm(mn[0], a + "receptance.weight")
        k = mm(mn[2], a + "key.weight")
        v = mm(mn[3], a + "value.weight")
        wl, al, vl, g = (self._scratch(ctx, n, (B, A)) for n in ("wl", "al", "vl", "g"))
        # (split over two threads the LoRAs were no faster: measured, 0.1B and 1.5B)
        _v7_loras(mn[1], mn[4], mn[3], mn[5], *d["lora"], d["kind"], wl, al, vl, g)
        y = np.empty((B, A), np.float32)
        w0, a0, v0, k_k, k_a, r_k, lnw, lnb = d["np"]
        _v7_core(r, k, v, self._scratch(ctx, "v_first", (B, A)), wl, al, vl, g, i == 0, w0, a0,
                 v0, k_k, k_a, r_k, lnw, lnb, np.float32(cfg.ln_x_eps), wkv_in[i], so[i], y)
        att = mm(y, a + "output.weight")
        kn = self._scratch(ctx, "fmixed", (1, B, C))
        _mix_in(xn, att, ln2w, ln2b, ln_eps, ffn_in[i], d["fmix"], fo[i], kn, 0)
        kk = mm(kn[0], f + "key.weight")
        _relu_sq(kk)
        return mm(kk, f + "value.weight")

    # -- RWKV-4, 5, 6 ----------------------------------------------------------------------------
    def _layer(self, i, xn, delta, ins, io, ctx):
        """One v4/v5/v6 block (see _layer_v7)."""
        cfg, w, d, ver = self.cfg, self.net.w, self.layers[i], self.cfg.version
        (att_in, ffn_in, wkv_in), (ao, fo, so) = io
        B, C = ctx["B"], cfg.n_embd
        a, f = f"blocks.{i}.att.", f"blocks.{i}.ffn."
        ln1w, ln1b, ln2w, ln2b = d["ln"]
        ln_eps = np.float32(cfg.layer_norm_eps)
        kind = 0 if ver is Version.V6 else 1  # v6: xx + dx*m; v4/v5: prev + (xx - prev)*m
        mn = self._scratch(ctx, "mixed", (d["mix"].shape[0], B, C))
        _mix_in(xn, delta, ln1w, ln1b, ln_eps, att_in[i], d["mix"], ao[i], mn, kind)
        y = np.empty((B, cfg.n_att), np.float32)
        if ver is Version.V6:
            x5 = self._scratch(ctx, "mixed5", (5, B, C))
            dec = self._scratch(ctx, "decay", (B, cfg.n_att))
            w1, w2, td, dw1, dw2 = d["lora"]
            _v6_mix(ao[i], att_in[i], mn[0], w1, w2, d["maa"], td, dw1, dw2, d["kind"], x5, dec,
                    1)
            mm = self._np_mm
            r, k, v = (mm(x5[j], a + n) for j, n in ((3, "receptance.weight"),
                                                     (1, "key.weight"), (2, "value.weight")))
            g = F.silu(torch.from_numpy(mm(x5[4], a + "gate.weight")))
            _v5_core(r, k, v, dec, d["u"], _np(w[a + "ln_x.weight"]),
                     _np(w[a + "ln_x.bias"]), np.float32(cfg.ln_x_eps), wkv_in[i], so[i], y)
            y = torch.from_numpy(y) * g
        else:
            mm = self._np_mm
            r = mm(mn[0], a + "receptance.weight")
            k = mm(mn[1], a + "key.weight")
            v = mm(mn[2], a + "value.weight")
            if ver is Version.V4:
                _sigmoid(r)
                _v4_core(r, k, v, _np(w[a + "decay"]), _np(w[a + "time_first"]), wkv_in[i],
                         so[i], y)
            else:
                _v5_core(r, k, v, d["w"], d["u"], _np(w[a + "ln_x.weight"]),
                         _np(w[a + "ln_x.bias"]), np.float32(cfg.ln_x_eps), wkv_in[i], so[i], y)
                if ver is Version.V5_2:
                    y = _np(torch.from_numpy(y) * F.silu(torch.from_numpy(
                        mm(mn[3], a + "gate.weight"))))
        y = np.ascontiguousarray(_np(y) if isinstance(y, torch.Tensor) else y)
        att = self._np_mm(y, a + "output.weight")
        fn = self._scratch(ctx, "fmixed", (2, B, C))
        _mix_in(xn, att, ln2w, ln2b, ln_eps, ffn_in[i], d["fmix"], fo[i], fn, kind)
        kk = self._np_mm(fn[0], f + "key.weight")
        _relu_sq(kk)
        rr = self._np_mm(fn[1], f + "receptance.weight")
        _sigmoid(rr)
        vv = self._np_mm(kk, f + "value.weight")
        vv *= rr
        return vv
