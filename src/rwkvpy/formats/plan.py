"""Writing model files: the list of tensors a file will hold, and the storage type of each.

A writer never holds the model in memory: it first builds a *plan*, a list of :class:`Entry`
(the output name, the canonical tensors it is made from, the transform, the output shape and
type), from tensor names and shapes alone, then produces and writes one entry at a time.

Shapes of the plan are found by running each transform on zero-stride stand-in tensors, so
the one piece of code that transforms the data also tells the shapes.

The storage-type policy is rwkv.cpp's, for every output format (see :func:`storage_type`):

* F16 (or BF16) for tensors of two or more dimensions, except the ones rwkv.cpp's converter
  (``python/convert_pytorch_to_ggml.py``) keeps in F32: ``.time_*`` parameters, v7's
  ``k_k``, ``k_a``, ``r_k``, ``x_rwkvag`` (the six ``x_*`` lerps), ``x_k``, ``w0``, ``a0``, ``v0``;
  1-D tensors stay F32;
* a block-quantized type only for tensors that are 2-D in rwkv.cpp's layout, except
  ``emb.weight``, ``head.weight`` (unless ``quantize_head``) and v7's ``w1, w2, a1, a2, v1,
  v2, g1, g2, r_k`` (rwkv.cpp's ``rwkv_tensor_needs_quant``); a tensor whose rows do not fill
  whole blocks keeps its float type (rwkv.cpp would refuse it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..config import ModelConfig, Version

# ------------------------------------------------------------------------------------------
# BlinkDL's shapes.

_VEC3 = {  # parameters BlinkDL's code keeps as (1, 1, C)
    Version.V4: {
        "att.time_mix_k",
        "att.time_mix_v",
        "att.time_mix_r",
        "ffn.time_mix_k",
        "ffn.time_mix_r",
    },
    Version.V6: {
        "att.time_maa_x",
        "att.time_maa_w",
        "att.time_maa_k",
        "att.time_maa_v",
        "att.time_maa_r",
        "att.time_maa_g",
        "att.time_decay",
        "ffn.time_maa_k",
        "ffn.time_maa_r",
    },
    Version.V7: {
        "att.x_r",
        "att.x_w",
        "att.x_k",
        "att.x_v",
        "att.x_a",
        "att.x_g",
        "att.w0",
        "att.a0",
        "att.v0",
        "att.k_k",
        "att.k_a",
        "ffn.x_k",
    },
}
_VEC3[Version.V5_0] = _VEC3[Version.V4]
_VEC3[Version.V5_2] = _VEC3[Version.V4] | {"att.time_mix_g"}

_LAYER = re.compile(r"^blocks\.(\d+)\.(.+)$")


def split_name(name: str) -> tuple[int | None, str]:
    """``"blocks.3.att.key.weight"`` -> ``(3, "att.key.weight")``; others -> ``(None, name)``."""
    m = _LAYER.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def blinkdl_shape(version: Version, cfg: ModelConfig, name: str, shape) -> tuple:
    """The shape BlinkDL's training code gives tensor ``name`` (readers may squeeze it)."""
    shape = tuple(int(s) for s in shape)
    _, leaf = split_name(name)
    n = 1
    for s in shape:
        n *= s
    if leaf in _VEC3[version]:
        return (1, 1, n)
    if (
        version is Version.V5_2
        and leaf in ("att.time_decay", "att.time_faaaa")
        or version is Version.V6
        and leaf == "att.time_faaaa"
        or version is Version.V7
        and leaf == "att.r_k"
    ):
        return (cfg.n_head, n // cfg.n_head)
    if version in (Version.V4, Version.V5_0) and leaf in ("att.time_decay", "att.time_first"):
        return (n,)
    return shape


# ------------------------------------------------------------------------------------------
# Plans.


@dataclass
class Entry:
    """One tensor of an output file.

    ``fn`` maps the float32 input tensors (in BlinkDL's shapes, in the order of ``inputs``) to
    the output tensor; ``None`` means the single input, reshaped to ``shape`` (a pure reshape:
    the writer may then stream it in row chunks, or copy quantized bytes unchanged).
    ``policy`` and ``policy_shape`` are the rwkv.cpp key and shape the type is decided on.
    """

    name: str
    inputs: tuple
    fn: Callable | None = None
    shape: tuple = ()
    policy: str = ""
    policy_shape: tuple = ()
    type: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def reshape_only(self) -> bool:
        return self.fn is None


def resolve_shapes(entries, shapes: dict, version: Version, cfg: ModelConfig) -> None:
    """Fill in each entry's output shape by running its transform on stand-in tensors.

    The stand-ins are zero-stride (no memory); only the few transformed tensors (small LoRA
    and time parameters) are materialized, briefly. (``meta`` tensors would do too, but their
    first use costs torch ~70 MB of memory for good.)
    """
    for e in entries:
        if e.fn is None:
            if not e.shape:
                e.shape = blinkdl_shape(version, cfg, e.inputs[0], shapes[e.inputs[0]])
            continue
        ins = [torch.zeros(()).expand(blinkdl_shape(version, cfg, n, shapes[n])) for n in e.inputs]
        e.shape = tuple(e.fn(ins).shape)


# -- rwkv.cpp's converter, tensor by tensor ---------------------------------------------------

_V7_LORA = {"att.w1", "att.w2", "att.a1", "att.a2", "att.v1", "att.v2", "att.g1", "att.g2"}
_V7_LERPS = ("att.x_r", "att.x_w", "att.x_k", "att.x_v", "att.x_a", "att.x_g")


def _rwkvcpp_fn(version: Version, leaf: str, n_head: int):
    """rwkv.cpp's converter transform for one tensor (after its ``.float()``), or None."""
    time = leaf.startswith(("att.time_", "ffn.time_"))
    steps = []
    if time:
        steps.append(lambda t: t.squeeze())
    if version is Version.V7:
        if leaf in _V7_LORA:
            steps.append(lambda t: t.transpose(0, 1))
    elif version is Version.V6:
        if leaf == "att.time_faaaa":
            steps.append(lambda t: t.unsqueeze(-1))
        if leaf in ("att.time_maa_w1", "att.time_decay_w1", "att.time_decay_w2"):
            steps.append(lambda t: t.transpose(0, 1))
        if leaf == "att.time_maa_w2":
            steps.append(lambda t: t.transpose(1, 2))
        if leaf == "att.time_decay":
            steps.append(lambda t: t.reshape(n_head, -1, 1))
    elif version in (Version.V5_0, Version.V5_2):
        if leaf == "att.time_decay":
            if version is Version.V5_2:
                steps.append(lambda t: torch.exp(-torch.exp(t)).unsqueeze(-1))
            else:
                steps.append(lambda t: torch.exp(-torch.exp(t)).reshape(-1, 1, 1))
        if leaf == "att.time_first":
            steps.append(lambda t: torch.exp(t).reshape(-1, 1, 1))
        if leaf == "att.time_faaaa":
            steps.append(lambda t: t.unsqueeze(-1))
    elif leaf == "att.time_decay":
        steps.append(lambda t: -torch.exp(t))
    if not steps:
        return None
    if time and len(steps) == 1:  # squeeze only: still a pure reshape
        return "squeeze"

    def fn(ts):
        t = ts[0]
        for s in steps:
            t = s(t)
        return t

    return fn


def _cat_lerps(ts):
    return torch.cat(ts, dim=0)


def rwkvcpp_entries(names, shapes: dict, version: Version, cfg: ModelConfig) -> list[Entry]:
    """What rwkv.cpp's converter writes for a checkpoint, in its order (the source's order).

    v7: the six ``att.x_*`` become ``att.x_rwkvag`` (concatenated in r, w, k, v, a, g order at
    the place of the first one) and layer 0's unused ``v0/v1/v2`` are dropped, as rwkv.cpp's
    loader rejects them.
    """
    entries = []
    fused = set()
    for name in names:
        bid, leaf = split_name(name)
        if version is Version.V7 and bid == 0 and leaf in ("att.v0", "att.v1", "att.v2"):
            continue
        if version is Version.V7 and leaf in _V7_LERPS:
            if bid in fused:
                continue
            fused.add(bid)
            p = f"blocks.{bid}."
            entries.append(Entry(p + "att.x_rwkvag", tuple(p + x for x in _V7_LERPS), _cat_lerps))
            continue
        fn = _rwkvcpp_fn(version, leaf, cfg.n_head)
        if fn == "squeeze":
            shape = tuple(int(s) for s in blinkdl_shape(version, cfg, name, shapes[name]) if s != 1)
            entries.append(Entry(name, (name,), None, shape=shape))
        else:
            entries.append(Entry(name, (name,), fn))
    resolve_shapes(entries, shapes, version, cfg)
    for e in entries:
        e.policy, e.policy_shape = e.name, e.shape
    return entries


# ------------------------------------------------------------------------------------------
# Storage types.

_KEEP_F32 = (".time_", ".k_k", ".k_a", ".r_k", ".x_rwkvag", ".x_k", ".w0", ".a0", ".v0")
_NO_QUANT = (
    "att.v1",
    "att.v2",
    "att.g1",
    "att.g2",
    "att.a1",
    "att.a2",
    "att.w1",
    "att.w2",
    "att.r_k",
)


def needs_quant(key: str, quantize_head: bool = False) -> bool:
    """rwkv.cpp's ``rwkv_tensor_needs_quant`` (``head.weight`` allowed with quantize_head)."""
    if key == "emb.weight" or (key == "head.weight" and not quantize_head):
        return False
    return not any(s in key for s in _NO_QUANT)


def storage_type(key: str, shape, target, quantize_head: bool = False) -> str:
    """The type a tensor gets in a file of type ``target`` (a WeightFormat), from its rwkv.cpp
    key and its shape in rwkv.cpp's layout."""
    if target.name == "F32":
        return "F32"
    half = "BF16" if target.name == "BF16" else "F16"
    base = half if len(shape) > 1 and not any(s in key for s in _KEEP_F32) else "F32"
    if (
        target.quantized
        and len(shape) == 2
        and needs_quant(key, quantize_head)
        and shape[-1] % target.block_size == 0
    ):
        return target.name
    return base
