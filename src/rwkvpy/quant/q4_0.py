"""Q4_0: blocks of 32 weights, one float16 scale, 4-bit codes; ``x = (q - 8) * d``.

Block layout (ggml ``block_q4_0``, 18 bytes)::

    f16 d        scale
    u8  qs[16]   byte j: element j in the low nibble, element j + 16 in the high nibble

Quantization (``quantize_row_q4_0_ref``): ``max`` is the first element of largest magnitude
(with its sign), ``d = max / -8``, ``id = d ? 1/d : 0``, ``q = MIN(15, (int)(x*id + 8.5f))``;
the code of ``max`` itself is 0, so the largest magnitude is represented exactly as ``-8*d``.
Dequantization: ``(q - 8) * d`` with ``d`` widened to float32; the product has at most
4 + 11 significant bits, so it is exact and its float32 bits do not depend on evaluation order.
"""

from __future__ import annotations

import numpy as np

from .base import (
    WeightFormat,
    f16_to_f32,
    inverse_scale,
    pack_nibbles,
    signed_absmax,
    truncate_codes,
)

QK4_0 = 32

# Float32 value (q - 8) of the low / high nibble of every byte.
_LOW = ((np.arange(256) & 0x0F) - 8).astype(np.float32)
_HIGH = ((np.arange(256) >> 4) - 8).astype(np.float32)


class Q4_0Format(WeightFormat):
    name = "Q4_0"
    ggml_type = 2
    block_size = QK4_0
    type_size = 2 + QK4_0 // 2
    quantized = True
    block_dtype = np.dtype([("d", "<f2"), ("qs", "u1", (QK4_0 // 2,))])

    def _dequantize_blocks(self, records: np.ndarray, out: np.ndarray) -> None:
        d = f16_to_f32(records["d"])
        qs = records["qs"]
        half = QK4_0 // 2
        np.multiply(_LOW[qs], d, out=out[:, :half])
        np.multiply(_HIGH[qs], d, out=out[:, half:])

    def _quantize_blocks(self, x: np.ndarray, records: np.ndarray) -> None:
        d = signed_absmax(x) / np.float32(-8)
        idv = inverse_scale(d)
        q = truncate_codes(x * idv[:, None] + np.float32(8.5), 15)
        records["d"] = d
        records["qs"] = pack_nibbles(q)


Q4_0 = Q4_0Format()
