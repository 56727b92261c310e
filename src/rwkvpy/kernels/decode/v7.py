"""RWKV-7's fast decode: one layer's weights as the kernels take them (:class:`V7Layer`), the
whole block as one numba call (:func:`_v7_block`: time mix with its four LoRAs and the
recurrence split across numba's threads, channel mix), and the same block step by step from
Python (:func:`layer`). The math is that of models/v7.py; tests/test_fast_paths.py holds each
path to the float32 reference.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np
import torch

from ..linear.rows import _mv_rows
from .glue import (
    LORA_PARTS,
    _cols_bytes,
    _dot,
    _low_rank,
    _mix_in,
    _norm_stats,
    _np,
    _parts_sum,
    _products,
    _relu_sq,
    _rows_bytes,
    _sig,
    _vexp,
    _vm_part,
    _vsigmoid,
)

DECAY_SCALE = math.exp(-0.5)


@numba.njit(cache=True, nogil=True)
def _v7_loras(xs, lora, kind, outs):
    """The low-rank projections of a v7 time mix, for each of B sequences (rows): with
    ``xs`` = (xw, xa, xv, xg), ``lora`` = (w1, w2, a1, a2, v1, v2, g1, g2) (V7Layer.lora) and
    ``outs`` = (wl, al, vl, g): wl = tanh(xw w1) w2, al = (xa a1) a2, vl = (xv v1) v2 (skipped
    when v1 has no rows: layer 0), g = sigmoid(xg g1) g2. The first matrices as their columns
    (_cols_bytes), the second as their rows (_rows_bytes), in the dtype stored (``kind`` as in
    _vec_mat_part)."""
    xw, xa, xv, xg = xs
    w1, w2, a1, a2, v1, v2, g1, g2 = lora
    wl, al, vl, g = outs
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
    return (
        np.empty((B, W1s[0].shape[0]), np.float32),
        np.empty((B, W1s[1].shape[0]), np.float32),
        np.empty((B, W1s[2].shape[0]), np.float32),
        np.empty((B, W1s[3].shape[0]), np.float32),
    )


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
    sequence): faster than an axpy per row of the matrix as stored (C, D), which writes the
    hidden vector once per row (docs/kernels.md)."""
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
def _v7_core(tok, vecs, first, eps, S_in, S_out, y):
    """v7 time mix after the projections, for one token of each of B sequences.

    tok = (r, k, v, vfirst, wl, al, vl, g): (B, C) float32, vfirst read (or written when
    first); vecs: V7Layer.vecs; S_in (B, H, N, N) as in models/v7.py, read; S_out receives the
    new state (may be S_in); y (B, C) receives (group_norm(S r) + bonus) * g.
    """
    r, k, v, vfirst, wl, al, vl, g = tok
    for bi in range(S_in.shape[0]):
        _v7_heads(
            (r[bi], k[bi], v[bi], vfirst[bi], wl[bi], al[bi], vl[bi], g[bi]),
            vecs,
            first,
            eps,
            S_in[bi],
            S_out[bi],
            y[bi],
            np.int64(0),
            S_in.shape[1],
        )  # (np.int64: one compiled _v7_heads for both callers)


@numba.njit(parallel=True, cache=True, nogil=True)
def _v7_time_par(tok, parts, has_v, vecs, first, eps, S_in, S_out, y, n):
    """The LoRAs' outputs from their parts (_lora_out_par) and _v7_core on n threads, each
    taking a range of heads (the LoRA output columns of those heads, then their recurrence)."""
    r, k, v, vfirst, wl, al, vl, g = tok
    B, H, N = S_in.shape[0], S_in.shape[1], S_in.shape[2]
    for t in numba.prange(n):
        h0, h1 = t * H // n, (t + 1) * H // n
        for bi in range(B):
            _lora_out_sum(parts, (wl, al, vl, g), has_v, bi, h0 * N, h1 * N)
            _v7_heads(
                (r[bi], k[bi], v[bi], vfirst[bi], wl[bi], al[bi], vl[bi], g[bi]),
                vecs,
                first,
                eps,
                S_in[bi],
                S_out[bi],
                y[bi],
                h0,
                h1,
            )


@numba.njit(cache=True, nogil=True)
def _v7_heads(tok, vecs, first, eps, S, S_out, y, h0, h1):
    """Heads h0 .. h1 of one sequence's v7 recurrence (see _v7_core; ``tok``: the sequence's
    rows)."""
    r, k, v, vfirst, wl, al, vl, g = tok
    w0, a0, v0, k_k, k_a, r_k, lnw, lnb = vecs
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
        rh = r[b : b + N]
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
def _v7_block(x, delta, state, v_first, layer, first, eps, threads):
    """One whole v7 block in one call (:func:`layer`'s steps, no Python between them):
    x (B, C) += delta, time mix, channel mix; returns the channel mix's output (B, C).
    state: (att_prev, ffn_prev, wkv_prev, att_new, ffn_new, wkv_new), the layer's rows of the
    states read and written; layer: a V7Layer with its products' numba specs (receptance,
    key, value, output, ffn key, ffn value: kernels.linear.row_product); first: layer 0 (sets
    v_first, the value residual); eps: (layer norm, group norm); threads: numba's threads
    for the products (set by the caller; 1: serial)."""
    att_prev, ffn_prev, wkv_prev, att_new, ffn_new, wkv_new = state
    mix, fmix, lora, lora_kind = layer.mix, layer.fmix, layer.lora, layer.lora_kind
    vecs, prods, n_ffn = layer.vecs, layer.prods, layer.n_ffn
    B, C = x.shape
    ln1w, ln1b, ln2w, ln2b = layer.ln
    w1, w2, a1, a2, v1, v2, g1, g2 = lora
    A = vecs[0].shape[0]
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
        _v7_time_par(
            (r, k, v, v_first, wl, al, vl, g),
            parts,
            hid[2].shape[1] > 0,
            vecs,
            first,
            eps[1],
            wkv_prev,
            wkv_new,
            y,
            threads,
        )
    else:
        _v7_loras((mn[1], mn[4], mn[3], mn[5]), lora, lora_kind, (wl, al, vl, g))
        _v7_core((r, k, v, v_first, wl, al, vl, g), vecs, first, eps[1], wkv_prev, wkv_new, y)
    att = _products(prods[3], y, C, threads)
    kn = np.empty((1, B, C), np.float32)
    _mix_in(x, att, ln2w, ln2b, eps[0], ffn_prev, fmix, ffn_new, kn, 0)
    kk = _products(prods[4], kn[0], n_ffn, threads)
    _relu_sq(kk)
    return _products(prods[5], kk, C, threads)


