#!/usr/bin/env python
"""Train rwkvpy's demo model: a tiny byte-level RWKV-7 on the Python documentation.

The text is the standard library's ``pydoc_data/topics.py`` (see :mod:`rwkvpy.demo`, which owns
the train / held-out split). The model is a plain ``torch.nn.Module`` whose parameter names and
shapes are those of BlinkDL's RWKV-7 checkpoints, so ``state_dict()`` *is* a BlinkDL ``.pth``
that ``rwkvpy.load`` reads. The sequence forward is a chunked, differentiable form of the v7
recurrence (:func:`wkv7_train`); the initialisation follows BlinkDL's RWKV-LM v7 training code.

Training is truncated back-propagation through time: the training bytes are cut into
``--batch`` contiguous streams, each step takes the next ``--ctx`` bytes of every stream and
starts from the (detached) state the previous step ended with, so the model learns to use a
state carried over any length, which is how the held-out text is evaluated. Every epoch
shifts the stream boundaries by a seeded random offset and starts from a fresh state.

Deterministic for a given seed, thread count and step count: seeded initialisation and data
order, ``torch.use_deterministic_algorithms``, a fixed thread count. Float32 throughout:
bf16 autocast was measured 12x slower per step on the 2-core AMD EPYC this was made on (no
AVX512-BF16: oneDNN emulates it), so it is not offered. With ``--minutes`` the
number of steps is decided after the warm-up steps have been timed (the learning rate until
then does not depend on it) and printed: ``--steps N`` reproduces the run exactly. On a shared
machine the speed can change several-fold during a run, so the plan is revised from the speed
of the last 100 steps: shortened whenever the run would overrun the budget, lengthened (only in
the first half of the run, by more than 15 %) when the machine got faster. A revision moves the
cosine schedule and is printed ("re-planned") and listed in the JSON summary; a run with
revisions is reproduced only by the same revisions.

Chat: ``--chat-fraction F`` mixes the chat turns of :func:`rwkvpy.demo.chat_turns` (questions
about Python answered with the first sentences of its documentation, in the format of
:mod:`rwkvpy.chat`) into the training bytes, so that F of them are chat (:func:`mix_chat`);
``--init PATH`` starts from an existing model (any file rwkvpy reads, ``demo`` for the shipped
one; quantized weights are dequantized) instead of a fresh initialisation, for a fine-tune.
The held-out chat turns (subjects whose answers are never trained on) are evaluated next to
the held-out documentation: perplexity over all their bytes and over the replies alone (the
bytes after ``Assistant:``, closing blank line included), and with ``--init`` the same numbers
for the starting model.

At the end the checkpoint is written atomically and the held-out perplexity (exp of the mean
negative log-likelihood per byte) is computed with rwkvpy itself: ``rwkvpy.load`` of the written
file, sequence mode over the held-out bytes in chunks with the state carried.

Example::

    python tools/train_demo.py --minutes 28 --out /tmp/demo.pth
    python tools/train_demo.py --n-embd 32 --n-layer 1 --steps 5 --out /tmp/tiny.pth  # smoke test
    python tools/train_demo.py --init demo-doc.gguf --chat-fraction 0.4 --lr 3e-4 \\
        --lr-final 2e-5 --warmup 10 --minutes 10 --out /tmp/demo.pth   # teach a model to chat
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time

# Idle OpenMP threads sleep instead of spinning: on a machine whose cores other jobs share, a
# spinning thread waits for a descheduled one and 2 threads ran 3-5x slower than 1 (measured);
# sleeping costs nothing noticeable here. Must be set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from rwkvpy.demo import chat_info, chat_turns, corpus_info, demo_corpus  # noqa: E402
from rwkvpy.formats.atomic import atomic_write  # noqa: E402

VOCAB = 256
DECAY_SCALE = math.exp(-0.5)  # log w = -e^-0.5 sigmoid(w0 + lora): decay in [e^-0.607, 1)
WKV_CHUNK = 16  # chunk of wkv7_train: 1 / g <= e^(16 * 0.607) = e^9.7 in float32


# --------------------------------------------------------------------------------------------
# The v7 recurrence over a sequence, differentiable
# --------------------------------------------------------------------------------------------

_MASKS: dict = {}


def _pair_mask(L, device):
    """(2L, 2L) 0/1 mask of the in-chunk pair matrix: rows [alpha; r], columns [beta; k].
    Removal rows see strictly earlier tokens (the state before their own update), output rows
    see their own token too."""
    key = (L, device)
    if key not in _MASKS:
        strict = torch.ones(L, L, device=device).tril(-1)
        incl = torch.ones(L, L, device=device).tril()
        _MASKS[key] = torch.cat([strict.repeat(1, 2), incl.repeat(1, 2)])
    return _MASKS[key]


def _unit_lower_solve(Nm, rhs):
    """(I - Nm)^-1 rhs for strictly lower triangular Nm (..., L, L), L a power of two.

    Nm is nilpotent, so (I - Nm)^-1 = (I + Nm)(I + Nm^2)(I + Nm^4)...(I + Nm^(L/2)): 2 log2(L) - 1
    small batched matmuls (torch.linalg.solve_triangular loops over the batch: ~100x slower
    here). The entries are bounded (|kk| = 1, a, w in [0, 1]), so the products are tame."""
    L = Nm.shape[-1]
    out = rhs + Nm @ rhs
    p = Nm
    for _ in range(L.bit_length() - 2):
        p = p @ p
        out = out + p @ out
    return out


def wkv7_train(r, lw, k, v, kk, a, S0, chunk=WKV_CHUNK):
    """The RWKV-7 state recurrence for a batch of sequences, in differentiable torch ops.

    Per head, state S (N_v, N_k), per token t with decay w = exp(lw):
        S = S diag(w) + (S (-kk)) (kk a)^T + v k^T;   out = S r.
    r, lw, k, v, kk, a: (B, T, H, N) float32 (lw = log w <= 0); S0: (B, H, N, N).
    Returns out (B, T, H, N) and the final state (B, H, N, N).

    Chunks of ``chunk`` tokens. Inside a chunk, with g_t the decay from the chunk start through
    token t and u_t = S_{t-1} (-kk_t) the part of the state a token removes, the state scaled by
    1 / g unrolls to a sum, so every in-chunk interaction is one masked matrix product and the
    removals solve a unit lower-triangular system:
        (I - M_ab) U = A S0^T + M_ak V,   out = R S0^T + M_rb U + M_rk V,
        S_end^T = diag(g_L) S0^T + Bg^T U + Kg^T V,
    with A = -kk g_{t-1}, R = r g_t, M_xy[t, i] = x_t . y_i / g_i (beta = kk a, k) and
    Bg, Kg = (kk a, k) g_L / g_i. Across chunks the state is one affine map per chunk:
    S_end^T = (diag(g_L) + Bg^T P) S0^T + (Bg^T Q + Kg^T V) where U = P S0^T + Q.
    """
    B, T, H, N = r.shape
    L = chunk
    pad = (-T) % L
    if pad:  # padding tokens leave the state as it is: w = 1 (lw = 0), k = v = kk = 0
        r, lw, k, v, kk, a = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (r, lw, k, v, kk, a))
    nc = (T + pad) // L

    def chunks(x):
        return x.reshape(B, nc, L, H, N).permute(0, 3, 1, 2, 4)  # (B, H, nc, L, N)

    r, lw, k, v, kk, a = (chunks(x) for x in (r, lw, k, v, kk, a))
    cum = lw.cumsum(-2)  # log g_t (inclusive)
    tot = cum[..., -1:, :]  # log g_L
    b = kk * a
    A = -kk * torch.exp(cum - lw)  # alpha g_{t-1}
    R = r * torch.exp(cum)
    inv = torch.exp(-cum)
    X = torch.cat([A, R], -2)  # (.., 2L, N)
    Y = torch.cat([b * inv, k * inv], -2)
    M = (X @ Y.transpose(-1, -2)) * _pair_mask(L, r.device)  # (.., 2L, 2L)
    Mab, Mak, Mrb, Mrk = M[..., :L, :L], M[..., :L, L:], M[..., L:, :L], M[..., L:, L:]

    PQ = _unit_lower_solve(Mab, torch.cat([A, Mak @ v], -1))
    P, Q = PQ[..., :N], PQ[..., N:]  # U = P Z + Q
    dec = torch.exp(tot - cum)  # g_L / g_i
    Bg, Kg = (b * dec).transpose(-1, -2), (k * dec).transpose(-1, -2)
    step = torch.diag_embed(torch.exp(tot).squeeze(-2)) + Bg @ P  # (B, H, nc, N, N)
    add = Bg @ Q + Kg @ v

    # one unbind per tensor (slicing chunk c inside the loop would cost a full-size gradient
    # buffer per chunk in the backward pass)
    steps = step.permute(2, 0, 1, 3, 4).reshape(nc, B * H, N, N).unbind(0)
    adds = add.permute(2, 0, 1, 3, 4).reshape(nc, B * H, N, N).unbind(0)
    Z = S0.transpose(-1, -2).reshape(B * H, N, N)  # S^T: (B H, N_k, N_v)
    starts = []
    for c in range(nc):
        starts.append(Z)
        Z = torch.baddbmm(adds[c], steps[c], Z)
    Zs = torch.stack(starts, 1).view(B, H, nc, N, N)
    Z = Z.view(B, H, N, N)
    out = (R + Mrb @ P) @ Zs + Mrb @ Q + Mrk @ v  # (B, H, nc, L, N)
    out = out.permute(0, 2, 3, 1, 4).reshape(B, nc * L, H, N)[:, :T]
    return out, Z.transpose(-1, -2)


# --------------------------------------------------------------------------------------------
# The model: parameter names and shapes of BlinkDL's RWKV-7 checkpoints
# --------------------------------------------------------------------------------------------


def lora_dims(C: int) -> dict:
    """LoRA ranks of BlinkDL's v7 training code (multiples of 32, at least 32)."""

    def r32(f):
        return max(32, int(round(f * C**0.5 / 32)) * 32)

    return {"w": r32(2.5), "a": r32(2.5), "v": r32(1.7), "g": r32(5.0)}


