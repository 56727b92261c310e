"""Q8_0: blocks of 32 weights, one float16 scale, signed 8-bit codes; ``x = q * d``.

Block layout (ggml ``block_q8_0``, 34 bytes)::

    f16 d        scale
    i8  qs[32]   element j

Quantization (``quantize_row_q8_0_ref``): ``amax`` is the largest magnitude, ``d = amax/127``,
``id = d ? 1/d : 0``, ``q = roundf(x*id)`` (halves away from zero, not numpy's half-to-even).
ggml folds ``amax = MAX(amax, fabsf(v))`` with ``MAX(a, b) = a > b ? a : b``, so a NaN element
resets the fold: ``amax`` is the largest magnitude *after* the block's last NaN, or NaN when
the last element is NaN. We reproduce that too.
Dequantization: ``q * d`` in float32, an exact product (8 + 11 significant bits).
"""

from __future__ import annotations

import numpy as np

from .base import WeightFormat, f16_to_f32, inverse_scale

QK8_0 = 32


def _ggml_amax(x: np.ndarray) -> np.ndarray:
    mag = np.abs(x)
    amax = mag.max(axis=1)
    nan_rows = np.flatnonzero(np.isnan(amax))
    if nan_rows.size:
        sub = mag[nan_rows]
        width = sub.shape[1]
        last_nan = width - 1 - np.isnan(sub[:, ::-1]).argmax(axis=1)
        after = np.arange(width)[None, :] > last_nan[:, None]
        fixed = np.where(after, sub, np.float32(0)).max(axis=1)
        fixed[last_nan == width - 1] = np.nan
        amax[nan_rows] = fixed
    return amax


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C's roundf, exactly: v - trunc(v) is exact in float32, so the tie test is exact."""
    t = np.trunc(v)
    frac = v - t
    return t + np.where(np.abs(frac) >= np.float32(0.5), np.sign(v), np.float32(0))


class Q8_0Format(WeightFormat):
    name = "Q8_0"
    ggml_type = 8
    block_size = QK8_0
    type_size = 2 + QK8_0
    quantized = True
    block_dtype = np.dtype([("d", "<f2"), ("qs", "i1", (QK8_0,))])

    def _dequantize_blocks(self, records: np.ndarray, out: np.ndarray) -> None:
        d = f16_to_f32(records["d"])
        np.multiply(records["qs"], d, out=out)

    def _quantize_blocks(self, x: np.ndarray, records: np.ndarray) -> None:
        d = _ggml_amax(x) / np.float32(127)
        idv = inverse_scale(d)
        q = _round_half_away(x * idv[:, None])
        q[~np.isfinite(q)] = 0  # (int8_t) of NaN/inf: 0 on x86
        np.clip(q, -128, 127, out=q)
        records["d"] = d
        records["qs"] = q.astype(np.int8)


Q8_0 = Q8_0Format()
