"""Q4_1: blocks of 32 weights, float16 scale and minimum, 4-bit codes; ``x = q * d + m``.

Block layout (ggml ``block_q4_1``, 20 bytes)::

    f16 d        scale
    f16 m        minimum
    u8  qs[16]   byte j: element j in the low nibble, element j + 16 in the high nibble

Quantization (``quantize_row_q4_1_ref``): ``min``/``max`` of the block (NaNs skipped),
``d = (max - min) / 15``, ``id = d ? 1/d : 0``, ``q = MIN(15, (int)((x - min)*id + 0.5f))``,
with the float32 ``min`` (not its float16 rounding) in the codes.
Dequantization: ``q*d + m`` in float32 with ``d`` and ``m`` widened from float16. ``q*d`` is
exact (4 + 11 significant bits), so whether a compiler fuses the multiply-add or not, the only
rounding is the one of the sum: numpy's multiply-then-add gives the same bits.
"""

from __future__ import annotations

import numpy as np

from .base import (
    WeightFormat,
    f16_to_f32,
    ggml_min_max,
    inverse_scale,
    pack_nibbles,
    truncate_codes,
)

QK4_1 = 32

_LOW = (np.arange(256) & 0x0F).astype(np.float32)
_HIGH = (np.arange(256) >> 4).astype(np.float32)


class Q4_1Format(WeightFormat):
    name = "Q4_1"
    ggml_type = 3
    block_size = QK4_1
    type_size = 4 + QK4_1 // 2
    quantized = True
    block_dtype = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (QK4_1 // 2,))])

    def _dequantize_blocks(self, records: np.ndarray, out: np.ndarray) -> None:
        d = f16_to_f32(records["d"])
        m = f16_to_f32(records["m"])
        qs = records["qs"]
        half = QK4_1 // 2
        np.multiply(_LOW[qs], d, out=out[:, :half])
        np.multiply(_HIGH[qs], d, out=out[:, half:])
        np.add(out, m, out=out)

    def _quantize_blocks(self, x: np.ndarray, records: np.ndarray) -> None:
        mn, mx = ggml_min_max(x)
        d = (mx - mn) / np.float32(15)
        idv = inverse_scale(d)
        q = truncate_codes((x - mn[:, None]) * idv[:, None] + np.float32(0.5), 15)
        records["d"] = d
        records["m"] = mn
        records["qs"] = pack_nibbles(q)


Q4_1 = Q4_1Format()