def _orthogonal_(t, scale):
    """Orthogonal init with BlinkDL's gain: sqrt(rows / cols) for tall matrices, times scale."""
    rows, cols = t.shape
    gain = math.sqrt(rows / cols) if rows > cols else 1.0
    return nn.init.orthogonal_(t, gain=gain * scale)


class TimeMix(nn.Module):
    def __init__(self, C: int, H: int, layer_id: int, n_layer: int):
        super().__init__()
        self.layer_id, self.H, self.N = layer_id, H, C // H
        D = lora_dims(C)
        vec = lambda: nn.Parameter(torch.zeros(1, 1, C))  # noqa: E731
        for n in "rwkvag":
            setattr(self, "x_" + n, vec())
        self.w0, self.a0, self.v0 = vec(), vec(), vec()
        for n in "wavg":
            setattr(self, n + "1", nn.Parameter(torch.zeros(C, D[n])))
            setattr(self, n + "2", nn.Parameter(torch.zeros(D[n], C)))
        self.k_k, self.k_a = vec(), vec()
        self.r_k = nn.Parameter(torch.zeros(H, self.N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)
        self._init(C, layer_id, n_layer)

    @torch.no_grad()
    def _init(self, C, layer_id, n_layer):
        # BlinkDL's RWKV-LM v7 initialisation (RWKV_Tmix_x070 and generate_init_weight)
        N = self.N
        r01 = layer_id / (n_layer - 1) if n_layer > 1 else 0.0  # 0 .. 1 over the layers
        r10 = 1.0 - layer_id / n_layer  # 1 .. ~0
        n = torch.arange(C, dtype=torch.float64)
        ddd = n / C
        linear = n / (C - 1) - 0.5
        zig = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
        zig = zig * zig.abs()
        www = -6 + 6 * (n / (C - 1)) ** (1 + r01**0.3)
        for name, p in zip("rwkvag", (0.2, 0.9, 0.7, 0.7, 0.9, 0.2)):
            getattr(self, "x_" + name).copy_((1.0 - ddd ** (p * r10)).view(1, 1, C))
        self.w0.copy_((www + 0.5 + zig * 2.5).view(1, 1, C))
        self.a0.copy_((-0.19 + zig * 0.3 + linear * 0.4).view(1, 1, C))
        self.v0.copy_((0.73 - linear * 0.4).view(1, 1, C))
        for name in "wavg":
            getattr(self, name + "1").zero_()
            _orthogonal_(getattr(self, name + "2"), 0.1)
        self.k_k.copy_((0.71 - linear * 0.1).view(1, 1, C))
        self.k_a.fill_(1.02)
        self.r_k.fill_(-0.04)
        _orthogonal_(self.receptance.weight, 1.0)
        _orthogonal_(self.key.weight, 0.1)
        _orthogonal_(self.value.weight, 1.0)
        self.output.weight.zero_()
        self.ln_x.weight.fill_(((1 + layer_id) / n_layer) ** 0.7)
        self.ln_x.bias.zero_()

    def forward(self, x, prev, S, v_first):
        """x (B, T, C) = ln1 output; prev (B, C) the previous token's; S (B, H, N, N)."""
        B, T, C = x.shape
        H, N = self.H, self.N
        dx = torch.cat([prev.unsqueeze(1), x[:, :-1]], 1) - x
        xr, xw, xk, xv, xa, xg = (x + dx * getattr(self, "x_" + n) for n in "rwkvag")
        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        lw = -DECAY_SCALE * torch.sigmoid(self.w0 + torch.tanh(xw @ self.w1) @ self.w2)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0)
        k = k * (1 + (a - 1) * self.k_a)
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        rh, kh, vh = r.view(B, T, H, N), k.view(B, T, H, N), v.view(B, T, H, N)
        out, S = wkv7_train(
            rh.float(),
            lw.float().view(B, T, H, N),
            kh.float(),
            vh.float(),
            kk.float(),
            a.float().view(B, T, H, N),
            S,
        )
        out = self.ln_x(out.reshape(B * T, C)).view(B, T, C)
        bonus = (rh * kh * self.r_k).sum(-1, keepdim=True) * vh
        out = self.output((out + bonus.reshape(B, T, C)) * g)
        return out, S, v_first


