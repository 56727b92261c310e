"""Linears for the K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): ggml's super-blocks of 256 weights,
multiplied by the kernels of kernels/ir/kquants.py and kquants_x8.py (numba drivers:
kernels/linear/kquant_drivers.py). :func:`kernels.linear.make_linear` hands K-quant weights to
:func:`make_kquant_linear`.

==============  ================================================================================
policy          kernel
==============  ================================================================================
exact           :class:`KQuantLinear`: ggml's rows as stored (a file's memory map, no copy), each
                weight decoded exactly as ggml's ``dequantize_row_*_K``, float32 activations,
                float32 lanes (fused multiply-add): ``x @ dequantize(W).T`` in float32 up to
                summation order
fast (avx2+)    Q4_K, Q5_K, Q6_K: :class:`KQuantX8Linear`: the rows repacked once into groups of
                8 interleaved rows (cached: kernels/cache.py), activations rounded per 256 values
                to int8 as ggml's Q8_K (one scale amax/127), integer products (vpmaddubsw,
                vpmaddwd): llama.cpp's own method, so the same error as llama.cpp's CPU
                products. Q2_K, Q3_K: :class:`KQuantDotLinear`, the same method on ggml's rows
fast, generic   :class:`KQuantLinear`
==============  ================================================================================

Prompts: :class:`KQuantX8Linear` takes every T with its integer kernels (4 vectors per pass over
the codes); the row kernels take a few vectors, and above that the rows are dequantized in tiles
(bit-exact) and multiplied by torch's float32 GEMM (exact in both policies; far faster per flop
than a row kernel run once per vector). Every class has a numba spec
(kernels.linear.row_product), so the fused one-token step (kernels/decode/) runs whole-layer
numba blocks on K-quant models too.
"""

from __future__ import annotations

import numpy as np
import torch

from ..formats.base import QTensor, release_pages
from ..quant import get_format
from .linear.classes import NUMBA_MAX_T, DequantLinear, Linear, _rows_view, _shape2
from .linear.spec import K_ROWS, K_ROWS_INT8, K_X8
from .linear.threads import HAVE_NUMBA, _rows_kernel
from .linear.tiles import _tiled_dequant_mm

#: ggml's names of the formats served here (super-blocks of 256).
KQUANT_FORMATS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
#: The formats of KQuantX8Linear (policy fast, CPU level avx2 and up).
KQUANT_X8_FORMATS = ("Q4_K", "Q5_K", "Q6_K")
#: Largest T for which KQuantDotLinear runs its integer row kernels; above, exact tiles + GEMM
#: (the row kernel reads each row once per vector from L1, compute-bound).
KQUANT_DOT_MAX_T = 4

if HAVE_NUMBA:
    from .linear import kquant_drivers as _k


