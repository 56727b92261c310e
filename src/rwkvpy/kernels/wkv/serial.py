"""The v4, v5/v6 and v7 state recurrences over a sequence on the CPU, token by token in compiled
code (:func:`wkv4_serial`, :func:`wkv5_serial`, :func:`wkv7_serial`): the order of the per-token
references (models/v4.py's wkv4, models/v5.py's wkv_heads, models/v7.py's wkv7), each head's
state kept in the core's cache; without numba, or on another device, the references themselves
or the chunked forms of chunked.py.
"""

from __future__ import annotations

import math

import torch

from .chunked import wkv5_chunked, wkv7_chunked

F32 = torch.float32


# -- v4 ---------------------------------------------------------------------------------------
# v4's WKV carries a running maximum exponent (pp) through max() at every token, so it has no
# chunked matrix form like v5-v7's; what costs in models/v4.py's loop is ~10 torch operations
# per token and layer, a large share of a prompt's time. On the CPU the same loop runs in numba,
# channel by channel (docs/kernels.md).


def wkv4_serial(k, v, decay, u, S):
    """models.v4.wkv4 for a whole sequence: a numba loop on the CPU (same operations in float32,
    exp through float64 rounded back), the torch loop elsewhere."""
    if k.device.type != "cpu" or not _HAVE_NUMBA:
        from ...models.v4 import wkv4

        return wkv4(k, v, decay, u, S)
    T, A = k.shape
    out = torch.empty(T, A, dtype=F32)
    S_out = torch.empty((3, A), dtype=F32)
    args = (*_cpu_f32(k, v, decay, u, S), out.numpy(), S_out.numpy())
    # channels split across numba's threads
    _heads_kernel(lambda: _wkv4_numba(*args, 0, A), lambda n: _wkv4_par(*args, n), A, T)
    return out, S_out


