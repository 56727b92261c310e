"""Q5_1: blocks of 32 weights, float16 scale and minimum, 5-bit codes; ``x = q * d + m``.

Block layout (ggml ``block_q5_1``, 24 bytes)::

    f16 d        scale
    f16 m        minimum
    u8  qh[4]    little-endian uint32: bit j is the fifth bit (0x10) of element j
    u8  qs[16]   byte j: low 4 bits of element j (low nibble) and of element j + 16 (high)

Quantization (``quantize_row_q5_1_ref``): ``min``/``max`` of the block (NaNs skipped),
``d = (max - min) / 31``, ``id = d ? 1/d : 0``, ``q = (int)((x - min)*id + 0.5f)``. ggml has no
``MIN(31, ...)`` here, but for finite inputs the largest value is ``31 * (1 + a few ulps)``, so
the clamp we apply never changes a code.
Dequantization: ``q*d + m`` in float32; ``q*d`` is exact (5 + 11 significant bits), so only the
sum rounds, fused multiply-add or not.
"""

from __future__ import annotations

import numpy as np

from .base import (
    WeightFormat,
    f16_to_f32,
    ggml_min_max,
    inverse_scale,
    pack_high_bits,
    pack_nibbles,
    truncate_codes,
    unpack_high_bits,
    unpack_nibbles,
)

QK5_1 = 32

_VALUE = np.arange(32).astype(np.float32)


class Q5_1Format(WeightFormat):
    name = "Q5_1"
    ggml_type = 7
    block_size = QK5_1
    type_size = 2 + 2 + 4 + QK5_1 // 2
    quantized = True
    block_dtype = np.dtype(
        [("d", "<f2"), ("m", "<f2"), ("qh", "u1", (4,)), ("qs", "u1", (QK5_1 // 2,))]
    )

    def _dequantize_blocks(self, records: np.ndarray, out: np.ndarray) -> None:
        d = f16_to_f32(records["d"])
        m = f16_to_f32(records["m"])
        q = unpack_nibbles(records["qs"])
        q |= unpack_high_bits(records["qh"])
        np.multiply(_VALUE[q], d, out=out)
        np.add(out, m, out=out)

    def _quantize_blocks(self, x: np.ndarray, records: np.ndarray) -> None:
        mn, mx = ggml_min_max(x)
        d = (mx - mn) / np.float32(31)
        idv = inverse_scale(d)
        q = truncate_codes((x - mn[:, None]) * idv[:, None] + np.float32(0.5), 31)
        records["d"] = d
        records["m"] = mn
        records["qh"] = pack_high_bits(q)
        records["qs"] = pack_nibbles(q)


Q5_1 = Q5_1Format()
