"""Q5_0: blocks of 32 weights, one float16 scale, 5-bit codes; ``x = (q - 16) * d``.

Block layout (ggml ``block_q5_0``, 22 bytes)::

    f16 d        scale
    u8  qh[4]    little-endian uint32: bit j is the fifth bit (0x10) of element j
    u8  qs[16]   byte j: low 4 bits of element j (low nibble) and of element j + 16 (high)

Quantization (``quantize_row_q5_0_ref``): ``max`` is the first element of largest magnitude
(with its sign), ``d = max / -16``, ``id = d ? 1/d : 0``, ``q = MIN(31, (int)(x*id + 16.5f))``.
Dequantization: ``(q - 16) * d`` in float32, an exact product (5 + 11 significant bits).
"""

from __future__ import annotations

import numpy as np

from .base import (
    WeightFormat,
    f16_to_f32,
    inverse_scale,
    pack_high_bits,
    pack_nibbles,
    signed_absmax,
    truncate_codes,
    unpack_high_bits,
    unpack_nibbles,
)

QK5_0 = 32

_VALUE = (np.arange(32) - 16).astype(np.float32)


class Q5_0Format(WeightFormat):
    name = "Q5_0"
    ggml_type = 6
    block_size = QK5_0
    type_size = 2 + 4 + QK5_0 // 2
    quantized = True
    block_dtype = np.dtype([("d", "<f2"), ("qh", "u1", (4,)), ("qs", "u1", (QK5_0 // 2,))])

    def _dequantize_blocks(self, records: np.ndarray, out: np.ndarray) -> None:
        d = f16_to_f32(records["d"])
        q = unpack_nibbles(records["qs"])
        q |= unpack_high_bits(records["qh"])
        np.multiply(_VALUE[q], d, out=out)

    def _quantize_blocks(self, x: np.ndarray, records: np.ndarray) -> None:
        d = signed_absmax(x) / np.float32(-16)
        idv = inverse_scale(d)
        q = truncate_codes(x * idv[:, None] + np.float32(16.5), 31)
        records["d"] = d
        records["qh"] = pack_high_bits(q)
        records["qs"] = pack_nibbles(q)


Q5_0 = Q5_0Format()