class V7Layer(NamedTuple):
    """One v7 layer's weights as numpy views (a LoRA matrix copied only where the model holds
    a strided view)."""

    ln: tuple  #: ln1 weight, bias, ln2 weight, bias
    mix: np.ndarray  #: (6, C): the token-shift mixes x_r, x_w, x_k, x_v, x_a, x_g
    fmix: np.ndarray  #: (1, C): the channel mix's x_k
    #: w1, w2, a1, a2, v1, v2, g1, g2: the first matrices as their columns, the second as
    #: their rows, in bytes (glue._cols_bytes, _rows_bytes); layer 0 has no v1, v2 (empty)
    lora: tuple
    lora_kind: int  #: the LoRAs' float format (kernels.kinds.Kind)
    vecs: tuple  #: w0, a0, v0 (layer 0: unused), k_k, k_a, r_k, ln_x weight, bias
    #: the numba specs of the block's products (:func:`products`; set by :func:`block`)
    prods: tuple = ()
    n_ffn: int = 0  #: the channel mix's hidden size


def products(cfg) -> tuple:
    """The block's matrix products, in the order of _v7_block's specs."""
    return ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")


def pack(w, i, cfg) -> V7Layer:
    """Layer i's weights from the model's weight dict ``w``."""
    a, f = f"blocks.{i}.att.", f"blocks.{i}.ffn."
    ln = tuple(
        _np(w[f"blocks.{i}.{n}"]) for n in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias")
    )
    mix = _np(torch.stack([w[a + "x_" + n] for n in "rwkvag"]))
    fmix = _np(w[f + "x_k"].reshape(1, -1))
    lora, kind = _low_rank(
        [
            w[a + n] if (i > 0 or n[0] != "v") else None
            for n in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")
        ]
    )
    lora = tuple(
        np.zeros((0, 1), np.uint8) if t is None else (_rows_bytes if j % 2 else _cols_bytes)(t)
        for j, t in enumerate(lora)
    )  # layer 0: no value residual LoRA
    vecs = tuple(
        [_np(w[a + n]) for n in ("w0", "a0")]
        + [_np(w[a + "v0"]) if i > 0 else np.zeros(1, np.float32)]
        + [_np(w[a + n]) for n in ("k_k", "k_a", "r_k", "ln_x.weight", "ln_x.bias")]
    )
    return V7Layer(ln, mix, fmix, lora, kind, vecs)


def block(layer: V7Layer, specs: tuple, cfg, i: int) -> tuple:
    """(the block kernel, its arguments after the state and v_first)."""
    return _v7_block, (layer._replace(prods=specs, n_ffn=cfg.n_ffn), i == 0)


def layer(step, i, xn, delta, io, ctx):
    """One v7 block step by step (the products through Linear.np_mm): x (numpy view, updated
    in place) += delta, then time mix and channel mix; returns the channel mix's output
    (added by the next block)."""
    cfg, d = step.cfg, step.layers[i]
    (att_in, ffn_in, wkv_in), (ao, fo, so) = io
    B, C, A = ctx["B"], cfg.n_embd, cfg.n_att
    a, f = f"blocks.{i}.att.", f"blocks.{i}.ffn."
    ln1w, ln1b, ln2w, ln2b = d.ln
    ln_eps = np.float32(cfg.layer_norm_eps)
    mn = step.scratch(ctx, "mixed", (6, B, C))
    _mix_in(xn, delta, ln1w, ln1b, ln_eps, att_in[i], d.mix, ao[i], mn, 0)
    mm = step.np_mm
    r = mm(mn[0], a + "receptance.weight")
    k = mm(mn[2], a + "key.weight")
    v = mm(mn[3], a + "value.weight")
    wl, al, vl, g = (step.scratch(ctx, n, (B, A)) for n in ("wl", "al", "vl", "g"))
    _v7_loras((mn[1], mn[4], mn[3], mn[5]), d.lora, d.lora_kind, (wl, al, vl, g))
    y = np.empty((B, A), np.float32)
    _v7_core(
        (r, k, v, step.scratch(ctx, "v_first", (B, A)), wl, al, vl, g),
        d.vecs,
        i == 0,
        np.float32(cfg.ln_x_eps),
        wkv_in[i],
        so[i],
        y,
    )
    att = mm(y, a + "output.weight")
    kn = step.scratch(ctx, "fmixed", (1, B, C))
    _mix_in(xn, att, ln2w, ln2b, ln_eps, ffn_in[i], d.fmix, fo[i], kn, 0)
    kk = mm(kn[0], f + "key.weight")
    _relu_sq(kk)
    return mm(kk, f + "value.weight")
