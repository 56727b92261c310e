"""RWKV-4 (Peng et al. 2023, "RWKV: Reinventing RNNs for the Transformer Era").

Time mix, per channel c, with w = -exp(time_decay) < 0 and u = time_first:

    wkv_t = (sum_{i<t} e^{(t-1-i) w + k_i} v_i + e^{u + k_t} v_t)
            / (sum_{i<t} e^{(t-1-i) w + k_i}       + e^{u + k_t})

kept as numerator aa, denominator bb and a shared exponent pp so nothing overflows.
"""

from __future__ import annotations

import torch

from .base import RWKVBase


def wkv4(k, v, decay, u, S):
    """The v4 WKV, one token at a time, with the running exponent pp that keeps exp() in range.

    k, v (T, A); decay = -exp(time_decay), u = time_first (A,); S (3, A) = numerator aa,
    denominator bb, exponent pp. Returns out (T, A) and the final S.
    """
    aa, bb, pp = S[0], S[1], S[2]  # (A,) each
    out = torch.empty_like(k)
    for t in range(k.shape[0]):
        kt, vt = k[t], v[t]
        ww = u + kt
        p = torch.maximum(pp, ww)
        e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
        out[t] = (e1 * aa + e2 * vt) / (e1 * bb + e2)
        ww = decay + pp
        p = torch.maximum(ww, kt)
        e1, e2 = torch.exp(ww - p), torch.exp(kt - p)
        aa, bb, pp = e1 * aa + e2 * vt, e1 * bb + e2, p
    return out, torch.stack([aa, bb, pp])


class RWKV4(RWKVBase):
    def layer_shapes(self, i, p, weights):
        C, A, F = self.cfg.n_embd, self.cfg.n_att, self.cfg.n_ffn
        a, f = p + "att.", p + "ffn."
        return {
            a + "time_mix_k": (C,),
            a + "time_mix_v": (C,),
            a + "time_mix_r": (C,),
            a + "time_decay": (A,),
            a + "time_first": (A,),
            a + "key.weight": (A, C),
            a + "value.weight": (A, C),
            a + "receptance.weight": (A, C),
            a + "output.weight": (C, A),
            f + "time_mix_k": (C,),
            f + "time_mix_r": (C,),
            f + "key.weight": (F, C),
            f + "value.weight": (C, F),
            f + "receptance.weight": (C, C),
        }

    def prepare(self):
        for i in range(self.cfg.n_layer):
            self.w[f"blocks.{i}.att.decay"] = -torch.exp(self.w[f"blocks.{i}.att.time_decay"])

    def product_groups(self, i):
        a = f"blocks.{i}.att."
        return (tuple(a + n + ".weight" for n in ("key", "value", "receptance")),), ()

    def time_mix(self, i, x, att_x, wkv, ctx):
        w = self.w
        a = f"blocks.{i}.att."
        sx = self.shift(x, att_x)  # (T, C)
        mk, mv, mr = w[a + "time_mix_k"], w[a + "time_mix_v"], w[a + "time_mix_r"]
        (names,), _ = self.product_groups(i)
        k, v, r = self.mm_group(tuple(x * m + sx * (1 - m) for m in (mk, mv, mr)), names)  # (T, A)
        r = torch.sigmoid(r)
        decay, u = w[a + "decay"], w[a + "time_first"]  # (A,)
        fast = self.backend.wkv4
        out, S = (fast if fast is not None and x.shape[0] > 1 else wkv4)(k, v, decay, u, wkv)
        return self.mm(r * out, a + "output.weight"), S

    def channel_mix(self, i, x, ffn_x):
        w = self.w
        f = f"blocks.{i}.ffn."
        sx = self.shift(x, ffn_x)
        mk, mr = w[f + "time_mix_k"], w[f + "time_mix_r"]
        k = torch.relu(self.mm(x * mk + sx * (1 - mk), f + "key.weight")) ** 2  # (T, F)
        r = torch.sigmoid(self.mm(x * mr + sx * (1 - mr), f + "receptance.weight"))
        return r * self.mm(k, f + "value.weight")
