"""RWKV-6 "Finch" (Peng et al. 2024, "Eagle and Finch"): data-dependent token shift and decay.

The token shift mixes x with the previous token through a LoRA (ddlerp):

    xxx = x + (x_prev - x) * maa_x
    m_w, m_k, m_v, m_r, m_g = tanh(xxx W1) W2          (5 LoRAs sharing W1)
    x_s = x + (x_prev - x) * (maa_s + m_s)

and the decay is per token: w_t = exp(-exp(time_decay + tanh(x_w D1) D2)). The recurrence is
v5's (see v5.wkv_heads) with u = time_faaaa, then group norm and a SiLU gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import RWKVBase, lora_rank
from .v5 import RWKV5


class RWKV6(RWKVBase):
    wkv5 = RWKV5.wkv5  # v6 runs v5's recurrence with a per-token decay
    LOW_RANK = tuple(
        f"att.{n}" for n in ("time_maa_w1", "time_maa_w2", "time_decay_w1", "time_decay_w2")
    )
    LOW_RANK_COLUMNS = ("att.time_maa_w1", "att.time_decay_w1")

    def layer_shapes(self, i, p, weights):
        cfg = self.cfg
        C, A, F_, H, N = cfg.n_embd, cfg.n_att, cfg.n_ffn, cfg.n_head, cfg.head_size
        a, f = p + "att.", p + "ffn."
        rm = lora_rank(weights, a + "time_maa_w1", 5)  # five mixes' ranks side by side
        rd = lora_rank(weights, a + "time_decay_w1")
        s = {a + f"time_maa_{n}": (C,) for n in "xwkvrg"}
        s.update(
            {
                a + "time_maa_w1": (C, None if rm is None else 5 * rm),
                a + "time_maa_w2": (5, rm, C),
                a + "time_decay": (A,),
                a + "time_decay_w1": (C, rd),
                a + "time_decay_w2": (rd, A),
                a + "time_faaaa": (H, N),
                a + "key.weight": (A, C),
                a + "value.weight": (A, C),
                a + "receptance.weight": (A, C),
                a + "gate.weight": (A, C),
                a + "output.weight": (C, A),
                a + "ln_x.weight": (A,),
                a + "ln_x.bias": (A,),
                f + "time_maa_k": (C,),
                f + "time_maa_r": (C,),
                f + "key.weight": (F_, C),
                f + "value.weight": (C, F_),
                f + "receptance.weight": (C, C),
            }
        )
        return s

    def product_groups(self, i):
        a = f"blocks.{i}.att."
        return (tuple(a + n + ".weight" for n in ("receptance", "key", "value", "gate")),), ()

    def time_mix(self, i, x, att_x, wkv, ctx):
        w, H, N = self.w, self.cfg.n_head, self.cfg.head_size
        a = f"blocks.{i}.att."
        T = x.shape[0]
        dx = self.shift(x, att_x) - x  # (T, C)
        xxx = x + dx * w[a + "time_maa_x"]
        lr = self.f32  # the low-rank matrices as float32
        w1, w2 = lr(a + "time_maa_w1"), lr(a + "time_maa_w2")  # (C, 5D), (5, D, C)
        lora = torch.tanh(xxx @ w1).view(T, 5, -1).transpose(0, 1)  # (5, T, D)
        mw, mk, mv, mr, mg = torch.bmm(lora, w2)  # 5 x (T, C)
        xw = x + dx * (w[a + "time_maa_w"] + mw)
        xk = x + dx * (w[a + "time_maa_k"] + mk)
        xv = x + dx * (w[a + "time_maa_v"] + mv)
        xr = x + dx * (w[a + "time_maa_r"] + mr)
        xg = x + dx * (w[a + "time_maa_g"] + mg)

        (names,), _ = self.product_groups(i)
        r, k, v, g = self.mm_group((xr, xk, xv, xg), names)  # (T, A) each
        r, k, v, g = r.view(T, H, N), k.view(T, H, N), v.view(T, H, N), F.silu(g)
        d = w[a + "time_decay"] + torch.tanh(xw @ lr(a + "time_decay_w1")) @ lr(a + "time_decay_w2")
        decay = torch.exp(-torch.exp(d)).view(T, H, N)

        out, S = self.wkv5(r, k, v, decay, w[a + "time_faaaa"], wkv)
        out = self.group_norm(out.reshape(T, H * N), a + "ln_x") * g
        return self.mm(out, a + "output.weight"), S

    def channel_mix(self, i, x, ffn_x):
        w = self.w
        f = f"blocks.{i}.ffn."
        dx = self.shift(x, ffn_x) - x
        k = torch.relu(self.mm(x + dx * w[f + "time_maa_k"], f + "key.weight")) ** 2
        r = torch.sigmoid(self.mm(x + dx * w[f + "time_maa_r"], f + "receptance.weight"))
        return r * self.mm(k, f + "value.weight")
