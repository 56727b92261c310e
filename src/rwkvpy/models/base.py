"""What every RWKV version shares: embedding, ln0, the layer loop, ln_out, the head.

Each version module (v4.py ... v7.py) subclasses :class:`RWKVBase` and supplies the tensor
shapes it needs, its time mix and its channel mix. Everything here is plain float32 torch:
the reference path that every fast path is tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..errors import MissingTensorError, TensorShapeError
from ..formats.base import QTensor, release_pages, to_float32, type_name
from ..state import State

ANY = None  # a dimension a spec does not fix


def lora_rank(weights, name, parts: int = 1):
    """The rank of a low-rank pair, read from its first matrix ``name``: its last dimension
    divided in ``parts`` equal parts (v6's fused time_maa_w1). The specs of both matrices use
    it, so that a second matrix of another rank, or a first one that does not split, is a
    TensorShapeError rather than a failed product. ANY when ``name`` is missing (reported as
    missing)."""
    t = weights.get(name)
    if t is None or len(t.shape) == 0:
        return ANY
    return int(t.shape[-1]) // parts


def _squeezed(shape):
    return tuple(int(s) for s in shape if s != 1)


def _fits(actual, expected) -> bool:
    a = _squeezed(actual)
    e = [d for d in expected if d != 1]
    return (
        len(a) == len(e)
        and all(y > 0 for y in a)  # no weight has an empty dimension
        and all(x is None or x == y for x, y in zip(e, a))
    )


LINEAR_SUFFIXES = (
    "key.weight",
    "value.weight",
    "receptance.weight",
    "output.weight",
    "gate.weight",
)


def is_linear(name: str) -> bool:
    """The big projection matrices every token multiplies: the ones fast paths store specially."""
    return name == "head.weight" or (name.startswith("blocks.") and name.endswith(LINEAR_SUFFIXES))


CPU = torch.device("cpu")


class Float32Linear:
    """The reference matrix product: W (out, in) in float32, y = x @ W^T."""

    def __init__(self, w, device=CPU, name=None):
        self.fmt = type_name(w)  # as stored in the file
        self.weight = to_float32(w).to(device)
        self.nbytes = self.weight.numel() * 4  # read per product

    def __call__(self, x):
        return x @ self.weight.t()


@dataclass(frozen=True)
class Backend:
    """The pieces a fast path may replace: how matrices are stored and multiplied
    (``make_linear(w, device, name)``), and how the v5/v6 and v7 recurrences run over a sequence.
    The default is the float32 reference."""

    name: str = "reference"
    make_linear: Callable = Float32Linear
    wkv4: Callable | None = None  # same contract as models.v4.wkv4
    wkv5: Callable | None = None  # same contract as models.v5.wkv_heads
    wkv7: Callable | None = None  # same contract as models.v7.wkv7


REFERENCE = Backend()


class RWKVBase:
    """A loaded RWKV model in float32 torch. Subclasses define the per-version math.

    ``LOW_RANK``: name suffixes of small low-rank matrices that stay float16/bfloat16 on the
    CPU when the file stores them so (read through :meth:`f32`). ``LOW_RANK_COLUMNS``: those
    of them (first matrices, x @ W) held column by column on the CPU (W (C, D) as the
    transpose of a contiguous (D, C) tensor), which the one-token step reads as D dot
    products over whole columns (kernels/decode/); the same values, any product works on them.

    ``devices``: the torch device of each layer (default: all on the CPU). The embedding and
    ln0 live with the first layer, ln_out and the head with the last; activations and each
    layer's slice of the state move to the layer's device as the layers are run.
    """

    LOW_RANK: tuple = ()
    LOW_RANK_COLUMNS: tuple = ()

    def __init__(
        self,
        cfg: ModelConfig,
        weights: dict,
        path="<model>",
        backend: Backend = REFERENCE,
        devices=None,
    ):
        self.cfg = cfg
        self.path = str(path)
        self.backend = backend
        self.devices = tuple(torch.device(d) for d in devices) if devices else (CPU,) * cfg.n_layer
        if len(self.devices) != cfg.n_layer:
            raise ValueError(f"{len(self.devices)} devices for {cfg.n_layer} layers")
        self.w: dict[str, torch.Tensor] = {}
        self.lin: dict = {}
        #: products a device runs together (kernels/gpu.py group_products): a tuple of linear
        #: names -> one batched product, a tuple of low-rank (first, second) pairs -> two products
        self.groups: dict = {}
        C, V = cfg.n_embd, cfg.vocab_size
        spec = {
            "emb.weight": (V, C),
            "blocks.0.ln0.weight": (C,),
            "blocks.0.ln0.bias": (C,),
            "ln_out.weight": (C,),
            "ln_out.bias": (C,),
            "head.weight": (V, C),
        }
        for i in range(cfg.n_layer):
            p = f"blocks.{i}."
            spec.update(
                {
                    p + "ln1.weight": (C,),
                    p + "ln1.bias": (C,),
                    p + "ln2.weight": (C,),
                    p + "ln2.bias": (C,),
                }
            )
            spec.update(self.layer_shapes(i, p, weights))
        for name, shape in spec.items():
            if name not in weights:
                raise MissingTensorError(
                    self.path, f"tensor '{name}' not found ({cfg.version.label} needs it)"
                )
            t = weights[name]
            if not _fits(t.shape, shape):
                want = tuple("*" if d is None else d for d in shape)
                raise TensorShapeError(
                    self.path,
                    f"tensor '{name}' has shape {tuple(t.shape)}, "
                    f"expected {want} for {cfg.version.label} "
                    f"(n_embd={C}, vocab={V})",
                )
            dev = self.device_of(name)
            if is_linear(name):
                self.lin[name] = backend.make_linear(t, dev, name)
            elif name == "emb.weight" and not isinstance(t, QTensor):
                self.w[name] = t.to(dev)  # rows are converted to float32 as they are looked up
            else:
                # LOW_RANK matrices stored 16-bit stay so on the CPU: the one-token step reads them
                # at memory speed (kernels/decode/), the model code widens them (self.f32)
                columns = (
                    dev.type == "cpu" and name.endswith(self.LOW_RANK_COLUMNS) and len(t.shape) == 2
                )
                if (
                    dev.type == "cpu"
                    and name.endswith(self.LOW_RANK)
                    and not isinstance(t, QTensor)
                    and t.dtype in (torch.float16, torch.bfloat16, torch.float32)
                ):
                    if not columns and not t.is_contiguous():  # a transposed view of the file
                        c = t.contiguous()
                        release_pages(t)
                        t = c
                else:
                    t = to_float32(t).to(dev)  # dequantizes block-quantized tensors
                if columns and not t.t().is_contiguous():  # (a transposed file's view already is)
                    c = t.t().contiguous()
                    release_pages(t)  # (nothing to release in a dequantized copy)
                    t = c.t()
                self.w[name] = t.reshape(shape) if all(d is not None for d in shape) else t
        self.prepare()

    # -- to override -----------------------------------------------------------------------
    def layer_shapes(self, i: int, p: str, weights: dict) -> dict:
        raise NotImplementedError

    def prepare(self) -> None:
        """Reshape or precompute per-layer tensors after validation (optional)."""

    def product_groups(self, i: int) -> tuple:
        """Layer i's products that take different inputs but no result of each other:
        (tuples of linear names, tuples of low-rank (first, second) name pairs). The model code
        runs them through :meth:`mm_group` and :meth:`low_rank`; a device may run each tuple as
        one batched product (one kernel instead of several)."""
        return (), ()

    def time_mix(self, i, x, att_x, wkv, ctx):
        """x (T, C) = ln1 output; returns (out (T, C), new wkv state of this layer)."""
        raise NotImplementedError

    def channel_mix(self, i, x, ffn_x):
        """x (T, C) = ln2 output; returns out (T, C)."""
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------
    def device_of(self, name: str) -> torch.device:
        """The device a tensor lives on: its layer's; emb and ln0 the first, the rest the last."""
        if name.startswith("blocks."):
            return self.devices[int(name.split(".", 2)[1])]
        return self.devices[0] if name == "emb.weight" else self.devices[-1]

    def f32(self, name):
        """A weight as float32 (the LOW_RANK matrices may be kept float16/bfloat16 on the CPU)."""
        t = self.w[name]
        return t if t.dtype == torch.float32 else t.float()

    def ln(self, x, name):
        return F.layer_norm(
            x,
            (x.shape[-1],),
            self.w[name + ".weight"],
            self.w[name + ".bias"],
            eps=self.cfg.layer_norm_eps,
        )

    @staticmethod
    def shift(x, prev):
        """Token shift: the previous token's vector for every position. x (T, C), prev (C,)."""
        return torch.cat([prev.unsqueeze(0), x[:-1]], dim=0)

    def hidden(self, tokens: torch.Tensor, state: State):
        """Run the blocks over tokens (T,) from state; returns (x (T, C) after ln_out, new State)."""
        w = self.w
        emb = w["emb.weight"]
        x = self.ln(emb[tokens.to(emb.device)].float(), "blocks.0.ln0")  # (T, C)
        att_x, ffn_x, wkv = [], [], []
        ctx: dict = {}
        for i, dev in enumerate(self.devices):
            if x.device != dev:  # a layer split across devices: activations follow the layers
                x = x.to(dev)
                ctx = {k: v.to(dev) for k, v in ctx.items()}
            p = f"blocks.{i}."
            xx = self.ln(x, p + "ln1")
            out, s = self.time_mix(i, xx, state.att_x[i].to(dev), state.wkv[i].to(dev), ctx)
            x = x + out
            att_x.append(xx[-1].clone())  # a view would keep the whole (T, C) tensor alive
            wkv.append(s)
            xx = self.ln(x, p + "ln2")
            x = x + self.channel_mix(i, xx, state.ffn_x[i].to(dev))
            ffn_x.append(xx[-1].clone())
        x = self.ln(x, "ln_out")
        sdev = state.device  # each layer's new slice goes back to where the state lives

        def stack(ts):
            return torch.stack([t.to(sdev) for t in ts])

        new = State(
            state.version,
            stack(att_x),
            stack(ffn_x),
            stack(wkv),
            state.n_tokens + int(tokens.shape[0]),
        )
        return x, new

    def head(self, x):
        return self.mm(x, "head.weight")

    def mm(self, x, name):
        """x (..., in) @ W^T for one of the projection matrices (see is_linear)."""
        return self.lin[name](x)

    def mm_group(self, xs, names):
        """[x @ W_n^T for x, n in zip(xs, names)]."""
        g = self.groups.get(names)
        return g(xs) if g is not None else [self.mm(x, n) for x, n in zip(xs, names)]

    def low_rank(self, pairs, terms):
        """[act(x @ A) @ B for (x, act), (A, B) in zip(terms, pairs)]: x (T, C), A (C, R),
        B (R, out); act a function or None."""
        g = self.groups.get(pairs)
        if g is not None and terms[0][0].shape[0] == 1:
            return g(terms)
        out = []
        for (x, act), (first, second) in zip(terms, pairs):
            h = x @ self.f32(first)
            out.append((h if act is None else act(h)) @ self.f32(second))
        return out

    def group_norm(self, x, name):
        """Per-head group norm (ln_x) of x (T, H*N)."""
        H = self.cfg.n_head
        return F.group_norm(
            x, H, self.w[name + ".weight"], self.w[name + ".bias"], eps=self.cfg.ln_x_eps
        )