def _chunk(n_out: int, n: int) -> int:
    """Rows per chunk of a row-parallel kernel on n threads: 8 chunks per thread."""
    return max(1, -(-n_out // (8 * n)))


class KQuantLinear(Linear):
    """K-quant weights as ggml's super-blocks, exact products (see the module docstring)."""

    strategy = "numba-kblocks"
    rows_max_t = NUMBA_MAX_T
    _spec_mode = K_ROWS

    def __init__(self, w: QTensor):
        if not HAVE_NUMBA:  # pragma: no cover
            raise RuntimeError(f"{type(self).__name__} needs numba")
        fmt = self._check(w)
        self.fmt = fmt.name
        self.out_features, self.in_features = _shape2(w.shape)
        self._raw2 = _rows_view(w, fmt, self.out_features, self.in_features)
        self._kind = _k.KIND[fmt.name]
        self.nbytes = int(self._raw2.nbytes)

    _formats = KQUANT_FORMATS

    def _check(self, w: QTensor):
        fmt = get_format(w.fmt)
        if fmt.name not in self._formats:
            raise ValueError(
                f"{type(self).__name__} reads {'/'.join(self._formats)}, got {fmt.name}"
            )
        return fmt

    def numba_spec(self):
        # Linear._rows runs kernels.linear.row_product on this spec: kquant_drivers' mv_rows /
        # mv_par (K_ROWS), mvq / mvq_par (K_ROWS_INT8), mvx8 / mvx8_par (K_X8)
        return self._cached_spec(self._spec_mode, self._raw2)

    def _gemm(self, x):
        kind, raw2 = self._kind, self._raw2
        return _tiled_dequant_mm(
            lambda out, r0, r1: _k.dec_rows(kind, raw2, out, r0, r0, r1),
            lambda out, r0, r1, chunk: _k.dec_par(kind, raw2, out, r0, r1, chunk),
            x,
            self.out_features,
        )


class KQuantDotLinear(KQuantLinear):
    """K-quant weights, activations rounded to Q8_K-like int8 blocks, integer products (x86
    AVX2; ``policy="fast"``) on ggml's rows as stored: Q2_K and Q3_K. Lossy through the
    activations only: each block of 256 values is rounded with its own scale amax/127, as
    llama.cpp rounds them for these formats."""

    strategy = "int8-dot-k"
    exact = False
    rows_max_t = KQUANT_DOT_MAX_T
    _spec_mode = K_ROWS_INT8


class KQuantX8Linear(KQuantLinear):
    """Q4_K, Q5_K, Q6_K weights repacked once into groups of 8 interleaved rows (the same bytes,
    moved, Q5_K's and Q6_K's codes recoded: kernels/ir/kquants_x8.py, X8_FIELDS and X8_RECODE),
    activations rounded to Q8_K-like int8 blocks, integer products with each row's sum in its
    own lane (``policy="fast"``, CPU level avx2 and up). The same integers as :class:`KQuantDotLinear`'s products on ggml's rows (llama.cpp's
    method), summed in float32 in another order.

    Every T runs the integer kernels: one vector reads X8_STREAMS groups at once on each
    thread; prompts take 4 vectors per pass over a group's codes.

    Memory: the repacked groups replace the file's bytes (its pages are released after
    repacking; the rows past the last whole group stay as ggml's rows). ``repacked()`` gives
    them to the repack cache, so that a later load memory-maps them instead of repacking.
    """

    strategy = "int8-dot-kx8"
    exact = False
    rows_max_t = 1 << 62  # every T: the integer kernels
    _formats = KQUANT_X8_FORMATS

    def __init__(self, w: QTensor, repacked: dict | None = None):
        if not HAVE_NUMBA:  # pragma: no cover
            raise RuntimeError("KQuantX8Linear needs numba")
        fmt = self._check(w)
        self.fmt = fmt.name
        O, K = self.out_features, self.in_features = _shape2(w.shape)
        self._kind = _k.KIND[fmt.name]
        self._table = _k.x8_table(self._kind)
        row_bytes = fmt.nbytes((1, K))
        shapes = {"x8": (O // 8, 8 * row_bytes), "tail": (O % 8, row_bytes)}
        if repacked is not None and all(
            isinstance(repacked.get(k), torch.Tensor)
            and repacked[k].dtype == torch.uint8
            and tuple(repacked[k].shape) == v
            for k, v in shapes.items()
        ):
            self._pk = repacked["x8"].numpy()
            self._tail = repacked["tail"].numpy()
        else:
            raw2 = _rows_view(w, fmt, O, K)
            pk = np.empty(shapes["x8"], np.uint8)
            table = self._table
            _rows_kernel(
                lambda: _k.repack_groups(table, raw2, pk, 0, pk.shape[0]),
                lambda n: _k.repack_par(table, raw2, pk, max(1, _chunk(O, n) // 8)),
                O,
                K,
            )
            self._pk = pk
            self._tail = np.array(raw2[8 * (O // 8) :])
            release_pages(raw2)  # the file's copy is not read again
        self.nbytes = int(self._pk.nbytes + self._tail.nbytes)

    def repacked(self) -> dict:
        return {"x8": torch.from_numpy(self._pk), "tail": torch.from_numpy(self._tail)}

    def numba_spec(self):
        return self._cached_spec(K_X8, self._pk, self._tail)

    def ggml_rows(self, r0: int, r1: int) -> np.ndarray:
        """ggml's bytes of rows [r0, r1) (r0 a multiple of 8), unpacked from the groups."""
        pk, tail = self._pk, self._tail
        n8 = 8 * pk.shape[0]
        out = np.empty((r1 - r0, tail.shape[1]), np.uint8)
        a = min(r1, n8)
        if a > r0:
            g0, g1 = r0 // 8, -(-a // 8)
            rows = np.empty((8 * (g1 - g0), tail.shape[1]), np.uint8)
            _k.unpack_groups(self._table, pk, rows, g0, g1)
            out[: a - r0] = rows[r0 - 8 * g0 : a - 8 * g0]
        out[a - r0 :] = tail[a - n8 : r1 - n8]
        return out

    def _gemm(self, x):  # not reached by __call__ (every T runs the integer kernels)
        kind = self._kind

        def dec(out, r0, r1):
            _k.dec_rows(kind, self.ggml_rows(r0, r1), out, 0, 0, r1 - r0)

        return _tiled_dequant_mm(
            dec, lambda out, r0, r1, chunk: dec(out, r0, r1), x, self.out_features
        )


def make_kquant_linear(w: QTensor, integer: bool, repacked: dict | None = None) -> Linear:
    """The linear of a K-quant weight: integer products where ``integer`` (policy fast on a CPU
    level with the integer kernels), else exact; dequantized to float32 without numba.
    ``repacked``: KQuantX8Linear's tensors of this weight from the repack cache, or None."""
    if not HAVE_NUMBA:  # pragma: no cover
        return DequantLinear(w)
    if not integer:
        return KQuantLinear(w)
    if get_format(w.fmt).name in KQUANT_X8_FORMATS:
        return KQuantX8Linear(w, repacked)
    return KQuantDotLinear(w)