try:
    import numba as _numba
    import numpy as _np

    _HAVE_NUMBA = True

    @_numba.njit(inline="always", cache=True, nogil=True)
    def wkv4_step(kt, vt, aa, bb, pp, decay, u):
        """One token of the v4 WKV for one channel (float32, exp through float64 rounded
        back): returns (out, aa, bb, pp) after it. Also the one-token step's (kernels/decode/)."""
        ww = u + kt
        p = max(pp, ww)
        e1 = _np.float32(math.exp(pp - p))
        e2 = _np.float32(math.exp(ww - p))
        out = (e1 * aa + e2 * vt) / (e1 * bb + e2)
        ww = decay + pp
        p = max(ww, kt)
        e1 = _np.float32(math.exp(ww - p))
        e2 = _np.float32(math.exp(kt - p))
        return out, e1 * aa + e2 * vt, e1 * bb + e2, p

    @_numba.njit(cache=True, nogil=True)
    def _wkv4_numba(k, v, decay, u, S, out, S_out, c0, c1):
        """Channels c0 .. c1 of wkv4_serial."""
        T = k.shape[0]
        for c in range(c0, c1):
            aa, bb, pp = S[0, c], S[1, c], S[2, c]
            for t in range(T):
                out[t, c], aa, bb, pp = wkv4_step(k[t, c], v[t, c], aa, bb, pp, decay[c], u[c])
            S_out[0, c], S_out[1, c], S_out[2, c] = aa, bb, pp

    @_numba.njit(parallel=True, cache=True, nogil=True)
    def _wkv4_par(k, v, decay, u, S, out, S_out, n):
        A = k.shape[1]
        for p in _numba.prange(n):
            _wkv4_numba(k, v, decay, u, S, out, S_out, p * A // n, (p + 1) * A // n)
except ImportError:  # pragma: no cover
    _HAVE_NUMBA = False


# -- v5/v6 and v7 on the CPU: the recurrence itself, head by head ------------------------------
# A head's state (64 x 64 float32, 16 KB) stays in the core's L1 cache for the whole sequence,
# and a token costs ~3-4 multiply-adds per state entry in vector code (kernels.ir.state.wkv5_token,
# wkv7_token), heads split across numba's threads. The chunked forms above do 2-5x more
# arithmetic in small matrix products plus a dozen elementwise passes over each chunk, and on
# the CPU they lose (benchmarks/bench_wkv.py; docs/kernels.md). GPUs keep the chunked forms
# (their parallelism is across tokens).


def _heads_kernel(serial, parallel, H, work):
    """Run a kernel over H independent heads (v4: channels) on numba's threads, a range of
    them each, when H * work is large, torch allows more than one thread and no other parallel
    launch runs; else serially (kernels.linear's rule for products)."""
    from ..linear.threads import _rows_kernel

    _rows_kernel(serial, parallel, H, work)


def _cpu_f32(*xs):
    return [x.to(F32).contiguous().numpy() for x in xs]


def wkv7_serial(r, w, k, v, kk, a, S):
    """:func:`wkv7_chunked`'s contract (same arguments, same results up to float32 rounding):
    the recurrence token by token in numba on the CPU; elsewhere, or without numba, the chunked
    form."""
    if k.device.type != "cpu" or not _HAVE_NUMBA:
        return wkv7_chunked(r, w, k, v, kk, a, S)
    T, H, K = k.shape
    V = v.shape[-1]
    out = torch.empty(T, H, V, dtype=F32)
    S_out = torch.empty(H, V, K, dtype=F32)
    args = (*_cpu_f32(r, w, k, v, kk, a, S), out.numpy(), S_out.numpy())
    _heads_kernel(lambda: _wkv7_heads(*args, 0, H), lambda n: _wkv7_par(*args, n), H, T * K * V)
    return out, S_out


def wkv5_serial(r, k, v, w, u, S):
    """:func:`wkv5_chunked`'s contract (w per token (T, H, N_k) or per channel (H, N_k)): the
    recurrence token by token in numba on the CPU; elsewhere, or without numba, chunked."""
    if k.device.type != "cpu" or not _HAVE_NUMBA:
        return wkv5_chunked(r, k, v, w, u, S)
    T, H, K = k.shape
    V = v.shape[-1]
    out = torch.empty(T, H, V, dtype=F32)
    S_out = torch.empty(H, K, V, dtype=F32)
    w3 = w if w.dim() == 3 else w.unsqueeze(0)  # (1, H, K): every token
    args = (*_cpu_f32(r, k, v, w3, u, S), out.numpy(), S_out.numpy())
    _heads_kernel(lambda: _wkv5_heads(*args, 0, H), lambda n: _wkv5_par(*args, n), H, T * K * V)
    return out, S_out


if _HAVE_NUMBA:
    from ..ir import state as _ir_state

    _STEP = _ir_state._STATE_LANES

    @_numba.njit(cache=True, nogil=True)
    def _wkv7_heads(r, w, k, v, kk, a, S, out, S_out, h0, h1):
        """Heads h0 .. h1 of wkv7_serial: S (H, N_v, N_k) held transposed (row j = key
        channel j) in st; value channels past the last whole 16 in scalar code."""
        T, K, V = k.shape[0], k.shape[2], v.shape[2]
        nb = V // _STEP
        st = _np.empty(K * V, _np.float32)
        ka = _np.empty(K, _np.float32)
        for h in range(h0, h1):
            for i in range(V):
                for j in range(K):
                    st[j * V + i] = S[h, i, j]
            for t in range(T):
                kkt, wt, kt, rt, vt = kk[t, h], w[t, h], k[t, h], r[t, h], v[t, h]
                for j in range(K):
                    ka[j] = kkt[j] * a[t, h, j]
                _ir_state.wkv7_token(st, kkt, wt, ka, kt, vt, rt, out[t, h], K, V, nb)
                for i in range(nb * _STEP, V):
                    sa = _np.float32(0.0)
                    for j in range(K):
                        sa += st[j * V + i] * kkt[j]
                    o = _np.float32(0.0)
                    for j in range(K):
                        x = st[j * V + i] * wt[j] - sa * ka[j] + vt[i] * kt[j]
                        st[j * V + i] = x
                        o += x * rt[j]
                    out[t, h, i] = o
            for i in range(V):
                for j in range(K):
                    S_out[h, i, j] = st[j * V + i]

    @_numba.njit(parallel=True, cache=True, nogil=True)
    def _wkv7_par(r, w, k, v, kk, a, S, out, S_out, n):
        H = S.shape[0]
        for p in _numba.prange(n):
            _wkv7_heads(r, w, k, v, kk, a, S, out, S_out, p * H // n, (p + 1) * H // n)

    @_numba.njit(cache=True, nogil=True)
    def _wkv5_heads(r, k, v, w, u, S, out, S_out, h0, h1):
        """Heads h0 .. h1 of wkv5_serial: S (H, N_k, N_v) row by row as stored; w (T or 1,
        H, N_k); value channels past the last whole 16 in scalar code."""
        T, K, V = k.shape[0], k.shape[2], v.shape[2]
        nb = V // _STEP
        per_token = w.shape[0] > 1
        st = _np.empty(K * V, _np.float32)
        for h in range(h0, h1):
            st[:] = S[h].ravel()
            uh = u[h]
            for t in range(T):
                rt, kt, vt = r[t, h], k[t, h], v[t, h]
                wt = w[t, h] if per_token else w[0, h]
                _ir_state.wkv5_token(st, rt, kt, wt, uh, vt, out[t, h], K, V, nb)
                for i in range(nb * _STEP, V):
                    o = _np.float32(0.0)
                    for j in range(K):
                        x = st[j * V + i]
                        kv = kt[j] * vt[i]
                        o += rt[j] * (x + uh[j] * kv)
                        st[j * V + i] = kv + wt[j] * x
                    out[t, h, i] = o
            S_out[h] = st.reshape(K, V)

    @_numba.njit(parallel=True, cache=True, nogil=True)
    def _wkv5_par(r, k, v, w, u, S, out, S_out, n):
        H = S.shape[0]
        for p in _numba.prange(n):
            _wkv5_heads(r, k, v, w, u, S, out, S_out, p * H // n, (p + 1) * H // n)
