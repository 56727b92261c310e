"""The numba glue every version's one-token block is made of: sigmoid and exp in vector code,
layer and group norm statistics, the token-shift mixes, the LoRAs' float products (summed in a
fixed number of parts, so that the numbers do not depend on the thread count), the gates, and
the products through kernels.linear.product.row_product; plus the views of the model's tensors
the kernels take.

For T = 1 the matrix-vector products are memory-bound and fast; what costs is everything between
them (dozens of tiny torch ops per layer, ~1 us each), so it all runs here, on numpy views of
torch tensors (no copies, no second thread pool).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from ..ir import vecmath as _vm
from ..kinds import Kind
from ..linear.dispatch import by_kind
from ..linear.product import row_product
from ..linear.rows import _float_at, _mv_par, _mv_rows

_F16, _F32 = int(Kind.F16), int(Kind.F32)
#: rows of a float kind scaled and added into one output (dispatch.by_kind)
_axpys = by_kind((_vm.axpys_f16, _vm.axpys_bf16, _vm.axpys_f32), _F16)


@numba.njit(inline="always", cache=True, nogil=True)
def _sig(x):
    """sigmoid(x) in float32."""
    return np.float32(1.0) / (np.float32(1.0) + np.float32(math.exp(-x)))


@numba.njit(cache=True, nogil=True)
def _vexp(x):
    """x = exp(x) in place (float32 1-D): kernels.ir.vecmath.exp8_f32, 8 values at a time (the last
    ones through a padded copy: every value gets the same function)."""
    n = x.shape[0]
    n8 = n // 8
    _vm.exp8_f32(x, x, n8)
    if n > 8 * n8:
        # element loops, not slice copies: a slice copy brings numba's shape-mismatch error
        # (message formatting, ~150 KB of IR) into this function and every caller's compile
        t = np.zeros(8, np.float32)
        for j in range(8 * n8, n):
            t[j - 8 * n8] = x[j]
        _vm.exp8_f32(t, t, 1)
        for j in range(8 * n8, n):
            x[j] = t[j - 8 * n8]


@numba.njit(cache=True, nogil=True)
def _vsigmoid(x):
    """x = sigmoid(x) = 1 / (1 + exp(-x)) in place (float32 1-D; exp in vector code: _vexp)."""
    one = np.float32(1.0)
    for j in range(x.shape[0]):
        x[j] = -x[j]
    _vexp(x)
    for j in range(x.shape[0]):
        x[j] = one / (one + x[j])


@numba.njit(inline="always", cache=True, nogil=True)
def _dot(a, b):
    """sum(a * b) over a's length (float32): explicit vector code (kernels.ir.vecmath.dot16_f32),
    then a scalar tail; the same sum in every function that inlines it."""
    n = a.shape[0]
    n16 = n // 16
    s = _vm.dot16_f32(a, b, n16)
    for j in range(16 * n16, n):
        s += a[j] * b[j]
    return s


@numba.njit(cache=True, nogil=True)
def _norm_stats(out, eps):
    """Mean and 1/sqrt(variance + eps) of one head's output (group norm statistics)."""
    N = out.shape[0]
    mean = np.float32(0.0)
    for i in range(N):
        mean += out[i]
    mean /= N
    var = np.float32(0.0)
    for i in range(N):
        d = out[i] - mean
        var += d * d
    return mean, np.float32(1.0) / np.float32(math.sqrt(var / N + eps))


@numba.njit(cache=True, nogil=True)
def _layer_norm(x, w, b, eps, out):
    """out = layer_norm(x) * w + b for one vector (float32 mean and biased variance)."""
    mean, inv = _norm_stats(x, eps)
    for c in range(x.shape[0]):
        out[c] = (x[c] - mean) * inv * w[c] + b[c]


@numba.njit(cache=True, nogil=True)
def _mix_in(x, delta, lnw, lnb, eps, prev, mix, xx, out, kind):
    """The start of a time- or channel-mix block, for each of B sequences (rows):
    x += delta (the previous block's output; skipped when delta has no rows),
    xx = layer_norm(x), and the token-shift mixes out[j] = xx + (prev - xx) * mix[j]
    (kind 0: v6, v7) or prev + (xx - prev) * mix[j] (kind 1: v4, v5, as their papers write
    x * m + prev * (1 - m)).

    x, delta, prev, xx (B, C); mix (M, C); out (M, B, C). xx is the block's new shift state.
    """
    B, C = x.shape
    for b in range(B):
        if delta.shape[0] > 0:
            for c in range(C):
                x[b, c] += delta[b, c]
        _layer_norm(x[b], lnw, lnb, eps, xx[b])
        for j in range(mix.shape[0]):
            for c in range(C):
                if kind == 0:
                    out[j, b, c] = xx[b, c] + (prev[b, c] - xx[b, c]) * mix[j, c]
                else:
                    out[j, b, c] = prev[b, c] + (xx[b, c] - prev[b, c]) * mix[j, c]


@numba.njit(cache=True, nogil=True)
def _vec_mat_part(x, W, kind, out, c0, c1, d0, d1):
    """out[d0:d1] = x[c0:c1] @ W[c0:c1, d0:d1]: rows c0 .. c1 added in order, one axpy per
    row (no reduction across lanes). W: the rows' bytes (C, D * size), ``kind`` F32, F16 or
    BF16 (kernels.kinds.Kind), widened exactly (kernels/ir/vecmath.py); the columns past the
    last whole 32 in scalar code. Each column is the same sum whichever range of columns is
    computed."""
    size = 4 if kind == _F32 else 2
    n32 = (d1 - d0) // 32
    e = d0 + 32 * n32
    for d in range(d0, d1):
        out[d] = 0.0
    o = out[d0:e]
    _axpys(kind, (o, W, x, c0, c1, d0 * size, n32))
    for c in range(c0, c1):  # the columns past the last whole 32 (each its own sum: the
        xc = x[c]  # same order of rows as the vector part)
        row = W[c]
        for d in range(e, d1):
            out[d] += xc * _float_at(kind, row, d)


