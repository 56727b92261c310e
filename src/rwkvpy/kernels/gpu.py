"""The model on a GPU (or any torch device): weights in the GPU's native types, and the decode
step vectorized over sequences and replayed from CUDA graphs.

Weights (:class:`DeviceLinear`, one per projection matrix):

=========  =========================  ==========================
stored     mode "fast" (default)      mode "exact"
=========  =========================  ==========================
F32        float32                    float32
F16        float16 (as stored)        float32
BF16       bfloat16 (as stored)       float32
Q4_0..Q8_0 float16, dequantized at    float32, dequantized at
           load (exactly, then        load (exactly)
           rounded to float16)
=========  =========================  ==========================

A product casts the float32 activations to the weight's type and runs torch's matmul (cuBLAS on
NVIDIA GPUs, hipBLAS on ROCm), accumulating in float32; the result is float32 again. Everything
else (norms, token shift, the recurrences, the residual stream) stays float32. Quantized weights
are expanded to float16 rather than kept in blocks: cuBLAS's float16 products run near the
card's bandwidth with no kernel of ours to maintain. The price is memory and bytes read per
token (2 bytes per weight instead of 0.56-1.06), which a dequantizing product on the blocks
would save; none is written (docs/kernels.md has the measured figures).

Grouped products (:func:`group_products`): a layer's products that take different inputs but
none of each other's results (each model's ``product_groups``) run together: r/k/v(/g) as one
batched product over weights stacked once (:class:`StackedLinears`), and one token's v7 LoRAs as
two products (:class:`LowRankGroup`). At batch 1 a GPU is bound by latency, not bytes: fewer,
larger products take less time (docs/kernels.md).

Decode (:class:`TorchStep`): one token for each of B sequences runs the model's own torch code
(models/vX.py), vectorized over the B sequences with :func:`torch.func.vmap`, so there is no
second copy of the math to keep in step with the reference. On CUDA the whole step (embedding,
every layer, head) is captured once per batch size (rounded up to a power of two) in a CUDA
graph and replayed: one launch per token instead of one per operation, which is what limits
eager PyTorch at batch 1.
A replayed graph still runs one kernel per operation of the eager code; ``compile=True``
first lets torch.compile (TorchInductor) fuse the one-sequence step's elementwise chains into
Triton kernels, at the price of a compilation when the model is first run (cached on disk by
torch afterwards). Figures: README, "GPU".
"""

from __future__ import annotations

import copy
import functools
import warnings

import torch
import torch.nn.functional as F

from ..formats.base import QTensor, to_float32, type_name
from ..state import State

MAX_GRAPH_BATCH = 64  # larger batches run in groups of this many
FIELDS = ("att_x", "ffn_x", "wkv")  # a State's tensors, as the step takes them


class DeviceLinear:
    """y = x @ W^T with W (out, in) resident on a device in its compute type (table above)."""

    exact = False

    def __init__(self, w, device, mode: str = "fast"):
        self.fmt = type_name(w)
        if isinstance(w, QTensor):
            t, dtype = to_float32(w), torch.float16
        else:
            t, dtype = w, w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.float32
        if mode != "fast":
            dtype = torch.float32
        self.weight = t.to(device=device, dtype=dtype).contiguous()
        self.exact = dtype == torch.float32
        self.out_features, self.in_features = self.weight.shape
        self.nbytes = self.weight.numel() * self.weight.element_size()
        self.strategy = f"torch {str(dtype).removeprefix('torch.')} on {self.weight.device.type}"

    def __call__(self, x):
        return F.linear(x.to(self.weight.dtype), self.weight).float()


