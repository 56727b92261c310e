"""RWKV-6's fast decode: one layer's weights as the kernels take them (:class:`V6Layer`), the
data-dependent token shift and decay (:func:`_v6_mix`), the whole block as one numba call
(:func:`_v6_block`) and step by step from Python (:func:`layer`). The recurrence is v5's, the
channel mix v4's. The math is that of models/v6.py.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np
import torch
import torch.nn.functional as F

from . import v4
from .glue import (
    LORA_PARTS,
    _col_dots,
    _cols_bytes,
    _low_rank,
    _mix_in,
    _np,
    _parts_sum,
    _products,
    _rows_bytes,
    _silu_gate,
    _vexp,
    _vm_parts,
)
from .v4 import _channel_mix_v4
from .v5 import _v5_core


@numba.njit(cache=True, nogil=True)
def _v6_mix(xx, prev, xxx, lora, maa, kind, out, dec, threads):
    """v6's data-dependent token shift and decay for each of B sequences (rows), with
    ``lora`` = (w1, w2, td, dw1, dw2) (V6Layer.lora):
    h = tanh(xxx w1) (5 slices of D), x_j = xx + (prev - xx) * (maa_j + h_j w2[j]) for
    j = w, k, v, r, g into out[j], and dec = exp(-exp(td + tanh(x_w dw1) dw2)) (its exps
    in vector code: _vexp).

    w1 (C, 5D) and dw1 (C, Dd) as their columns (_cols_bytes: _col_dots), w2 (5, D, C) and
    dw2 (Dd, A) as their rows (axpys), ``kind`` as in _vec_mat_part. Each second product sums its
    rows in LORA_PARTS parts, added in order (_parts_sum): on ``threads`` > 1 the parts (and
    the first products' columns) run on numba's threads, the same numbers (docs/kernels.md has
    their speed)."""
    w1, w2, td, dw1, dw2 = lora
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
        _col_dots(xxx[b : b + 1], w1, kind, h2, threads)
        for d in range(h.shape[0]):
            h[d] = np.float32(math.tanh(h[d]))
        _vm_parts(h.reshape(5, D), (w2[0], w2[1], w2[2], w2[3], w2[4]), kind, pm, threads)
        for j in range(5):
            _parts_sum(pm[j], m)
            for c in range(C):
                out[j, b, c] = xx[b, c] + (prev[b, c] - xx[b, c]) * (maa[j, c] + m[c])
        _col_dots(out[0, b : b + 1], dw1, kind, hd, threads)
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
def _v6_block(x, delta, state, layer, eps, threads):
    """One whole v6 block (see v7._v7_block): the data-dependent mixes and decay (_v6_mix),
    r/k/v/g, the v5 recurrence, the SiLU gate (prods[7]), output, channel mix; layer: a
    V6Layer with its products' specs."""
    att_prev, ffn_prev, S_prev, att_new, ffn_new, S_new = state
    ln, mix, u, lnx, prods = layer.ln, layer.mix, layer.bonus, layer.lnx, layer.prods
    B, C = x.shape
    A = u.shape[0]
    mn = np.empty((1, B, C), np.float32)
    _mix_in(x, delta, ln[0], ln[1], eps[0], att_prev, mix, att_new, mn, 0)
    x5 = np.empty((5, B, C), np.float32)
    dec = np.empty((B, A), np.float32)
    _v6_mix(att_new, att_prev, mn[0], layer.lora, layer.maa, layer.lora_kind, x5, dec, threads)
    r = _products(prods[0], x5[3], A, threads)
    k = _products(prods[1], x5[1], A, threads)
    v = _products(prods[2], x5[2], A, threads)
    g = _products(prods[7], x5[4], A, threads)
    y = np.empty((B, A), np.float32)
    _v5_core(r, k, v, dec, u, lnx[0], lnx[1], eps[1], S_prev, S_new, y)
    _silu_gate(y, g)
    att = _products(prods[3], y, C, threads)
    return _channel_mix_v4(x, att, layer, eps[0], ffn_prev, ffn_new, 0, threads)


class V6Layer(NamedTuple):
    """One v6 layer's weights as numpy views (a LoRA matrix copied only where the model holds
    a strided view)."""

    ln: tuple  #: ln1 weight, bias, ln2 weight, bias
    mix: np.ndarray  #: (1, C): time_maa_x
    fmix: np.ndarray  #: (2, C): the channel mix's time_maa_k, _r
    maa: np.ndarray  #: (5, C): time_maa_w, _k, _v, _r, _g
    #: maa_w1 (as its columns), maa_w2 (5, D, C bytes), time_decay (float32), decay_w1 (as
    #: its columns), decay_w2 (rows), in bytes (glue._cols_bytes, _rows_bytes)
    lora: tuple
    lora_kind: int  #: the LoRAs' float format (kernels.kinds.Kind)
    bonus: np.ndarray  #: (C,) time_faaaa, the bonus u of the current token
    lnx: tuple  #: the group norm's weight, bias
    #: the numba specs of the block's products (:func:`products`; set by :func:`block`)
    prods: tuple = ()
    n_ffn: int = 0  #: the channel mix's hidden size


def products(cfg) -> tuple:
    """The block's matrix products, in the order of _v6_block's specs."""
    return v4.products(cfg) + ("att.gate",)


def pack(w, i, cfg) -> V6Layer:
    """Layer i's weights from the model's weight dict ``w``."""
    a, f = f"blocks.{i}.att.", f"blocks.{i}.ffn."
    mix = _np(w[a + "time_maa_x"].reshape(1, -1))
    maa = _np(torch.stack([w[a + "time_maa_" + n] for n in "wkvrg"]))
    (w1, w2, dw1, dw2), kind = _low_rank(
        [w[a + "time_" + n] for n in ("maa_w1", "maa_w2", "decay_w1", "decay_w2")]
    )
    lora = (
        _cols_bytes(w1),
        _rows_bytes(w2.reshape(-1, w2.shape[-1])).reshape(w2.shape[0], w2.shape[1], -1),
        _np(w[a + "time_decay"].reshape(-1).float().contiguous()),
        _cols_bytes(dw1),
        _rows_bytes(dw2),
    )
    u = _np(w[a + "time_faaaa"].reshape(-1).contiguous())
    fmix = _np(torch.stack([w[f + "time_maa_k"], w[f + "time_maa_r"]]))
    return V6Layer(
        v4.layer_norms(w, i),
        mix,
        fmix,
        maa,
        lora,
        kind,
        u,
        (_np(w[a + "ln_x.weight"]), _np(w[a + "ln_x.bias"])),
    )


def block(layer: V6Layer, specs: tuple, cfg, i: int) -> tuple:
    """(the block kernel, its arguments after the state)."""
    return _v6_block, (layer._replace(prods=specs, n_ffn=cfg.n_ffn),)


def layer(step, i, xn, delta, io, ctx):
    """One v6 block step by step (the products through Linear.np_mm, the SiLU gate a small
    torch op): x (numpy view, updated in place) += delta, then time mix and channel mix;
    returns the block's output."""
    cfg, d = step.cfg, step.layers[i]
    (att_in, ffn_in, wkv_in), (ao, fo, so) = io
    B, C = ctx["B"], cfg.n_embd
    a = f"blocks.{i}.att."
    mn = step.scratch(ctx, "mixed", (d.mix.shape[0], B, C))
    _mix_in(
        xn, delta, d.ln[0], d.ln[1], np.float32(cfg.layer_norm_eps), att_in[i], d.mix, ao[i], mn, 0
    )
    y = np.empty((B, cfg.n_att), np.float32)
    x5 = step.scratch(ctx, "mixed5", (5, B, C))
    dec = step.scratch(ctx, "decay", (B, cfg.n_att))
    _v6_mix(ao[i], att_in[i], mn[0], d.lora, d.maa, d.lora_kind, x5, dec, 1)
    mm = step.np_mm
    r, k, v = (
        mm(x5[j], a + n)
        for j, n in ((3, "receptance.weight"), (1, "key.weight"), (2, "value.weight"))
    )
    g = F.silu(torch.from_numpy(mm(x5[4], a + "gate.weight")))
    _v5_core(
        r, k, v, dec, d.bonus, d.lnx[0], d.lnx[1], np.float32(cfg.ln_x_eps), wkv_in[i], so[i], y
    )
    y = torch.from_numpy(y) * g
    return v4.channel_mix_steps(step, i, xn, y, io, ctx, 0)
