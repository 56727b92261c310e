"""RWKV-7 "Goose" (Peng et al. 2025): a generalized delta rule with vector-valued decay.

Per head, with state S (N_v, N_k), decay w_t in (0, 1), removal key kk (unit norm) and
in-context learning rate a:

    S_t = S_{t-1} diag(w_t) + S_{t-1} (-kk_t)^T (kk_t * a_t) + v_t^T k_t
    out_t = S_t r_t

followed by group norm, a bonus (r_t . (k_t * r_k)) v_t per head, and the gate g.
Layers after the first blend their value with the first layer's (value residual).
BlinkDL's rwkv_v7_numpy.py demo holds the same math in numpy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import RWKVBase, lora_rank

DECAY_SCALE = math.exp(-0.5)  # w = exp(-e^{-0.5} sigmoid(.)) = exp(-softplus(-.) - 0.5) in log form


def wkv7(r, w, k, v, kk, a, S):
    """The v7 recurrence, one token at a time.

    r, w, k, v, kk, a (T, H, N); S (H, N_v, N_k). Returns out (T, H, N) and the final S.
    """
    out = torch.empty_like(v)
    for t in range(r.shape[0]):
        # matrix-vector products as broadcast-and-sum, outer products as broadcasts: on a GPU,
        # torch.compile fuses these into the step's kernels instead of calling cuBLAS for each
        sk = (S * kk[t].unsqueeze(-2)).sum(-1, keepdim=True)  # S kk (H, N, 1)
        removal = -sk * (kk[t] * a[t]).unsqueeze(-2)  # (H, N, N)
        S = S * w[t].unsqueeze(-2) + removal + v[t].unsqueeze(-1) * k[t].unsqueeze(-2)
        out[t] = (S * r[t].unsqueeze(-2)).sum(-1)  # S r (H, N)
    return out, S


class RWKV7(RWKVBase):
    LOW_RANK = tuple(f"att.{n}" for n in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"))
    LOW_RANK_COLUMNS = ("att.w1", "att.a1", "att.v1", "att.g1")

    def layer_shapes(self, i, p, weights):
        cfg = self.cfg
        C, A, F_, H, N = cfg.n_embd, cfg.n_att, cfg.n_ffn, cfg.n_head, cfg.head_size
        a, f = p + "att.", p + "ffn."
        r = {n: lora_rank(weights, a + n + "1") for n in "wavg"}
        s = {a + f"x_{n}": (C,) for n in "rwkvag"}
        s.update(
            {
                a + "w0": (A,),
                a + "w1": (C, r["w"]),
                a + "w2": (r["w"], A),
                a + "a0": (A,),
                a + "a1": (C, r["a"]),
                a + "a2": (r["a"], A),
                a + "g1": (C, r["g"]),
                a + "g2": (r["g"], A),
                a + "k_k": (A,),
                a + "k_a": (A,),
                a + "r_k": (H, N),
                a + "key.weight": (A, C),
                a + "value.weight": (A, C),
                a + "receptance.weight": (A, C),
                a + "output.weight": (C, A),
                a + "ln_x.weight": (A,),
                a + "ln_x.bias": (A,),
                f + "x_k": (C,),
                f + "key.weight": (F_, C),
                f + "value.weight": (C, F_),
            }
        )
        if i > 0:  # layer 0's value is the value residual itself: v0/v1/v2 unused there
            s.update({a + "v0": (A,), a + "v1": (C, r["v"]), a + "v2": (r["v"], A)})
        return s

    def product_groups(self, i):
        a = f"blocks.{i}.att."
        rkv = tuple(a + n + ".weight" for n in ("receptance", "key", "value"))
        lora = tuple((a + n + "1", a + n + "2") for n in ("w", "a", "g", "v")[: 4 if i else 3])
        return (rkv,), (lora,)

    def time_mix(self, i, x, att_x, wkv, ctx):
        w, H, N = self.w, self.cfg.n_head, self.cfg.head_size
        a = f"blocks.{i}.att."
        T = x.shape[0]
        dx = self.shift(x, att_x) - x  # (T, C)
        xr, xw, xk, xv, xa, xg = (x + dx * w[a + "x_" + n] for n in "rwkvag")

        (rkv,), (lora,) = self.product_groups(i)
        r, k, v = self.mm_group((xr, xk, xv), rkv)  # (T, A) each
        acts = [(xw, torch.tanh), (xa, None), (xg, torch.sigmoid), (xv, None)][: len(lora)]
        d, iclr, g, *vg = self.low_rank(lora, acts)  # tanh(xw @ w1) @ w2, ...
        decay = torch.exp(-DECAY_SCALE * torch.sigmoid(w[a + "w0"] + d))  # (T, A) in (0, 1)
        iclr = torch.sigmoid(w[a + "a0"] + iclr)

        kk = F.normalize((k * w[a + "k_k"]).view(T, H, N), dim=-1, p=2.0).view(T, -1)
        k = k * (1 + (iclr - 1) * w[a + "k_a"])
        if i == 0:
            ctx["v_first"] = v
        else:
            gate = torch.sigmoid(w[a + "v0"] + vg[0])
            v = v + (ctx["v_first"] - v) * gate

        rh, kh, vh = r.view(T, H, N), k.view(T, H, N), v.view(T, H, N)
        wh, kkh, ah = decay.view(T, H, N), kk.view(T, H, N), iclr.view(T, H, N)
        fast = self.backend.wkv7
        out, S = (fast if fast is not None and T > 1 else wkv7)(rh, wh, kh, vh, kkh, ah, wkv)

        out = self.group_norm(out.reshape(T, H * N), a + "ln_x")
        bonus = (rh * kh * w[a + "r_k"]).sum(-1, keepdim=True) * vh  # (T, H, N)
        out = (out + bonus.reshape(T, -1)) * g
        return self.mm(out, a + "output.weight"), S

    def channel_mix(self, i, x, ffn_x):
        w = self.w
        f = f"blocks.{i}.ffn."
        xk = x + (self.shift(x, ffn_x) - x) * w[f + "x_k"]
        return self.mm(torch.relu(self.mm(xk, f + "key.weight")) ** 2, f + "value.weight")
