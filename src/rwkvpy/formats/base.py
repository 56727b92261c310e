"""What every reader hands over: a :class:`Checkpoint` in canonical form.

Canonical form = BlinkDL's tensor names, PyTorch shape order (rows = outputs), raw parameters
(no -exp(), exp(-exp()), transposes or concatenations a converter applied). Values are torch
tensors (zero-copy views of the file where the format allows) or :class:`QTensor` for ggml
block-quantized data, which stays in the file until someone asks for floats.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


class QTensor:
    """A block-quantized tensor: its format name, PyTorch-order shape and raw bytes (a view)."""

    def __init__(self, fmt: str, shape: tuple, data: np.ndarray):
        self.fmt = fmt
        self.shape = tuple(int(s) for s in shape)
        self.data = data

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def numel(self) -> int:
        return int(np.prod(self.shape))

    def dequantize(self) -> torch.Tensor:
        from ..quant import get_format

        return torch.from_numpy(get_format(self.fmt).dequantize(self.data, self.shape))

    def __repr__(self) -> str:
        return f"QTensor({self.fmt}, {self.shape})"


def type_name(t) -> str:
    """The storage type of a tensor as ggml names it: F32, F16, BF16, Q5_1, ..."""
    if isinstance(t, QTensor):
        return t.fmt
    return {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}.get(t.dtype, str(t.dtype))


def to_float32(t) -> torch.Tensor:
    if isinstance(t, QTensor):
        return t.dequantize()
    return t if t.dtype == torch.float32 else t.float()


@dataclass
class Checkpoint:
    path: str
    format: str  # "rwkv.cpp", "pth", ...
    tensors: dict  # canonical name -> torch.Tensor | QTensor
    file_types: dict  # canonical name -> type as stored in the file ("F32", "Q5_1", ...)
    file_size: int
    meta: dict = field(default_factory=dict)  # format facts: file version, header fields, ...
    ln_x_eps: float | None = None  # set where a format's own engine uses another eps

    @property
    def shapes(self) -> dict:
        return {k: tuple(v.shape) for k, v in self.tensors.items()}
