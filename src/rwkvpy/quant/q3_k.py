"""Q3_K: super-blocks of 256 weights in 16 sub-blocks of 16, 3-bit signed codes, a 6-bit
signed scale per sub-block and a float16 super-block scale: ``x = d * (sc - 32) * (q - 4)``.

Block layout (ggml ``block_q3_K``, 110 bytes)::

    u8  hmask[32]    byte l, bit k: the third bit of element 32 k + l (set: q >= 4)
    u8  qs[64]       the low 2 bits, packed as Q2_K's
    u8  scales[12]   sub-block j's 6-bit scale: low 4 bits in byte j (j < 8, low nibble) or
                     j - 8 (high nibble), high 2 bits in byte 8 + j % 4, bits 2 (j / 4)
    f16 d            super-block scale

Dequantization (``dequantize_row_q3_K``): ``dl = d * (sc - 32)``, then ``dl * (q - 4)``.
Quantization (``quantize_row_q3_K_ref``): per sub-block ``make_q3_quants(16, 4, do_rmse)``;
the scales quantized to 6 bits against the largest magnitude (``iscale = -32/max``, ``d =
1/iscale``); elements re-coded ``nearest_int(x/(d*sc))`` clamped to -4..3.
The quantizer is compiled: ``q_k.quantize_q3_k`` (numba; see quant/q_k.py).
"""

from __future__ import annotations

import numpy as np

from .base import WeightFormat, f16_to_f32
from .q_k import QK_K, block_bytes, quantize_q3_k, unpack_2bit

_F = np.float32


def q3_scales(scales: np.ndarray) -> np.ndarray:
    """scales (n, 12) -> the 16 signed sub-block scales (n, 16) as int16, sc - 32."""
    b = scales.astype(np.int16)
    low = np.concatenate([b[:, :8] & 15, b[:, :8] >> 4], axis=1)
    j = np.arange(16)
    high = (b[:, 8 + j % 4] >> (2 * (j // 4))) & 3
    return (low | (high << 4)) - 32


class Q3_KFormat(WeightFormat):
    name = "Q3_K"
    ggml_type = 11
    block_size = QK_K
    type_size = 110
    quantized = True
    block_dtype = np.dtype(
        [("hmask", "u1", (32,)), ("qs", "u1", (64,)), ("scales", "u1", (12,)), ("d", "<f2")]
    )

    def _dequantize_blocks(self, records: np.ndarray, out: np.ndarray) -> None:
        dl = (f16_to_f32(records["d"]) * q3_scales(records["scales"]).astype(_F))[:, :, None]
        hm = records["hmask"]
        hb = (hm[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
        q = unpack_2bit(records["qs"]).astype(np.int8) - 4 * (1 - hb.reshape(-1, QK_K)).astype(
            np.int8
        )
        np.multiply(dl, q.reshape(-1, 16, 16).astype(_F), out=out.reshape(-1, 16, 16))

    def _quantize_blocks(self, x: np.ndarray, records: np.ndarray) -> None:
        quantize_q3_k(*block_bytes(x, records))


Q3_K = Q3_KFormat()
