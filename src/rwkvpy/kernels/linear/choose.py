"""Which linear serves a weight: :func:`make_linear`, the one place that picks a class for a
weight's format, the policy and the CPU's capability level (the table in kernels.linear's
docstring).
"""

from __future__ import annotations

import torch

from ...formats.base import QTensor
from ...quant import get_format
from ..cpu import CpuKernels, host_kernels, integer_kernels_run
from .classes import (
    BlockLinear,
    DequantLinear,
    F32Linear,
    FloatLinear,
    Int8DotLinear,
    Int16DotLinear,
    Linear,
    _qtensor_to_torch,
    _shape2,
    _torch_fmt,
)
from .threads import HAVE_NUMBA

POLICIES = ("exact", "fast")
#: Formats whose ``policy="fast"`` is :class:`Int8DotLinear` where the CPU has AVX2.
#: Not Q8_0: with 8-bit weights the activations' rounding doubles the format's own error
#: (docs/performance.md, "Speed"), where it adds a small fraction of Q4/Q5's.
INT8_DOT_FORMATS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1")
#: Formats whose ``policy="fast"`` is :class:`Int16DotLinear` where the CPU has AVX2 (16-bit
#: activations: added error well under 1 % of Q8_0's own on the fixtures).
INT16_DOT_FORMATS = ("Q8_0",)


def _int8_dot() -> bool:
    """Whether the integer kernels can run here (numba, compiling for an AVX2 CPU)."""
    return HAVE_NUMBA and integer_kernels_run()


def make_linear(
    w, policy: str = "exact", repacked: dict | None = None, cpu: CpuKernels | None = None
) -> Linear:
    """The linear for weight ``w`` (a torch float tensor, F32/F16/BF16, or a :class:`QTensor`;
    shape (out, in)) under ``policy``, "exact" or "fast" (see the module docstring), with the
    kernels of ``cpu`` (kernels.cpu; None: the host's level).
    ``repacked``: the tensors a repacking linear made from this very weight before (its
    ``repacked()``, kept by kernels.cache), used instead of repacking again."""
    if policy not in POLICIES:
        raise ValueError(f"policy {policy!r} is not one of {', '.join(POLICIES)}")
    if isinstance(w, QTensor):
        fmt = get_format(w.fmt)
        if not fmt.quantized:
            return make_linear(_qtensor_to_torch(w), policy, cpu=cpu)
        _shape2(w.shape)
        integer = policy == "fast" and _int8_dot() and (cpu or host_kernels()).int8_dot
        if fmt.block_size == 256:  # the K-quants: kernels/kquants.py
            from ..kquants import make_kquant_linear

            return make_kquant_linear(w, integer, repacked)
        if integer and fmt.name in INT8_DOT_FORMATS:
            return Int8DotLinear(w, repacked)
        if integer and fmt.name in INT16_DOT_FORMATS:
            return Int16DotLinear(w, repacked)
        if not HAVE_NUMBA:  # pragma: no cover
            return DequantLinear(w)
        return BlockLinear(w)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"make_linear takes a torch tensor or a QTensor, got {type(w).__name__}")
    _shape2(w.shape)
    if w.dtype in (torch.float32, torch.float16, torch.bfloat16) and HAVE_NUMBA:
        return FloatLinear(w)
    if w.dtype.is_floating_point:  # without numba: float32 (F16/BF16 converted, pages released)
        return F32Linear(w, fmt=_torch_fmt(w))
    raise TypeError(f"make_linear: unsupported weight dtype {w.dtype}")
