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
    return {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}.get(
        t.dtype, str(t.dtype)
    )


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


_PAGE = 4096
_MADV_DONTNEED = 4  # Linux


def _file_mapping(addr: int):
    """(start, end) of the mapping of a file that holds ``addr`` in this process, else None."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if lo <= addr < hi:
                    inode = parts[4] if len(parts) > 4 else "0"
                    path = parts[5].strip() if len(parts) > 5 else ""
                    return (lo, hi) if inode != "0" and path.startswith("/") else None
    except OSError:  # pragma: no cover - not Linux
        return None
    return None


def release_pages(t) -> int:
    """Drop from this process's resident memory the pages of ``t`` (a torch tensor or numpy
    array) if it is a view of a
    memory-mapped model file that has been copied (converted, transposed) and will not be read
    again: the file stays mapped and a later read faults the same bytes in from the file.

    Only whole pages inside ``t`` and inside one file mapping are released (``madvise``
    MADV_DONTNEED); anonymous memory (an in-memory tensor) is never touched, since there it would
    lose the data. Returns the bytes released (0 where nothing applies, or off Linux).
    """
    if isinstance(t, np.ndarray):  # a numpy view (QTensor data)
        if t.size == 0 or not t.flags.c_contiguous:
            return 0
        start, nbytes = t.ctypes.data, t.nbytes
    else:
        if t.device.type != "cpu" or t.numel() == 0:
            return 0
        # contiguous, or a permutation of contiguous memory (a transposed view)
        span = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
        if span != t.numel() or any(s < 0 for s in t.stride()):
            return 0
        start, nbytes = t.data_ptr(), t.numel() * t.element_size()
    end = start + nbytes
    span = _file_mapping(start)
    if span is None or end > span[1]:
        return 0
    lo = -(-start // _PAGE) * _PAGE
    hi = end // _PAGE * _PAGE
    if hi <= lo:
        return 0
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED) != 0:
            return 0
    except (OSError, AttributeError):  # pragma: no cover - no libc madvise
        return 0
    return hi - lo
