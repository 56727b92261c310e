"""RWKV-5 "Eagle" (Peng et al. 2024, "Eagle and Finch"): matrix-valued state per head.

Per head (N = head size), with decay w in (0, 1) and bonus u:

    out_t = r_t (u * k_t^T v_t + S_{t-1})        S_t = k_t^T v_t + w * S_{t-1}

S is (N_k, N_v); w and u act along the key index. v5.0 has one decay and one bonus per head
(u = exp(time_first)) and no gate; v5.2 has them per channel (u = time_faaaa) and a SiLU gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import Version
from .base import RWKVBase
from .v4 import RWKV4


def wkv_heads(r, k, v, w, u, S):
    """The v5/v6 recurrence, one token at a time.

    r, k, v (T, H, N); w (T, H, N) or (H, N) decay in (0, 1); u (H, N); S (H, N_k, N_v).
    Returns out (T, H, N_v) and the final S.
    """
    T = r.shape[0]
    out = torch.empty_like(v)
    for t in range(T):
        kv = k[t].unsqueeze(-1) * v[t].unsqueeze(-2)  # (H, N, N)
        out[t] = (r[t].unsqueeze(-1) * (u.unsqueeze(-1) * kv + S)).sum(-2)  # r (u kv + S)
        wt = w[t] if w.dim() == 3 else w
        S = kv + wt.unsqueeze(-1) * S
    return out, S


class RWKV5(RWKVBase):
    def wkv5(self, r, k, v, w, u, S):
        fast = self.backend.wkv5
        return (
            fast(r, k, v, w, u, S)
            if fast is not None and r.shape[0] > 1
            else wkv_heads(r, k, v, w, u, S)
        )

    def layer_shapes(self, i, p, weights):
        cfg = self.cfg
        C, A, F_, H, N = cfg.n_embd, cfg.n_att, cfg.n_ffn, cfg.n_head, cfg.head_size
        a, f = p + "att.", p + "ffn."
        s = {
            a + "time_mix_k": (C,),
            a + "time_mix_v": (C,),
            a + "time_mix_r": (C,),
            a + "key.weight": (A, C),
            a + "value.weight": (A, C),
            a + "receptance.weight": (A, C),
            a + "output.weight": (C, A),
            a + "ln_x.weight": (A,),
            a + "ln_x.bias": (A,),
            f + "time_mix_k": (C,),
            f + "time_mix_r": (C,),
            f + "key.weight": (F_, C),
            f + "value.weight": (C, F_),
            f + "receptance.weight": (C, C),
        }
        if cfg.version is Version.V5_0:
            s.update({a + "time_decay": (H,), a + "time_first": (H,)})
        else:
            s.update(
                {
                    a + "time_decay": (H, N),
                    a + "time_faaaa": (H, N),
                    a + "time_mix_g": (C,),
                    a + "gate.weight": (A, C),
                }
            )
        return s

    def prepare(self):
        H, N = self.cfg.n_head, self.cfg.head_size
        for i in range(self.cfg.n_layer):
            a = f"blocks.{i}.att."
            decay = torch.exp(-torch.exp(self.w[a + "time_decay"]))
            if self.cfg.version is Version.V5_0:
                bonus = torch.exp(self.w[a + "time_first"])
                decay, bonus = decay.reshape(H, 1).expand(H, N), bonus.reshape(H, 1).expand(H, N)
            else:
                bonus = self.w[a + "time_faaaa"]
            self.w[a + "decay"], self.w[a + "bonus"] = decay, bonus

    def product_groups(self, i):
        a = f"blocks.{i}.att."
        names = ("receptance", "key", "value") + (
            ("gate",) if self.cfg.version is not Version.V5_0 else ()
        )
        return (tuple(a + n + ".weight" for n in names),), ()

    def time_mix(self, i, x, att_x, wkv, ctx):
        w, H, N = self.w, self.cfg.n_head, self.cfg.head_size
        a = f"blocks.{i}.att."
        T = x.shape[0]
        sx = self.shift(x, att_x)

        def mix(name):
            m = w[a + "time_mix_" + name]
            return x * m + sx * (1 - m)

        (names,), _ = self.product_groups(i)
        r, k, v, *g = self.mm_group(tuple(mix(n) for n in "rkvg"[: len(names)]), names)  # (T, A)
        r, k, v = r.view(T, H, N), k.view(T, H, N), v.view(T, H, N)
        out, S = self.wkv5(r, k, v, w[a + "decay"], w[a + "bonus"], wkv)
        out = self.group_norm(out.reshape(T, H * N), a + "ln_x")
        if g:  # 5.2's gate
            out = out * F.silu(g[0])
        return self.mm(out, a + "output.weight"), S

    channel_mix = RWKV4.channel_mix  # v5 keeps v4's channel mix
