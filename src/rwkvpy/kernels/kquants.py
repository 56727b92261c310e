"""Linears for the K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): ggml's super-blocks of 256 weights
read as stored (a file's memory map, no copy, no repacking), with the kernels of
kernels/kquants_ir.py. :func:`kernels.linear.make_linear` hands K-quant weights to
:func:`make_kquant_linear`.

=============  ================================================================================
policy         kernel
=============  ================================================================================
exact          :class:`KQuantLinear`: each weight decoded exactly as ggml's
               ``dequantize_row_*_K``, float32 activations, float32 lanes (fused multiply-add):
               ``x @ dequantize(W).T`` in float32 up to summation order
fast (avx2+)   :class:`KQuantDotLinear`: activations rounded per 256 values to int8 as ggml's
               Q8_K (one scale amax/127), integer products (vpmaddubsw, vpmaddwd): llama.cpp's
               own method, so the same error as llama.cpp's CPU products
fast, generic  :class:`KQuantLinear`
=============  ================================================================================

Prompts: above a few vectors the rows are dequantized in tiles (bit-exact) and multiplied by
torch's float32 GEMM (exact in both policies; far faster per flop than a row kernel run once
per vector). The fused one-token step (kernels/fused.py) runs these products step by step from
Python: they have no numba spec of kernels.linear.row_product.
"""

from __future__ import annotations

import numpy as np

from ..formats.base import QTensor
from ..quant import get_format
from .linear import (HAVE_NUMBA, NUMBA_MAX_T, DequantLinear, Linear, _rows_kernel, _rows_view,
                     _shape2, _tiled_dequant_mm)

#: ggml's names of the formats served here (super-blocks of 256).
KQUANT_FORMATS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
#: Largest T for which KQuantDotLinear runs its integer row kernels; above, exact tiles + GEMM
#: (the row kernel reads each row once per vector from L1, compute-bound).
KQUANT_DOT_MAX_T = 4

if HAVE_NUMBA:
    from . import kquants_ir as _k


def _chunk(n_out: int, n: int) -> int:
    """Rows per chunk of a row-parallel kernel on n threads: 8 chunks per thread."""
    return max(1, -(-n_out // (8 * n)))


class KQuantLinear(Linear):
    """K-quant weights as ggml's super-blocks, exact products (see the module docstring)."""

    strategy = "numba-kblocks"
    rows_max_t = NUMBA_MAX_T

    def __init__(self, w: QTensor):
        if not HAVE_NUMBA:  # pragma: no cover
            raise RuntimeError("KQuantLinear needs numba")
        fmt = get_format(w.fmt)
        if fmt.name not in KQUANT_FORMATS:
            raise ValueError(f"{type(self).__name__} reads {'/'.join(KQUANT_FORMATS)}, got "
                             f"{fmt.name}")
        self.fmt = fmt.name
        self.out_features, self.in_features = _shape2(w.shape)
        self._raw2 = _rows_view(w, fmt, self.out_features, self.in_features)
        self._kind = _k.KIND[fmt.name]
        self.nbytes = int(self._raw2.nbytes)

    def _rows(self, xn: np.ndarray) -> np.ndarray:
        kind, raw2, O = self._kind, self._raw2, self.out_features
        y = np.empty((xn.shape[0], O), np.float32)
        _rows_kernel(lambda: _k.mv_rows(kind, raw2, xn, y, 0, O),
                     lambda n: _k.mv_par(kind, raw2, xn, y, _chunk(O, n)), O, self.in_features)
        return y

    def _gemm(self, x):
        kind, raw2 = self._kind, self._raw2
        return _tiled_dequant_mm(
            lambda out, r0, r1: _k.dec_rows(kind, raw2, out, r0, r0, r1),
            lambda out, r0, r1, chunk: _k.dec_par(kind, raw2, out, r0, r1, chunk),
            x, self.out_features)


class KQuantDotLinear(KQuantLinear):
    """K-quant weights, activations rounded to Q8_K-like int8 blocks, integer products (x86
    AVX2; ``policy="fast"``). Lossy through the activations only: each block of 256 values is
    rounded with its own scale amax/127, as llama.cpp rounds them for these formats."""

    strategy = "int8-dot-k"
    exact = False
    rows_max_t = KQUANT_DOT_MAX_T

    def _rows(self, xn: np.ndarray) -> np.ndarray:
        kind, raw2, O = self._kind, self._raw2, self.out_features
        y = np.empty((xn.shape[0], O), np.float32)
        _rows_kernel(lambda: _k.mvq(kind, raw2, xn, y),
                     lambda n: _k.mvq_par(kind, raw2, xn, y, _chunk(O, n)), O, self.in_features)
        return y


def make_kquant_linear(w: QTensor, integer: bool) -> Linear:
    """The linear of a K-quant weight: integer products where ``integer`` (policy fast on a CPU
    level with the integer kernels), else exact; dequantized to float32 without numba."""
    if not HAVE_NUMBA:  # pragma: no cover
        return DequantLinear(w)
    return KQuantDotLinear(w) if integer else KQuantLinear(w)