#: A LoRA's products here (v6's four, v7's second ones) sum the rows of their matrix in this
#: many parts, each a whole output vector, then add the parts in order: the serial and the
#: threaded kernels alike, so the numbers do not depend on the thread count. Threads take
#: whole parts, so each reads whole rows one after another, faster than splitting every row
#: between the threads (docs/kernels.md).
LORA_PARTS = 4


@numba.njit(cache=True, nogil=True)
def _vm_part(x, W, kind, out, p):
    """out = x[rows] @ W[rows] over part p of W's rows (see LORA_PARTS)."""
    n = W.shape[0]
    _vec_mat_part(x, W, kind, out, p * n // LORA_PARTS, (p + 1) * n // LORA_PARTS, 0, out.shape[0])


@numba.njit(parallel=True, cache=True, nogil=True)
def _vm_parts_par(xs, Ws, kind, parts):
    for i in numba.prange(len(Ws) * LORA_PARTS):
        j, p = i // LORA_PARTS, i % LORA_PARTS
        _vm_part(xs[j], Ws[j], kind, parts[j, p], p)


@numba.njit(cache=True, nogil=True)
def _vm_parts(xs, Ws, kind, parts, threads):
    """parts[j, p] = part p of xs[j] @ Ws[j] for every matrix j (a tuple) and part p, on
    numba's threads when ``threads`` > 1."""
    if threads > 1:
        _vm_parts_par(xs, Ws, kind, parts)
    else:
        for j in range(len(Ws)):
            for p in range(LORA_PARTS):
                _vm_part(xs[j], Ws[j], kind, parts[j, p], p)


@numba.njit(cache=True, nogil=True)
def _col_dots(x2, WT, kind, y2, threads):
    """y2 (B, D) = x2 (B, C) @ W for a first LoRA matrix W given as its D columns (rows of
    bytes, _cols_bytes): a dot product per column as kernels.linear sums float rows, the
    columns split across numba's threads when ``threads`` > 1 (the same numbers)."""
    D = WT.shape[0]
    if threads > 1:
        _mv_par(kind, WT, x2, y2, max(1, -(-D // (8 * threads))), 32)
    else:
        _mv_rows(kind, WT, x2, y2, np.int64(0), D, 32)


@numba.njit(cache=True, nogil=True)
def _parts_sum(parts, out):
    """out = parts[0] + parts[1] + ..., in that order."""
    for c in range(out.shape[0]):
        acc = parts[0, c]
        for p in range(1, parts.shape[0]):
            acc += parts[p, c]
        out[c] = acc


@numba.njit(cache=True, nogil=True)
def _sigmoid(x):
    """x = sigmoid(x) in place (B, C): _vsigmoid on each row."""
    for b in range(x.shape[0]):
        _vsigmoid(x[b])


@numba.njit(cache=True, nogil=True)
def _relu_sq(k):
    """k = relu(k) ** 2 in place (B, F)."""
    for b in range(k.shape[0]):
        for j in range(k.shape[1]):
            v = max(k[b, j], np.float32(0.0))
            k[b, j] = v * v


@numba.njit(cache=True, nogil=True)
def _silu_gate(y, g):
    """y *= silu(g) = g * sigmoid(g), in place (B, C; the sigmoid by _vsigmoid)."""
    e = np.empty(y.shape[1], np.float32)
    for b in range(y.shape[0]):
        gb, yb = g[b], y[b]
        e[:] = gb
        _vsigmoid(e)
        for j in range(e.shape[0]):
            yb[j] *= gb[j] * e[j]


# inlined: compiled on its own, it would link in and optimize all of row_product once more
@numba.njit(inline="always", cache=True, nogil=True)
def _products(spec, x, n_out, threads):
    """x (B, in) @ W^T as a new (B, n_out) array (kernels.linear.row_product)."""
    y = np.empty((x.shape[0], n_out), np.float32)
    row_product(spec, x, y, threads)
    return y


def _rows_bytes(t: torch.Tensor) -> np.ndarray:
    """A 2-D float tensor's rows as bytes (C, D * size), without a copy when it is contiguous
    (a copy of a file's tensor releases the file's pages: formats.base.release_pages)."""
    from ...formats.base import release_pages

    c = t.detach().contiguous()
    if c.data_ptr() != t.data_ptr():
        release_pages(t)
    return c.view(torch.uint8).numpy().reshape(c.shape[0], -1)


def _cols_bytes(t: torch.Tensor) -> np.ndarray:
    """A 2-D float tensor's columns as rows of bytes (D, C * size): no copy when the tensor is
    held column by column (models.base LOW_RANK_COLUMNS)."""
    return _rows_bytes(t.t())


def _low_rank(ts: list):
    """A layer's LoRA matrices (None where absent) as they are when they share one of float32,
    float16, bfloat16, else all as float32; and that dtype's kind for _vec_mat_part."""
    dtypes = {t.dtype for t in ts if t is not None}
    if len(dtypes) > 1 or not dtypes <= {torch.float32, torch.float16, torch.bfloat16}:
        ts = [None if t is None else t.float() for t in ts]
        dtypes = {torch.float32}
    return ts, int(
        {torch.float32: Kind.F32, torch.float16: Kind.F16, torch.bfloat16: Kind.BF16}[dtypes.pop()]
    )


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()
