"""RWKV-5's fast decode (5.0 without the gate, 5.2 with it): one layer's weights as the kernels
take them (:class:`V5Layer`), the whole block as one numba call (:func:`_v5_block`), the same
block step by step from Python (:func:`layer`), and the multi-head recurrence that v6 shares
(:func:`_v5_core`). The channel mix is v4's. The math is that of models/v5.py.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
import torch
import torch.nn.functional as F

from ...config import Version
from . import v4
from .glue import _mix_in, _norm_stats, _np, _products, _silu_gate
from .v4 import _channel_mix_v4


@numba.njit(cache=True, nogil=True)
def _v5_block(x, delta, state, layer, eps, threads):
    """One whole v5 block (see v7._v7_block; 5.2: with the gate, prods[7], when mix has 4
    rows); layer: a V5Layer with its products' specs."""
    att_prev, ffn_prev, S_prev, att_new, ffn_new, S_new = state
    ln, mix, w, u, lnx, prods = (
        layer.ln,
        layer.mix,
        layer.decay,
        layer.bonus,
        layer.lnx,
        layer.prods,
    )
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
    return _channel_mix_v4(x, att, layer, eps[0], ffn_prev, ffn_new, 1, threads)


@numba.njit(cache=True, nogil=True)
def _v5_core(r, k, v, w, u, lnw, lnb, eps, S_in, S_out, y):
    """v5/v6 time mix for one token of each of B sequences: out = r (u k^T v + S),
    S = k^T v + w S, then group norm.

    r, k, v (B, C); w (B, C) or (1, C) decay, u (C,) bonus per channel; S_in (B, H, N, N)
    (key, value) read, S_out receives the new state (may be S_in); y (B, C).
    """
    for bi in range(S_in.shape[0]):
        _v5_one(
            r[bi],
            k[bi],
            v[bi],
            w[bi if w.shape[0] > 1 else 0],
            u,
            lnw,
            lnb,
            eps,
            S_in[bi],
            S_out[bi],
            y[bi],
        )


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


class V5Layer(NamedTuple):
    """One v5 layer's weights as numpy views."""

    ln: tuple  #: ln1 weight, bias, ln2 weight, bias
    mix: np.ndarray  #: (3 or 4, C): time_mix_r, _k, _v (and _g in 5.2)
    fmix: np.ndarray  #: (2, C): the channel mix's time_mix_k, _r
    decay: np.ndarray  #: (1, C) the per-channel decay w
    bonus: np.ndarray  #: (C,) the bonus u of the current token
    lnx: tuple  #: the group norm's weight, bias
    #: the numba specs of the block's products (:func:`products`; set by :func:`block`)
    prods: tuple = ()
    n_ffn: int = 0  #: the channel mix's hidden size


def products(cfg) -> tuple:
    """The block's matrix products, in the order of _v5_block's specs (5.2: and the gate)."""
    return v4.products(cfg) + (("att.gate",) if cfg.version is Version.V5_2 else ())


def pack(w, i, cfg) -> V5Layer:
    """Layer i's weights from the model's weight dict ``w``."""
    a, f = f"blocks.{i}.att.", f"blocks.{i}.ffn."
    names = "rkv" + ("g" if cfg.version is Version.V5_2 else "")
    return V5Layer(
        v4.layer_norms(w, i),
        _np(torch.stack([w[a + "time_mix_" + n] for n in names])),
        _np(torch.stack([w[f + "time_mix_k"], w[f + "time_mix_r"]])),
        _np(w[a + "decay"].reshape(1, -1).contiguous()),
        _np(w[a + "bonus"].reshape(-1).contiguous()),
        (_np(w[a + "ln_x.weight"]), _np(w[a + "ln_x.bias"])),
    )


def block(layer: V5Layer, specs: tuple, cfg, i: int) -> tuple:
    """(the block kernel, its arguments after the state). 5.0 has no gate: a placeholder
    spec for _v5_block's unused prods[7]."""
    if cfg.version is Version.V5_0:
        specs += specs[:1]
    return _v5_block, (layer._replace(prods=specs, n_ffn=cfg.n_ffn),)


def layer(step, i, xn, delta, io, ctx):
    """One v5 block step by step (the products through Linear.np_mm; 5.2's SiLU gate a small
    torch op): x (numpy view, updated in place) += delta, then time mix and channel mix;
    returns the block's output."""
    cfg, d = step.cfg, step.layers[i]
    (att_in, ffn_in, wkv_in), (ao, fo, so) = io
    B, C = ctx["B"], cfg.n_embd
    a = f"blocks.{i}.att."
    mn = step.scratch(ctx, "mixed", (d.mix.shape[0], B, C))
    _mix_in(
        xn, delta, d.ln[0], d.ln[1], np.float32(cfg.layer_norm_eps), att_in[i], d.mix, ao[i], mn, 1
    )
    y = np.empty((B, cfg.n_att), np.float32)
    r = step.np_mm(mn[0], a + "receptance.weight")
    k = step.np_mm(mn[1], a + "key.weight")
    v = step.np_mm(mn[2], a + "value.weight")
    _v5_core(
        r, k, v, d.decay, d.bonus, d.lnx[0], d.lnx[1], np.float32(cfg.ln_x_eps), wkv_in[i], so[i], y
    )
    if cfg.version is Version.V5_2:
        y = _np(
            torch.from_numpy(y) * F.silu(torch.from_numpy(step.np_mm(mn[3], a + "gate.weight")))
        )
    return v4.channel_mix_steps(step, i, xn, y, io, ctx, 1)