class StackedLinears:
    """G products of same-shaped matrices with G different inputs (r/k/v/g) as one batched
    product: one cuBLAS call instead of G. The member linears' weights become views of one
    (G, out, in) tensor, so the weights are held once."""

    vmaps = False  # under torch.func.vmap, a batched matmul would copy the (G, out, in)
    # weights once per sequence (batch decode many times slower); the batched step keeps
    # the separate products, which vmap folds into one product per matrix

    def __init__(self, lins):
        self.weight = torch.stack([lin.weight for lin in lins])  # (G, out, in)
        for j, lin in enumerate(lins):
            lin.weight = self.weight[j]

    @staticmethod
    def fits(lins) -> bool:
        ws = [getattr(lin, "weight", None) for lin in lins]
        return (
            all(isinstance(w, torch.Tensor) and w.dim() == 2 for w in ws)
            and len({(w.shape, w.dtype, w.device) for w in ws}) == 1
        )

    def __call__(self, xs):
        x = torch.stack(xs).to(self.weight.dtype)  # (G, T, in)
        return list(torch.matmul(x, self.weight.transpose(1, 2)).float().unbind(0))


class LowRankGroup:
    """One token's G low-rank products act_j(x_j @ A_j) @ B_j in two products instead of 2G:
    X (G, C) @ [A_1 .. A_G] (C, R), keep block j of row j (the rest is discarded), apply act_j,
    and multiply the block-diagonal (G, R) by [B_1; ..; B_G] (R, out). A and B are
    concatenated once (in float32); the model's own A_j and B_j become views of the
    concatenations."""

    vmaps = True  # 2-D weights: vmap folds the sequences into the rows of each product

    def __init__(self, firsts, seconds):
        self.first = torch.cat(firsts, 1)  # (C, R)
        self.second = torch.cat(seconds, 0)  # (R, out)
        ranks = [a.shape[1] for a in firsts]
        self.spans = [(sum(ranks[:j]), r) for j, r in enumerate(ranks)]

    def views(self):
        """(A_j, B_j) as views of the concatenations."""
        return [(self.first[:, o : o + r], self.second[o : o + r]) for o, r in self.spans]

    def __call__(self, terms):
        """terms: G pairs (x (1, C), act or None) -> G results (1, out)."""
        y = torch.cat([x for x, _ in terms]) @ self.first  # (G, R)
        R = y.shape[1]
        rows = []
        for j, ((o, r), (_, act)) in enumerate(zip(self.spans, terms)):
            h = y[j, o : o + r]
            rows.append(F.pad(h if act is None else act(h), (o, R - o - r)))
        return list((torch.stack(rows) @ self.second).unsqueeze(1).unbind(0))


