"""The one-token step of a CPU model, for every RWKV version: the embedding, each layer through
its version's module (v4.py ... v7.py), the head.

Each version's module packs a layer's weights into a record of numpy views (``pack``), names
the products of a block (``PRODUCTS``), gives its whole-block numba kernel (``block``) and
runs the same block step by step from Python (``layer``) where a product has no numba spec
or a batch is larger than the products take in one pass.
"""

from __future__ import annotations

import numpy as np
import torch

from ...config import Version
from ...state import State
from ..linear.threads import PARALLEL_LOCK, _numba_threads
from . import v4, v5, v6, v7
from .glue import _np

#: The module of each version's fast decode.
VERSIONS = {Version.V4: v4, Version.V5_0: v5, Version.V5_2: v5, Version.V6: v6, Version.V7: v7}


class FusedStep:
    """Runs one token through a built model (models.vX instance) with fused glue.

    Every step between the matrix products is a numba kernel on numpy views of torch tensors:
    the layer norms and token-shift mixes, the LoRAs, each version's recurrence. The states
    are read where they are and the new ones written into fresh tensors (no copy on the way
    in). Holds no weights of its own beyond per-layer views and stacks of the model's small
    tensors (a contiguous copy of a LoRA matrix only where the model holds a strided view,
    whose file pages are then released).

    Each block runs as one numba call (the version's ``block``: norms, mixes, products,
    LoRAs, the recurrence and the gates without returning to Python) where every product of
    the model has a numba spec (kernels.linear.Linear.numba_spec); else step by step from
    Python (the version's ``layer``). On several threads the v7 block also splits its LoRAs
    and recurrence between them (the same numbers). The products are read when the step is
    built: a model whose ``net.lin`` changes needs a new FusedStep.
    """

    def __init__(self, net):
        self.net = net
        self.cfg = net.cfg
        #: the module of the model's version (kernels/decode/v4.py ... v7.py)
        self.version = VERSIONS[self.cfg.version]
        self.layers = [self.version.pack(net.w, i, self.cfg) for i in range(self.cfg.n_layer)]
        #: the blocks as whole numba kernels where every product has a numba spec; None: the
        #: blocks run step by step from Python
        self.blocks = self._numba_blocks()

    def _numba_blocks(self):
        """Per layer: the block kernel and its arguments after the per-token ones (None where
        a product has no numba spec)."""
        cfg, net, mod = self.cfg, self.net, self.version
        blocks = []
        self.blocks_max_b = 1 << 62
        for i, layer in enumerate(self.layers):
            lins = [net.lin[f"blocks.{i}.{n}.weight"] for n in mod.products(cfg)]
            specs = tuple(lin.numba_spec() for lin in lins)
            if any(sp is None for sp in specs):
                return None
            self.blocks_max_b = min([self.blocks_max_b] + [lin.rows_max_t for lin in lins])
            blocks.append(mod.block(layer, specs, cfg, i))
        return blocks

    def __call__(self, token: int, state: State):
        """One token from one state: returns (logits (V,), new State)."""
        logits, (new,) = self.batch([token], [state])
        return logits[0], new

    def batch(self, tokens: list, states: list):
        """One token for each of B independent sequences, in one pass over the weights.

        Returns (logits (B, V), list of B new States). The given states are unchanged.
        """
        net, cfg, w = self.net, self.cfg, self.net.w
        L, B, C = cfg.n_layer, len(states), cfg.n_embd

        def gather(name):  # (L, B, ...): a view for one sequence, a stacked copy for several
            ts = [getattr(s, name) for s in states]
            return ts[0].unsqueeze(1) if B == 1 else torch.stack(ts, 1)

        ins = [gather(n) for n in ("att_x", "ffn_x", "wkv")]
        outs = [torch.empty((L, B) + tuple(t.shape[2:]), dtype=torch.float32) for t in ins]
        io = [_np(t) for t in ins], [_np(t) for t in outs]
        x = net.ln(w["emb.weight"][torch.as_tensor(tokens)].float(), "blocks.0.ln0").contiguous()
        delta = np.empty((0, C), np.float32)  # nothing to add before the first block
        if self.blocks is not None and B <= self.blocks_max_b:
            delta = self._run_blocks(_np(x), delta, io)
        else:
            ctx = {"B": B}
            for i in range(L):
                delta = self.version.layer(self, i, _np(x), delta, io, ctx)
        x += torch.from_numpy(delta)
        logits = net.head(net.ln(x, "ln_out"))
        att, ffn, wkv = outs
        if B == 1:
            return logits, [
                State(states[0].version, att[:, 0], ffn[:, 0], wkv[:, 0], states[0].n_tokens + 1)
            ]
        return logits, [
            State(
                s.version, att[:, b].clone(), ffn[:, b].clone(), wkv[:, b].clone(), s.n_tokens + 1
            )
            for b, s in enumerate(states)
        ]

    def _run_blocks(self, xn, delta, io):
        """Every block as one numba call each (self.blocks); the products on numba's threads
        unless another parallel launch holds kernels.linear.PARALLEL_LOCK (then serial)."""
        (att_in, ffn_in, wkv_in), (ao, fo, so) = io
        cfg = self.cfg
        eps = (np.float32(cfg.layer_norm_eps), np.float32(cfg.ln_x_eps))
        v_first = np.empty((xn.shape[0], cfg.n_att), np.float32)  # v7's value residual
        n = torch.get_num_threads()
        parallel = n > 1 and PARALLEL_LOCK.acquire(blocking=False)
        try:
            threads = _numba_threads(n) if parallel else 1
            v7 = cfg.version is Version.V7
            for i, (block, args) in enumerate(self.blocks):
                state = (att_in[i], ffn_in[i], wkv_in[i], ao[i], fo[i], so[i])
                delta = (
                    block(xn, delta, state, v_first, *args, eps, threads)
                    if v7
                    else block(xn, delta, state, *args, eps, threads)
                )
        finally:
            if parallel:
                PARALLEL_LOCK.release()
        return delta

    def np_mm(self, x, name):
        """x (B, in) numpy @ W^T for a projection matrix, numpy out (Linear.np_mm)."""
        return self.net.lin[name].np_mm(x)

    def scratch(self, ctx, name, shape):
        """A float32 buffer of the step-by-step path, kept in ``ctx`` for the next layers."""
        buf = ctx.get(name)
        if buf is None:
            buf = ctx[name] = np.empty(shape, np.float32)
        return buf
