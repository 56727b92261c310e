"""Prompts through torch's float32 GEMM: the weights dequantized (bit-exact) or converted to
float32 in row tiles, each tile multiplied by torch, so that a long prompt never holds the whole
float32 matrix. Used above the T where the numba kernels' one pass per vector stops paying.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .threads import PARALLEL_LOCK, _numba_threads

#: Elements of one dequantized tile (float32) for the tiled GEMM path: 1 Mi elements = 4 MiB.
TILE_ELEMENTS = 1 << 20


def _tiled_dequant_mm(dec_rows, dec_par, x, n_out):
    """x (T, K) @ W^T: rows of W dequantized tile by tile (numba, bit-exact), then torch's
    float32 GEMM. ``dec_rows(out, r0, r1)`` and ``dec_par(out, r0, r1, chunk)`` write rows
    [r0, r1) of W as float32 to out[0:]."""
    T, K = x.shape
    rows = max(16, min(n_out, TILE_ELEMENTS // K) // 8 * 8)  # whole groups of 8 (Int8DotLinear)
    buf = torch.empty((rows, K), dtype=torch.float32)
    bn = buf.numpy()
    y = torch.empty((T, n_out), dtype=torch.float32)
    for r0 in range(0, n_out, rows):
        r1 = min(n_out, r0 + rows)
        if torch.get_num_threads() > 1 and PARALLEL_LOCK.acquire(blocking=False):
            try:
                n = _numba_threads()
                dec_par(bn, r0, r1, -(-(r1 - r0) // (32 * n)) * 8)
            finally:
                PARALLEL_LOCK.release()
        else:
            dec_rows(bn, r0, r1)
        y[:, r0:r1] = F.linear(x, buf[: r1 - r0])
    return y


def _tiled_convert_mm(w, x):
    """x (T, K) float32 @ w^T for 16-bit w: tiles of w converted to float32 (exact), float32
    GEMM."""
    n_out, K = w.shape
    rows = max(16, min(n_out, TILE_ELEMENTS // K))
    y = torch.empty((x.shape[0], n_out), dtype=torch.float32)
    for r0 in range(0, n_out, rows):
        r1 = min(n_out, r0 + rows)
        y[:, r0:r1] = F.linear(x, w[r0:r1].float())
    return y
