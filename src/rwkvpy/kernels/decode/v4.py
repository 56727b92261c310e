"""RWKV-4's fast decode: one layer's weights as the kernels take them (:class:`V4Layer`), the
whole block as one numba call (:func:`_v4_block`), the same block step by step from Python
(:func:`layer`), and the channel mix that v5 and v6 share with v4 (:func:`_channel_mix_v4`,
:func:`channel_mix_steps`). The math is that of models/v4.py.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
import torch

from ..wkv import wkv4_step
from .glue import _mix_in, _np, _products, _relu_sq, _sigmoid


@numba.njit(cache=True, nogil=True)
def _channel_mix_v4(x, att, layer, eps, ffn_prev, ffn_new, kind, threads):
    """v4/v5/v6 channel mix of a whole block: x += att, then sigmoid(x_r W_r) * W_v
    relu(x_k W_k)^2 (layer.prods[4:7]: ffn key, receptance, value); ``layer`` a V4Layer,
    V5Layer or V6Layer with its products' specs."""
    prods, n_ffn = layer.prods, layer.n_ffn
    B, C = x.shape
    fn = np.empty((2, B, C), np.float32)
    _mix_in(x, att, layer.ln[2], layer.ln[3], eps, ffn_prev, layer.fmix, ffn_new, fn, kind)
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
def _v4_block(x, delta, state, layer, eps, threads):
    """One whole v4 block in one call (:func:`layer`'s steps; see v7._v7_block). layer: a
    V4Layer with the specs of receptance, key, value, output, ffn key, ffn receptance, ffn
    value."""
    att_prev, ffn_prev, S_prev, att_new, ffn_new, S_new = state
    ln, mix, decay, u, prods = layer.ln, layer.mix, layer.decay, layer.first, layer.prods
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
    return _channel_mix_v4(x, att, layer, eps[0], ffn_prev, ffn_new, 1, threads)


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
        out, S_out[0, c], S_out[1, c], S_out[2, c] = wkv4_step(
            k[c], v[c], S[0, c], S[1, c], S[2, c], decay[c], u[c]
        )
        y[c] = r[c] * out


class V4Layer(NamedTuple):
    """One v4 layer's weights as numpy views."""

    ln: tuple  #: ln1 weight, bias, ln2 weight, bias
    mix: np.ndarray  #: (3, C): time_mix_r, _k, _v
    fmix: np.ndarray  #: (2, C): the channel mix's time_mix_k, _r
    decay: np.ndarray  #: (C,) the WKV decay, as the model holds it
    first: np.ndarray  #: (C,) the WKV bonus of the current token (time_first)
    #: the numba specs of the block's products (:func:`products`; set by :func:`block`)
    prods: tuple = ()
    n_ffn: int = 0  #: the channel mix's hidden size


def layer_norms(w, i) -> tuple:
    """Layer i's ln1 weight, bias, ln2 weight, bias (every version)."""
    return tuple(
        _np(w[f"blocks.{i}.{n}"]) for n in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias")
    )


def products(cfg) -> tuple:
    """The block's matrix products, in the order of _v4_block's specs."""
    return (
        "att.receptance",
        "att.key",
        "att.value",
        "att.output",
        "ffn.key",
        "ffn.receptance",
        "ffn.value",
    )


def pack(w, i, cfg) -> V4Layer:
    """Layer i's weights from the model's weight dict ``w`` (token shifts as x*m + prev*(1-m)
    = prev + (x - prev)*m)."""
    a, f = f"blocks.{i}.att.", f"blocks.{i}.ffn."
    return V4Layer(
        layer_norms(w, i),
        _np(torch.stack([w[a + "time_mix_" + n] for n in "rkv"])),
        _np(torch.stack([w[f + "time_mix_k"], w[f + "time_mix_r"]])),
        _np(w[a + "decay"]),
        _np(w[a + "time_first"]),
    )


def block(layer: V4Layer, specs: tuple, cfg, i: int) -> tuple:
    """(the block kernel, its arguments after the state)."""
    return _v4_block, (layer._replace(prods=specs, n_ffn=cfg.n_ffn),)


def channel_mix_steps(step, i, xn, y, io, ctx, kind):
    """The end of a v4/v5/v6 block step by step: the time mix's output product of ``y``, then
    the channel mix (``kind`` as in glue._mix_in); returns the block's output."""
    (att_in, ffn_in, wkv_in), (ao, fo, so) = io
    cfg, d = step.cfg, step.layers[i]
    a, f = f"blocks.{i}.att.", f"blocks.{i}.ffn."
    y = np.ascontiguousarray(_np(y) if isinstance(y, torch.Tensor) else y)
    att = step.np_mm(y, a + "output.weight")
    fn = step.scratch(ctx, "fmixed", (2, ctx["B"], cfg.n_embd))
    _mix_in(
        xn,
        att,
        d.ln[2],
        d.ln[3],
        np.float32(cfg.layer_norm_eps),
        ffn_in[i],
        d.fmix,
        fo[i],
        fn,
        kind,
    )
    kk = step.np_mm(fn[0], f + "key.weight")
    _relu_sq(kk)
    rr = step.np_mm(fn[1], f + "receptance.weight")
    _sigmoid(rr)
    vv = step.np_mm(kk, f + "value.weight")
    vv *= rr
    return vv


def layer(step, i, xn, delta, io, ctx):
    """One v4 block step by step (the products through Linear.np_mm): x (numpy view, updated
    in place) += delta, then time mix and channel mix; returns the block's output."""
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
    _sigmoid(r)
    _v4_core(r, k, v, d.decay, d.first, wkv_in[i], so[i], y)
    return channel_mix_steps(step, i, xn, y, io, ctx, 1)