class ChannelMix(nn.Module):
    def __init__(self, C: int, layer_id: int, n_layer: int):
        super().__init__()
        self.x_k = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, 4 * C, bias=False)
        self.value = nn.Linear(4 * C, C, bias=False)
        with torch.no_grad():
            r10 = 1.0 - layer_id / n_layer
            ddd = torch.arange(C, dtype=torch.float64) / C
            self.x_k.copy_((1.0 - ddd ** (r10**4)).view(1, 1, C))
            _orthogonal_(self.key.weight, 1.0)
            self.value.weight.zero_()

    def forward(self, x, prev):
        dx = torch.cat([prev.unsqueeze(1), x[:, :-1]], 1) - x
        return self.value(torch.relu(self.key(x + dx * self.x_k)) ** 2)


class Block(nn.Module):
    def __init__(self, C: int, H: int, layer_id: int, n_layer: int):
        super().__init__()
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C)
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = TimeMix(C, H, layer_id, n_layer)
        self.ffn = ChannelMix(C, layer_id, n_layer)


class RWKV7LM(nn.Module):
    """A trainable RWKV-7 whose ``state_dict()`` is a BlinkDL-layout checkpoint."""

    def __init__(self, n_embd: int, n_layer: int, head_size: int = 64, vocab: int = VOCAB):
        super().__init__()
        if n_embd % head_size:
            raise ValueError(f"head size {head_size} does not divide n_embd {n_embd}")
        self.n_embd, self.n_layer, self.vocab = n_embd, n_layer, vocab
        self.n_head, self.head_size = n_embd // head_size, head_size
        self.emb = nn.Embedding(vocab, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, self.n_head, i, n_layer) for i in range(n_layer))
        self.ln_out = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab, bias=False)
        with torch.no_grad():
            nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
            gain = 0.5 * math.sqrt(vocab / n_embd) if vocab > n_embd else 0.5
            nn.init.orthogonal_(self.head.weight, gain=gain)

    @classmethod
    def from_state_dict(cls, sd: dict) -> RWKV7LM:
        """A module holding a BlinkDL v7 checkpoint's weights (float32)."""
        vocab, C = sd["emb.weight"].shape
        n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        H = sd["blocks.0.att.r_k"].shape[0]
        m = cls(C, n_layer, C // H, vocab)
        m.load_state_dict({k: v.float() for k, v in sd.items()})
        return m

    def new_state(self, B: int):
        C, H, N, L = self.n_embd, self.n_head, self.head_size, self.n_layer
        z = self.emb.weight.new_zeros
        return z(L, B, C), z(L, B, C), z(L, B, H, N, N)

    def forward(self, idx, state=None):
        """idx (B, T) byte ids; state (att_x (L, B, C), ffn_x (L, B, C), wkv (L, B, H, N, N)) or
        None. Returns logits (B, T, vocab) and the new state."""
        B = idx.shape[0]
        att_x, ffn_x, wkv = self.new_state(B) if state is None else state
        x = self.emb(idx)
        new_att, new_ffn, new_wkv = [], [], []
        v_first = None
        for i, blk in enumerate(self.blocks):
            if i == 0:
                x = blk.ln0(x)
            xx = blk.ln1(x)
            out, S, v_first = blk.att(xx, att_x[i], wkv[i], v_first)
            new_att.append(xx[:, -1])
            new_wkv.append(S)
            x = x + out
            xx = blk.ln2(x)
            x = x + blk.ffn(xx, ffn_x[i])
            new_ffn.append(xx[:, -1])
        logits = self.head(self.ln_out(x))
        return logits, (torch.stack(new_att), torch.stack(new_ffn), torch.stack(new_wkv))


def load_init(spec) -> RWKV7LM:
    """A trainable module holding the weights of an existing v7 model file (``spec``: a path,
    or ``demo``), read by rwkvpy's readers: block-quantized tensors are dequantized, vectors
    stored flat (GGUF) take the module's shapes. Layer 0's v0/v1/v2, which v7 does not use
    and converters may drop, keep the module's initialisation."""
    from rwkvpy.formats import read, to_float32
    from rwkvpy.hub import resolve_model

    ck = read(resolve_model(spec))
    sd = {k: to_float32(v) for k, v in ck.tensors.items()}
    if "blocks.0.att.r_k" not in sd or "emb.weight" not in sd:
        raise SystemExit(f"train_demo: {spec} is not an RWKV-7 model")
    vocab, C = sd["emb.weight"].shape
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    H = sd["blocks.0.att.r_k"].shape[0]
    model = RWKV7LM(C, n_layer, C // H, vocab)
    want = model.state_dict()
    unused = {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}
    missing = set(want) - set(sd) - unused
    extra = set(sd) - set(want)
    if missing or extra:
        raise SystemExit(
            f"train_demo: {spec}: tensors missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(extra)[:5]}"
        )
    model.load_state_dict(
        {k: (sd[k].reshape(v.shape).contiguous() if k in sd else v) for k, v in want.items()}
    )
    return model


def checkpoint_state_dict(model: nn.Module, dtype=torch.float32) -> dict:
    return {k: v.detach().to(dtype).contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(model, path, dtype=torch.float32) -> int:
    sd = checkpoint_state_dict(model, dtype)
    with atomic_write(path) as f:
        torch.save(sd, f)
    return os.path.getsize(path)


# --------------------------------------------------------------------------------------------
# Data, schedule, evaluation
# --------------------------------------------------------------------------------------------


class Streams:
    """Truncated BPTT over ``batch`` contiguous streams of the training bytes. Epoch e shifts
    the stream boundaries by a seeded random offset in [0, ctx); a new epoch starts from a
    fresh state (``next()`` returns reset=True)."""

    def __init__(self, data: bytes, batch: int, ctx: int, seed: int):
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        self.batch, self.ctx = batch, ctx
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.epoch = -1
        self.j = self.steps = 0
        if len(data) < batch * (ctx + 1) + ctx:
            raise SystemExit(
                f"train_demo: {len(data)} training bytes are too few for "
                f"--batch {batch} --ctx {ctx}"
            )

    def _new_epoch(self):
        self.epoch += 1
        off = int(torch.randint(0, self.ctx, (1,), generator=self.gen))
        seg = (len(self.data) - off - 1) // self.batch
        self.starts = off + seg * torch.arange(self.batch)
        self.steps = seg // self.ctx
        self.j = 0

    def next(self):
        reset = self.j >= self.steps
        if reset:
            self._new_epoch()
        idx = self.starts.unsqueeze(1) + self.j * self.ctx + torch.arange(self.ctx + 1)
        self.j += 1
        win = self.data[idx]
        return win[:, :-1], win[:, 1:], reset


def mix_chat(doc: bytes, turns, fraction: float, seed: int, block: int = 2048) -> bytes:
    """The training bytes with chat turns mixed in, ``fraction`` of them chat.

    The documentation is cut at paragraph ends (a blank line) into blocks of at least ``block``
    bytes, kept in order; after each block come as many conversations as keep the chat's share
    of the bytes so far at ``fraction``. A conversation is 1 to 4 turns; the turns are drawn in
    a seeded random order, each once per pass over them. Deterministic for a given seed."""
    if fraction <= 0:
        return doc
    if fraction >= 1 or not turns:
        raise SystemExit("train_demo: --chat-fraction must be in [0, 1) and needs chat turns")
    rng = random.Random(seed)
    enc = [t.encode("utf-8") for t in turns]
    order: list = []
    ratio = fraction / (1.0 - fraction)
    out, cur = bytearray(), bytearray()
    n_doc = n_chat = 0
    paras = re.split(b"(?<=\n\n)", doc)
    for i, para in enumerate(paras):
        cur += para
        if len(cur) < block and i + 1 < len(paras):
            continue
        out += cur
        n_doc += len(cur)
        cur.clear()
        while n_chat < ratio * n_doc:
            for _ in range(rng.randint(1, 4)):
                if not order:
                    order = list(range(len(enc)))
                    rng.shuffle(order)
                t = enc[order.pop()]
                out += t
                n_chat += len(t)
    return bytes(out)


def reply_mask(turns) -> torch.Tensor:
    """For the concatenated ``turns``, a bool per byte: True on the replies' bytes (what
    follows ``Assistant:``, the closing blank line included)."""
    marks = []
    for t in turns:
        b = t.encode("utf-8")
        at = b.index(b"\n\nAssistant:") + len(b"\n\nAssistant:")
        marks += [False] * at + [True] * (len(b) - at)
    return torch.tensor(marks)


def lr_at(step, total, warmup, lr0, lr1):
    """Linear warm-up to lr0 over ``warmup`` steps, then cosine to lr1 at ``total``."""
    if step < warmup:
        return lr0 * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr1 + 0.5 * (lr0 - lr1) * (1 + math.cos(math.pi * p))


@torch.no_grad()
def heldout_loss_quick(model, held: bytes, pieces: int = 8, ctx: int = 512) -> float:
    """Mean NLL per byte of the held-out bytes with the training module, cut into ``pieces``
    streams each from a fresh state (for the loss curve; the final number comes from rwkvpy)."""
    data = torch.frombuffer(bytearray(held), dtype=torch.uint8).long()
    seg = (len(data) - 1) // pieces
    starts = torch.arange(pieces) * seg
    state, tot = None, 0.0
    for j in range(0, seg, ctx):
        n = min(ctx, seg - j)
        idx = starts.unsqueeze(1) + j + torch.arange(n + 1)
        win = data[idx]
        logits, state = model(win[:, :-1], state)
        tot += float(
            F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), win[:, 1:].reshape(-1), reduction="sum"
            )
        )
    return tot / (pieces * seg)


def _nll_rwkvpy(model, data: bytes, chunk: int = 1024) -> torch.Tensor:
    """NLL of each of data[1:] given the bytes before it: rwkvpy's sequence mode in chunks with
    the state carried."""
    toks = list(data)
    state, out = None, []
    for i in range(0, len(toks) - 1, chunk):
        inp = toks[i : i + chunk]
        tgt = torch.tensor(toks[i + 1 : i + 1 + chunk])
        inp = inp[: len(tgt)]
        logits, state = model.forward(inp, state, all_logits=True)
        out.append(F.cross_entropy(logits.double(), tgt, reduction="none"))
    return torch.cat(out)


def heldout_perplexity_rwkvpy(
    path, held: bytes, threads: int, chunk: int = 1024, chat_turns_held=None
) -> dict:
    """exp(mean NLL per byte) of held[1:] given the preceding held-out bytes, computed by
    rwkvpy: load the written file, sequence mode in chunks with the state carried. With
    ``chat_turns_held``, the same over those turns as one conversation (``chat_ppl``) and over
    their replies' bytes alone (``chat_reply_ppl``)."""
    import rwkvpy

    t0 = time.time()
    model = rwkvpy.load(path, threads=threads)
    nll = _nll_rwkvpy(model, held, chunk)
    out = {
        "heldout_nll": float(nll.mean()),
        "heldout_ppl": math.exp(float(nll.mean())),
        "heldout_tokens": len(nll),
    }
    if chat_turns_held:
        nll = _nll_rwkvpy(model, "".join(chat_turns_held).encode("utf-8"), chunk)
        reply = reply_mask(chat_turns_held)[1:]
        out.update(
            {
                "chat_ppl": math.exp(float(nll.mean())),
                "chat_tokens": len(nll),
                "chat_reply_ppl": math.exp(float(nll[reply].mean())),
                "chat_reply_tokens": int(reply.sum()),
            }
        )
    out["eval_seconds"] = round(time.time() - t0, 1)
    return out


def _print_eval(what, ev):
    print(
        f"{what} held-out (rwkvpy, {ev['heldout_tokens']} bytes, state carried): "
        f"NLL {ev['heldout_nll']:.4f} nats/byte = {ev['heldout_nll'] / math.log(2):.3f} "
        f"bits/byte, perplexity {ev['heldout_ppl']:.3f} ({ev['eval_seconds']}s)",
        flush=True,
    )
    if "chat_ppl" in ev:
        print(
            f"{what} held-out chat ({ev['chat_tokens']} bytes): perplexity "
            f"{ev['chat_ppl']:.3f}, replies alone ({ev['chat_reply_tokens']} bytes) "
            f"{ev['chat_reply_ppl']:.3f}",
            flush=True,
        )


def tune_malloc():
    """Keep freed memory in the process (glibc): autograd allocates and frees many
    multi-megabyte tensors per step, which glibc otherwise returns to the OS and page-faults
    back; on the 2-core machine this made elementwise ops ~10x slower. No-op elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)
        libc.mallopt(M_TOP_PAD, 256 << 20)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", default="demo.pth", help="checkpoint to write (BlinkDL .pth)")
    p.add_argument("--n-embd", type=int, default=192)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--head-size", type=int, default=None, help="default: min(64, n_embd)")
    p.add_argument("--ctx", type=int, default=256, help="bytes per stream per step")
    p.add_argument("--batch", type=int, default=16, help="parallel streams")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps (upper bound with --minutes); one of --steps / --minutes is required",
    )
    p.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="wall-clock budget for the whole run, final evaluation included",
    )
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lr-final", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="dtype of the written checkpoint",
    )
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument(
        "--eval-every",
        type=int,
        default=100,
        help="quick held-out loss every N steps with the training module (0: never)",
    )
    p.add_argument(
        "--eval-reserve",
        type=float,
        default=75.0,
        help="seconds of --minutes kept for saving and the final evaluation",
    )
    p.add_argument("--no-eval", action="store_true", help="skip the final rwkvpy evaluation")
    p.add_argument("--json", default=None, help="write a JSON summary here")
    p.add_argument(
        "--chat-fraction",
        type=float,
        default=0.0,
        help="share of the training bytes that are chat turns (rwkvpy.demo.chat_turns)",
    )
    p.add_argument(
        "--init",
        default=None,
        metavar="MODEL",
        help="start from this v7 model (a file rwkvpy reads, or 'demo'); its "
        "dimensions replace --n-embd, --n-layer, --head-size",
    )
    a = p.parse_args(argv)
    if a.steps is None and a.minutes is None:
        p.error("give --steps or --minutes (or both)")
    if a.head_size is None:
        a.head_size = min(64, a.n_embd)
    return a


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    tune_malloc()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(args.seed)

    train, held = demo_corpus()
    info = corpus_info()
    if args.init is not None:
        model = load_init(args.init)
        args.n_embd, args.n_layer, args.head_size = model.n_embd, model.n_layer, model.head_size
    else:
        model = RWKV7LM(args.n_embd, args.n_layer, args.head_size)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"corpus: pydoc_data.topics, {info['train_bytes']} train / {info['heldout_bytes']} "
        f"held-out bytes, sha256 {info['sha256']}, Python {sys.version.split()[0]}"
    )
    chat_train, chat_held = chat_turns() if args.chat_fraction > 0 or args.init else ([], [])
    chat_bytes = "".join(chat_held).encode("utf-8")
    if args.chat_fraction > 0:
        train = mix_chat(train, chat_train, args.chat_fraction, args.seed)
        info["chat"] = chat_info()
        info["mixed_train_bytes"] = len(train)
        print(
            f"chat: {len(chat_train)} train / {len(chat_held)} held-out turns, "
            f"{args.chat_fraction:.0%} of {len(train)} training bytes, "
            f"sha256 {info['chat']['sha256']}"
        )
    if args.init is not None:
        print(f"init: {args.init}", flush=True)
    print(
        f"model: RWKV-7 n_embd {args.n_embd} x {args.n_layer} layers, head size "
        f"{args.head_size}, vocab {VOCAB}, {n_params:,} parameters; "
        f"lora {lora_dims(args.n_embd)}"
    )
    print(
        f"train: batch {args.batch} x ctx {args.ctx} bytes/step, lr {args.lr} -> "
        f"{args.lr_final} (warm-up {args.warmup}), wd {args.weight_decay}, seed {args.seed}, "
        f"{args.threads} threads, float32",
        flush=True,
    )

    # BlinkDL's groups: w0 at 2x lr; matrices (.weight, 2-D) with weight decay; the rest without
    decay, plain, fast = [], [], []
    for name, p in model.named_parameters():
        if name.endswith("att.w0"):
            fast.append(p)
        elif name.endswith(".weight") and p.dim() >= 2 and "ln" not in name:
            decay.append(p)
        else:
            plain.append(p)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay, "scale": 1.0},
            {"params": plain, "weight_decay": 0.0, "scale": 1.0},
            {"params": fast, "weight_decay": 0.0, "scale": 2.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.99),
        eps=1e-8,
        foreach=False,
    )

    streams = Streams(train, args.batch, args.ctx, args.seed)
    deadline = None if args.minutes is None else t_start + 60 * args.minutes - args.eval_reserve
    total = args.steps if args.steps is not None else 10**9
    planned = args.steps is not None and args.minutes is None
    replans = []  # (step, new total)
    marks = []  # (step, time) of recent steps: the current speed
    state = None
    curve, held_curve = [], []
    t_eval = 0.0
    if args.eval_every:
        t0 = time.time()
        hl = heldout_loss_quick(model, held)
        point = {"step": 0, "loss": round(hl, 4)}
        if chat_bytes:
            point["chat_loss"] = round(heldout_loss_quick(model, chat_bytes), 4)
        t_eval = time.time() - t0
        held_curve.append(point)
        print(
            f"step 0 held-out loss (quick, training module) {hl:.4f}"
            + (f", chat {point['chat_loss']:.4f}" if chat_bytes else "")
            + f" ({t_eval:.1f}s)",
            flush=True,
        )
    acc, acc_n = 0.0, 0
    t_loop = t_int = time.time()
    t_evals = 0.0  # time spent in held-out evaluations inside the loop
    step = 0
    while step < total:
        if deadline is not None and time.time() >= deadline:
            print(f"time budget reached at step {step}/{total}", flush=True)
            break
        x, y, reset = streams.next()
        if reset:
            state = None
        lr = lr_at(step, total, args.warmup, args.lr, args.lr_final)
        for gr in opt.param_groups:
            gr["lr"] = lr * gr["scale"]
        logits, state = model(x, state)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip, foreach=False)
        opt.step()
        state = tuple(s.detach() for s in state)
        step += 1
        acc += float(loss.detach())
        acc_n += 1

        # decide the number of steps once the warm-up (whose lr does not depend on it) is timed
        if not planned and step == max(args.warmup, 5):
            per_step = (time.time() - t_loop) / step
            if args.eval_every:
                per_step += t_eval / args.eval_every
            fit = step + int((deadline - time.time()) / per_step * 0.97)
            total = min(total, max(step, fit))
            planned = True
            print(
                f"plan: {total} steps ({per_step:.2f} s/step measured over {step} steps); "
                f"--steps {total} reproduces this run",
                flush=True,
            )
        elif deadline is not None and planned and step % 25 == 0 and step < total:
            now = time.time()
            marks = [m for m in marks if m[0] >= step - 100] + [(step, now)]
            if marks[0][0] <= step - 50:  # speed of the last 50..100 steps, evaluations included
                per_step = (now - marks[0][1]) / (step - marks[0][0])
                fit = step + int((deadline - now) / per_step * 0.97)
                if args.steps is not None:  # --steps stays the upper bound
                    fit = min(fit, args.steps)
                over = now + per_step * (total - step) > deadline + 30
                longer = fit > 1.15 * total and step < total / 2
                if (over and fit < total) or longer:
                    total = max(step + 1, fit)
                    replans.append((step, total))
                    print(
                        f"re-planned at step {step}: {total} steps (now {per_step:.2f} s/step)",
                        flush=True,
                    )

        if step % args.log_every == 0 or step == total:
            now = time.time()
            tok_s = acc_n * args.batch * args.ctx / (now - t_int)
            curve.append({"step": step, "loss": round(acc / acc_n, 4)})
            print(
                f"step {step}/{total if planned else '?'} loss {acc / acc_n:.4f} lr {lr:.2e} "
                f"epoch {streams.epoch} {tok_s:.0f} tok/s elapsed {now - t_start:.0f}s",
                flush=True,
            )
            acc, acc_n, t_int = 0.0, 0, time.time()
        if args.eval_every and (step % args.eval_every == 0 or step == total):
            t0 = time.time()
            hl = heldout_loss_quick(model, held)
            point = {"step": step, "loss": round(hl, 4)}
            if chat_bytes:
                point["chat_loss"] = round(heldout_loss_quick(model, chat_bytes), 4)
            held_curve.append(point)
            print(
                f"step {step} held-out loss (quick, training module) {hl:.4f}"
                + (f", chat {point['chat_loss']:.4f}" if chat_bytes else "")
                + f" ({time.time() - t0:.1f}s)",
                flush=True,
            )
            t_int += time.time() - t0
            t_evals += time.time() - t0
    if acc_n:
        curve.append({"step": step, "loss": round(acc / acc_n, 4)})
    train_seconds = time.time() - t_loop - t_evals

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    size = save_checkpoint(model, args.out, dtype)
    tokens = step * args.batch * args.ctx
    print(
        f"wrote {args.out} ({size:,} bytes, {args.dtype}) after {step} steps, {tokens:,} tokens "
        f"({tokens / len(train):.2f} epochs) in {train_seconds:.0f}s",
        flush=True,
    )

    summary = {
        "out": os.path.abspath(args.out),
        "file_size": size,
        "steps": step,
        "tokens": tokens,
        "planned_steps": total,
        "replans": replans,
        "params": n_params,
        "config": {k: v for k, v in vars(args).items() if k not in ("json",)},
        "corpus": info,
        "train_seconds": round(train_seconds, 1),
        "loss_curve": curve,
        "heldout_quick_curve": held_curve,
    }
    if not args.no_eval:
        ev = heldout_perplexity_rwkvpy(args.out, held, args.threads, chat_turns_held=chat_held)
        summary.update(ev)
        _print_eval("final", ev)
        if args.init is not None:
            from rwkvpy.hub import resolve_model

            ev0 = heldout_perplexity_rwkvpy(
                resolve_model(args.init), held, args.threads, chat_turns_held=chat_held
            )
            summary["init_eval"] = ev0
            _print_eval("init", ev0)
    summary["total_seconds"] = round(time.time() - t_start, 1)
    print(f"total time {summary['total_seconds']:.0f}s", flush=True)
    if args.json:
        with atomic_write(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
