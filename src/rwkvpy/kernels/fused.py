"""One-token decode with the per-token glue fused into numba kernels.

For T = 1 the matrix-vector products are memory-bound and fast (see kernels.linear); what costs
is everything between them: dozens of tiny torch ops per layer, ~1 us each. Here each version's
recurrence, decay, normalisations and gates run in one serial numba function per layer that
works in place on numpy views of torch tensors (no copies, no second thread pool).

The math is that of models/v4.py ... v7.py; tests/test_kernels_fused.py holds each step to the
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

DECAY_SCALE = math.exp(-0.5)


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
    C = x.shape[0]
    mean = np.float32(0.0)
    for c in range(C):
        mean += x[c]
    mean /= C
    var = np.float32(0.0)
    for c in range(C):
        d = x[c] - mean
        var += d * d
    inv = np.float32(1.0) / np.float32(math.sqrt(var / C + eps))
    for c in range(C):
        out[c] = (x[c] - mean) * inv * w[c] + b[c]


@numba.njit(cache=True, nogil=True)
def _mix_in(x, delta, lnw, lnb, eps, prev, mix, xx, out):
    """The start of a time- or channel-mix block, for each of B sequences (rows):
    x += delta (the previous block's output; skipped when delta has no rows),
    xx = layer_norm(x), and the token-shift mixes out[j] = xx + (prev - xx) * mix[j].

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
                out[j, b, c] = xx[b, c] + (prev[b, c] - xx[b, c]) * mix[j, c]


@numba.njit(cache=True, nogil=True)
def _vec_mat(x, W, out):
    """out (D,) = x (C,) @ W (C, D), one contiguous row of W at a time (an axpy per row:
    vectorized, no reduction across lanes)."""
    for d in range(W.shape[1]):
        out[d] = 0.0
    for c in range(W.shape[0]):
        xc = x[c]
        row = W[c]
        for d in range(W.shape[1]):
            out[d] += xc * row[d]


@numba.njit(cache=True, nogil=True)
def _v7_loras(xw, xa, xv, xg, w1, w2, a1, a2, v1, v2, g1, g2, wl, al, vl, g):
    """The low-rank projections of a v7 time mix, for each of B sequences (rows):
    wl = tanh(xw w1) w2, al = (xa a1) a2, vl = (xv v1) v2 (skipped when v1 has no rows:
    layer 0), g = sigmoid(xg g1) g2."""
    for b in range(xw.shape[0]):
        h = np.empty(w1.shape[1], np.float32)
        _vec_mat(xw[b], w1, h)
        for d in range(h.shape[0]):
            h[d] = np.float32(math.tanh(h[d]))
        _vec_mat(h, w2, wl[b])
        h = np.empty(a1.shape[1], np.float32)
        _vec_mat(xa[b], a1, h)
        _vec_mat(h, a2, al[b])
        if v1.shape[0] > 0:
            h = np.empty(v1.shape[1], np.float32)
            _vec_mat(xv[b], v1, h)
            _vec_mat(h, v2, vl[b])
        h = np.empty(g1.shape[1], np.float32)
        _vec_mat(xg[b], g1, h)
        for d in range(h.shape[0]):
            h[d] = np.float32(1.0) / (np.float32(1.0) + np.float32(math.exp(-h[d])))
        _vec_mat(h, g2, g[b])


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
        _v7_one(r[bi], k[bi], v[bi], vfirst[bi], wl[bi], al[bi], vl[bi], g[bi], first, w0, a0,
                v0, k_k, k_a, r_k, lnw, lnb, eps, S_in[bi], S_out[bi], y[bi])


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def _v7_one(r, k, v, vfirst, wl, al, vl, g, first, w0, a0, v0, k_k, k_a, r_k, lnw, lnb, eps,
            S, S_out, y):
    H, N = S.shape[0], S.shape[1]
    kk = np.empty(N, np.float32)
    kt = np.empty(N, np.float32)
    ka = np.empty(N, np.float32)
    w = np.empty(N, np.float32)
    vv = np.empty(N, np.float32)
    out = np.empty(N, np.float32)
    for h in range(H):
        b = h * N
        ss = np.float32(0.0)
        for j in range(N):
            x = k[b + j] * k_k[b + j]
            kk[j] = x
            ss += x * x
        nrm = max(np.float32(math.sqrt(ss)), np.float32(1e-12))
        for j in range(N):
            c = b + j
            kk[j] = kk[j] / nrm
            a = np.float32(1.0) / (np.float32(1.0) + np.float32(math.exp(-(a0[c] + al[c]))))
            kt[j] = k[c] * (np.float32(1.0) + (a - np.float32(1.0)) * k_a[c])
            ka[j] = kk[j] * a
            sg = np.float32(1.0) / (np.float32(1.0) + np.float32(math.exp(-(w0[c] + wl[c]))))
            w[j] = np.float32(math.exp(-DECAY_SCALE * sg))
            if first:
                vfirst[c] = v[c]
                vv[j] = v[c]
            else:
                gate = np.float32(1.0) / (np.float32(1.0) + np.float32(math.exp(-(v0[c] + vl[c]))))
                vv[j] = v[c] + (vfirst[c] - v[c]) * gate
        for i in range(N):
            sa = np.float32(0.0)
            for j in range(N):
                sa -= S[h, i, j] * kk[j]
            acc = np.float32(0.0)
            vi = vv[i]
            for j in range(N):
                s = S[h, i, j] * w[j] + sa * ka[j] + vi * kt[j]
                S_out[h, i, j] = s
                acc += s * r[b + j]
            out[i] = acc
        mean, inv = _norm_stats(out, eps)
        bonus = np.float32(0.0)
        for j in range(N):
            bonus += r[b + j] * kt[j] * r_k[h, j]
        for i in range(N):
            c = b + i
            y[c] = ((out[i] - mean) * inv * lnw[c] + lnb[c] + bonus * vv[i]) * g[c]


@numba.njit(cache=True, nogil=True)
def _v5_core(r, k, v, w, u, lnw, lnb, eps, S, y):
    """v5/v6 time mix for one token of each of B sequences: out = r (u k^T v + S),
    S = k^T v + w S, then group norm.

    r, k, v (B, C); w (B, C) or (1, C) decay, u (C,) bonus per channel; S (B, H, N, N)
    (key, value), updated in place; y (B, C).
    """
    for bi in range(S.shape[0]):
        _v5_one(r[bi], k[bi], v[bi], w[bi if w.shape[0] > 1 else 0], u, lnw, lnb, eps, S[bi], y[bi])


@numba.njit(cache=True, nogil=True)
def _v5_one(r, k, v, w, u, lnw, lnb, eps, S, y):
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
                S[h, j, i] = kv + wj * S[h, j, i]
        mean, inv = _norm_stats(out, eps)
        for i in range(N):
            y[b + i] = (out[i] - mean) * inv * lnw[b + i] + lnb[b + i]


@numba.njit(cache=True, nogil=True)
def _v4_core(r, k, v, decay, u, aa, bb, pp, y):
    """v4 WKV for one token of each of B sequences (all (B, C)), with the numerically safe
    exponent pp; aa, bb, pp updated in place."""
    for bi in range(k.shape[0]):
        _v4_one(r[bi], k[bi], v[bi], decay, u, aa[bi], bb[bi], pp[bi], y[bi])


@numba.njit(cache=True, nogil=True)
def _v4_one(r, k, v, decay, u, aa, bb, pp, y):
    for c in range(k.shape[0]):
        kc, vc = k[c], v[c]
        ww = u[c] + kc
        p = max(pp[c], ww)
        e1 = np.float32(math.exp(pp[c] - p))
        e2 = np.float32(math.exp(ww - p))
        y[c] = r[c] * (e1 * aa[c] + e2 * vc) / (e1 * bb[c] + e2)
        ww = decay[c] + pp[c]
        p = max(ww, kc)
        e1 = np.float32(math.exp(ww - p))
        e2 = np.float32(math.exp(kc - p))
        aa[c] = e1 * aa[c] + e2 * vc
        bb[c] = e1 * bb[c] + e2
        pp[c] = p


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


class FusedStep:
    """Runs one token through a built model (models.vX instance) with fused glue.

    Holds no weights of its own beyond small per-layer views/stacks of the model's vectors.
    """

    def __init__(self, net):
        self.net = net
        self.cfg = net.cfg
        w, L = net.w, net.cfg.n_layer
        self.layers = []
        v = self.cfg.version
        for i in range(L):
            a, f = f"blocks.{i}.att.", f"blocks.{i}.ffn."
            d = {}
            if v is Version.V7:
                d["mix"] = _np(torch.stack([w[a + "x_" + n] for n in "rwkvag"]))    # (6, C)
                d["fmix"] = _np(w[f + "x_k"].reshape(1, -1))                        # (1, C)
                d["ln"] = [_np(w[f"blocks.{i}.{n}"]) for n in
                           ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias")]
                none = np.zeros((0, 1), np.float32)  # layer 0 has no value residual LoRA
                d["lora"] = [none if n[0] == "v" and i == 0 else
                             _np(w[a + n].to(torch.float32).contiguous())
                             for n in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")]
                d["np"] = [_np(w[a + n]) for n in ("w0", "a0")] + [
                    _np(w[a + "v0"]) if i > 0 else np.zeros(1, np.float32)] + [
                    _np(w[a + n]) for n in ("k_k", "k_a", "r_k", "ln_x.weight", "ln_x.bias")]
            elif v is Version.V6:
                d["maa"] = torch.stack([w[a + "time_maa_" + n] for n in "wkvrg"])  # (5, C)
                d["u"] = _np(w[a + "time_faaaa"].reshape(-1).contiguous())
            elif v in (Version.V5_0, Version.V5_2):
                names = "rkv" + ("g" if v is Version.V5_2 else "")
                d["mix"] = torch.stack([w[a + "time_mix_" + n] for n in names])
                d["w"] = _np(w[a + "decay"].reshape(1, -1).contiguous())
                d["u"] = _np(w[a + "bonus"].reshape(-1).contiguous())
            else:
                d["mix"] = torch.stack([w[a + "time_mix_" + n] for n in "rkv"])
            if v is Version.V4 or v in (Version.V5_0, Version.V5_2):
                d["fmix"] = torch.stack([w[f + "time_mix_k"], w[f + "time_mix_r"]])
            self.layers.append(d)

    def __call__(self, token: int, state: State):
        """One token from one state: returns (logits (V,), new State)."""
        logits, (new,) = self.batch([token], [state])
        return logits[0], new

    def batch(self, tokens: list, states: list):
        """One token for each of B independent sequences, in one pass over the weights.

        Returns (logits (B, V), list of B new States). The given states are unchanged.
        """
        if self.cfg.version is Version.V7:
            return self._batch_v7(tokens, states)
        net, cfg, w = self.net, self.cfg, self.net.w
        att_x = torch.stack([s.att_x for s in states], 1)  # (L, B, C) fresh copies
        ffn_x = torch.stack([s.ffn_x for s in states], 1)
        wkv = torch.stack([s.wkv for s in states], 1)      # (L, B, ...)
        x = net.ln(w["emb.weight"][torch.as_tensor(tokens)].float(), "blocks.0.ln0")  # (B, C)
        ctx = {}
        tm = {Version.V6: self._tm_v6, Version.V4: self._tm_v4}.get(
            cfg.version, self._tm_v5)
        for i in range(cfg.n_layer):
            p = f"blocks.{i}."
            xx = net.ln(x, p + "ln1")
            x = x + tm(i, xx, att_x[i], wkv[i], ctx)
            att_x[i] = xx
            xx = net.ln(x, p + "ln2")
            x = x + self._cm(i, xx, ffn_x[i])
            ffn_x[i] = xx
        x = net.ln(x, "ln_out")
        return net.head(x), [State(s.version, att_x[:, b].clone(), ffn_x[:, b].clone(), wkv[:, b].clone(),
                         s.n_tokens + 1) for b, s in enumerate(states)]

    # -- channel mix -----------------------------------------------------------------------------
    def _cm(self, i, xx, prev):
        net, w, v = self.net, self.net.w, self.cfg.version
        f = f"blocks.{i}.ffn."
        dx = prev - xx
        if v is Version.V7:
            k = torch.relu(net.mm(xx + dx * w[f + "x_k"], f + "key.weight"))
            return net.mm(k * k, f + "value.weight")
        if v is Version.V6:
            xk, xr = xx + dx * w[f + "time_maa_k"], xx + dx * w[f + "time_maa_r"]
        else:  # v4/v5: x*m + prev*(1-m) = prev + (x - prev)*m
            fmix = self.layers[i]["fmix"]
            xk, xr = prev - dx * fmix[0], prev - dx * fmix[1]
        k = torch.relu(net.mm(xk, f + "key.weight"))
        return torch.sigmoid(net.mm(xr, f + "receptance.weight")) * net.mm(k * k, f + "value.weight")

    # -- time mix --------------------------------------------------------------------------------
    def _batch_v7(self, tokens, states):
        """v7: every step between the matrix products is a numba kernel on numpy views
        (_mix_in, _v7_loras, _v7_core, _relu_sq); the states are read where they are and the
        new ones written into fresh tensors (no copy of a state on the way in)."""
        net, cfg, w = self.net, self.cfg, self.net.w
        L, B, C, A = cfg.n_layer, len(states), cfg.n_embd, cfg.n_att

        def gather(name):  # (L, B, ...): a view for one sequence, a stacked copy for several
            ts = [getattr(s, name) for s in states]
            return ts[0].unsqueeze(1) if B == 1 else torch.stack(ts, 1)

        att_in, ffn_in, wkv_in = (_np(gather(n)) for n in ("att_x", "ffn_x", "wkv"))
        att_out = torch.empty((L, B, C), dtype=torch.float32)
        ffn_out = torch.empty((L, B, C), dtype=torch.float32)
        wkv_out = torch.empty((L, B) + tuple(states[0].wkv.shape[1:]), dtype=torch.float32)
        ao, fo, so = _np(att_out), _np(ffn_out), _np(wkv_out)
        x = net.ln(w["emb.weight"][torch.as_tensor(tokens)].float(), "blocks.0.ln0").contiguous()
        xn = _np(x)
        mixed = torch.empty((6, B, C), dtype=torch.float32)
        kin = torch.empty((1, B, C), dtype=torch.float32)
        mn, kn = _np(mixed), _np(kin)
        wl, al, vl, g, vfirst = (np.empty((B, A), np.float32) for _ in range(5))
        eps, ln_eps = np.float32(cfg.ln_x_eps), np.float32(cfg.layer_norm_eps)
        delta = np.empty((0, C), np.float32)  # nothing to add before the first block
        for i in range(L):
            d, a, f = self.layers[i], f"blocks.{i}.att.", f"blocks.{i}.ffn."
            ln1w, ln1b, ln2w, ln2b = d["ln"]
            _mix_in(xn, delta, ln1w, ln1b, ln_eps, att_in[i], d["mix"], ao[i], mn)
            r = _np(net.mm(mixed[0], a + "receptance.weight"))
            k = _np(net.mm(mixed[2], a + "key.weight"))
            v = _np(net.mm(mixed[3], a + "value.weight"))
            # (split over two threads they were no faster: measured, 0.1B and 1.5B)
            _v7_loras(mn[1], mn[4], mn[3], mn[5], *d["lora"], wl, al, vl, g)
            y = np.empty((B, A), np.float32)
            w0, a0, v0, k_k, k_a, r_k, lnw, lnb = d["np"]
            _v7_core(r, k, v, vfirst, wl, al, vl, g, i == 0, w0, a0, v0, k_k, k_a, r_k, lnw,
                     lnb, eps, wkv_in[i], so[i], y)
            att = _np(net.mm(torch.from_numpy(y), a + "output.weight"))
            _mix_in(xn, att, ln2w, ln2b, ln_eps, ffn_in[i], d["fmix"], fo[i], kn)
            kk = net.mm(kin[0], f + "key.weight")
            _relu_sq(_np(kk))
            delta = _np(net.mm(kk, f + "value.weight"))
        x += torch.from_numpy(delta)
        logits = net.head(net.ln(x, "ln_out"))
        if B == 1:
            return logits, [State(states[0].version, att_out[:, 0], ffn_out[:, 0], wkv_out[:, 0],
                                  states[0].n_tokens + 1)]
        return logits, [State(s.version, att_out[:, b].clone(), ffn_out[:, b].clone(),
                              wkv_out[:, b].clone(), s.n_tokens + 1) for b, s in enumerate(states)]

    def _tm_v6(self, i, xx, prev, S, ctx):
        net, w, d = self.net, self.net.w, self.layers[i]
        a = f"blocks.{i}.att."
        B = xx.shape[0]
        dx = prev - xx
        lora = torch.tanh((xx + dx * w[a + "time_maa_x"]) @ w[a + "time_maa_w1"])
        lora = lora.view(B, 5, -1).transpose(0, 1)                          # (5, B, D)
        m = torch.bmm(lora, w[a + "time_maa_w2"]) + d["maa"].unsqueeze(1)    # (5, B, C)
        xw, xk, xv, xr, xg = xx + dx * m
        r = net.mm(xr, a + "receptance.weight")
        k = net.mm(xk, a + "key.weight")
        v = net.mm(xv, a + "value.weight")
        g = F.silu(net.mm(xg, a + "gate.weight"))
        dec = torch.exp(-torch.exp(w[a + "time_decay"] + torch.tanh(xw @ w[a + "time_decay_w1"])
                                   @ w[a + "time_decay_w2"]))
        y = torch.empty_like(r)
        _v5_core(_np(r), _np(k), _np(v), _np(dec), d["u"], _np(w[a + "ln_x.weight"]),
                 _np(w[a + "ln_x.bias"]), np.float32(self.cfg.ln_x_eps), _np(S), _np(y))
        return net.mm(y * g, a + "output.weight")

    def _tm_v5(self, i, xx, prev, S, ctx):
        net, w, d = self.net, self.net.w, self.layers[i]
        a = f"blocks.{i}.att."
        mixed = [prev + (xx - prev) * m for m in d["mix"]]
        r = net.mm(mixed[0], a + "receptance.weight")
        k = net.mm(mixed[1], a + "key.weight")
        v = net.mm(mixed[2], a + "value.weight")
        y = torch.empty_like(r)
        _v5_core(_np(r), _np(k), _np(v), d["w"], d["u"], _np(w[a + "ln_x.weight"]),
                 _np(w[a + "ln_x.bias"]), np.float32(self.cfg.ln_x_eps), _np(S), _np(y))
        if self.cfg.version is Version.V5_2:
            y = y * F.silu(net.mm(mixed[3], a + "gate.weight"))
        return net.mm(y, a + "output.weight")

    def _tm_v4(self, i, xx, prev, S, ctx):
        net, w, d = self.net, self.net.w, self.layers[i]
        a = f"blocks.{i}.att."
        mixed = [prev + (xx - prev) * m for m in d["mix"]]
        r = torch.sigmoid(net.mm(mixed[0], a + "receptance.weight"))
        k = net.mm(mixed[1], a + "key.weight")
        v = net.mm(mixed[2], a + "value.weight")
        y = torch.empty_like(r)
        _v4_core(_np(r), _np(k), _np(v), _np(w[a + "decay"]), _np(w[a + "time_first"]),
                 _np(S[:, 0]), _np(S[:, 1]), _np(S[:, 2]), _np(y))
        return net.mm(y, a + "output.weight")