def group_products(net, layers) -> int:
    """Run each of ``layers``' product groups (models' product_groups) as one batched product
    (StackedLinears, LowRankGroup) on its device; returns how many groups were formed. Groups
    whose members differ in shape or type keep their separate products."""
    n = 0
    for i in layers:
        linears, low_ranks = net.product_groups(i)
        for names in linears:
            lins = [net.lin[name] for name in names]
            if StackedLinears.fits(lins):
                net.groups[names] = StackedLinears(lins)
                n += 1
        for pairs in low_ranks:
            group = LowRankGroup([net.f32(a) for a, _ in pairs], [net.f32(b) for _, b in pairs])
            for (a, b), (va, vb) in zip(pairs, group.views()):
                net.w[a], net.w[b] = va, vb
            net.groups[pairs] = group
            n += 1
    return n


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class TorchStep:
    """One token for each of B independent sequences through ``net`` (a models.vX instance).

    Returns (logits (B, V) float32, list of B new States); the given states are unchanged.
    ``graphs=True`` (CUDA only) replays a captured CUDA graph per batch size; a batch size whose
    step cannot be captured runs eagerly, with a warning (``graph_errors`` says why).
    """

    def __init__(self, net, state_device, graphs: bool = False, compile: bool = False):
        self.net = net
        self.version = net.cfg.version
        self.state_device = torch.device(state_device)
        self.graphs = bool(graphs)
        self.graph_errors: dict = {}  # padded batch size -> why its capture failed
        self.compile_error: str | None = None
        self._graphs: dict = {}  # padded batch size -> (graph, static inputs, static outputs)
        # batches of B > 1: vmapped over the sequences, on a shallow copy of the model (same
        # weights) that keeps only the product groups vmap runs well
        self._vnet = copy.copy(net)
        self._vnet.groups = {k: g for k, g in net.groups.items() if g.vmaps}
        self._vstep = torch.func.vmap(functools.partial(self._one, net=self._vnet))
        # batches of one: the fused (compiled) step when asked for; larger batches stay vmapped
        self._single = torch.compile(self._one, dynamic=False) if compile else self._one

    def _one(self, tok, att_x, ffn_x, wkv, net=None):
        """tok (1,), att_x/ffn_x (L, C), wkv (L, ...) -> logits (V,), att_x', ffn_x', wkv'."""
        net = self.net if net is None else net
        x, new = net.hidden(tok, State(self.version, att_x, ffn_x, wkv, 0))
        return net.head(x[-1]), new.att_x, new.ffn_x, new.wkv

    def _eager(self, tok, att_x, ffn_x, wkv):
        if tok.shape[0] == 1:
            return tuple(t.unsqueeze(0) for t in self._single(tok[0], att_x[0], ffn_x[0], wkv[0]))
        return self._vstep(tok, att_x, ffn_x, wkv)

    def __call__(self, token: int, state: State):
        logits, (new,) = self.batch([token], [state])
        return logits[0], new

    def batch(self, tokens: list, states: list):
        if len(tokens) > MAX_GRAPH_BATCH:
            out, news = [], []
            for i in range(0, len(tokens), MAX_GRAPH_BATCH):
                lg, ns = self.batch(
                    tokens[i : i + MAX_GRAPH_BATCH], states[i : i + MAX_GRAPH_BATCH]
                )
                out.append(lg)
                news += ns
            return torch.cat(out), news
        B = len(tokens)
        if self.graphs and _pow2(B) not in self.graph_errors:
            outs = self._replay(tokens, states)
        else:
            outs = self._eager(*self._inputs(tokens, states))
        logits, att_x, ffn_x, wkv = outs
        return logits, [
            State(s.version, att_x[b], ffn_x[b], wkv[b], s.n_tokens + 1)
            for b, s in enumerate(states)
        ]

    def _inputs(self, tokens, states):
        """(tokens (B, 1), att_x (B, L, C), ffn_x, wkv (B, L, ...)) on the state device."""
        tok = torch.as_tensor(tokens, dtype=torch.long).view(-1, 1).to(self.state_device)
        return [tok] + [torch.stack([getattr(s, f) for s in states]) for f in FIELDS]

    # -- CUDA graphs -------------------------------------------------------------------------------
    def _replay(self, tokens: list, states: list):
        B = len(tokens)
        Bp = _pow2(B)
        entry = self._graphs.get(Bp)
        if entry is None:
            ins = self._inputs(tokens, states)
            static = [
                torch.zeros((Bp,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device) for t in ins
            ]
            try:
                entry = self._graphs[Bp] = (self._capture(static), static)
            except Exception as e:  # noqa: BLE001 - any capture failure: run eagerly instead
                if Bp == 1 and self._single is not self._one:  # torch.compile failed: unfused
                    self.compile_error = f"{type(e).__name__}: {e}"
                    warnings.warn(
                        f"rwkvpy: torch.compile failed, decoding unfused ({self.compile_error})",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    self._single = self._one
                    torch.cuda.synchronize()
                    return self._replay(tokens, states)
                why = self.graph_errors[Bp] = f"{type(e).__name__}: {e}"
                warnings.warn(
                    f"rwkvpy: CUDA graph capture failed for batch size {Bp}, decoding "
                    f"eagerly ({why})",
                    RuntimeWarning,
                    stacklevel=3,
                )
                torch.cuda.synchronize()
                return self._eager(*ins)
        (graph, outs), static = entry
        if B == 1:  # one sequence: no stacking, and the token written by a kernel (fill_)
            static[0][0].fill_(tokens[0])  # rather than copied from host memory
            for dst, f in zip(static[1:], FIELDS):
                dst[0].copy_(getattr(states[0], f))
        else:
            for dst, src in zip(static, self._inputs(tokens, states)):
                dst[:B].copy_(src)
        graph.replay()
        return [o[:B].clone() for o in outs]  # the next replay overwrites the graph's outputs

    def _capture(self, static: list):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture (cuBLAS workspaces, caches)
            for _ in range(2):
                self._eager(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = self._eager(*static)
        return graph, outs
