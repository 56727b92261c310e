"""Q4_K: super-blocks of 256 weights in 8 sub-blocks of 32, 4-bit codes, a 6-bit scale and a
6-bit min per sub-block, both scaled by float16 super-block factors: ``x = d*sc*q - dmin*m``.

Block layout (ggml ``block_q4_K``, 144 bytes)::

    f16 d, dmin      super-block scale of the sub-block scales, of the sub-block mins
    u8  scales[12]   6-bit (sc, m) of the 8 sub-blocks (quant/q_k.py, get_scale_min_k4)
    u8  qs[128]      byte 32 g + l: element 64 g + l in the low nibble, 64 g + 32 + l in the
                     high one (g = 0..3)

Dequantization (``dequantize_row_q4_K``): ``d1 = d * sc``, ``m1 = dmin * m`` (float32), then
``d1 * q - m1``: a product and a difference, each rounded to float32 (no fused multiply-add).
Quantization (``quantize_row_q4_K_ref``): per sub-block, weights ``sqrt(sum x²/32) + |x|`` and
``make_qkx2_quants(32, 15, rmin=-1, rdelta=0.1, nstep=20)``; the 8 scales and mins are
quantized to 6 bits against their largest (``d = max/63``), then every element is re-coded
with the stored scale and min: ``nearest_int((x + dm)/d)`` clamped to 0..15 (a sub-block
whose stored scale is 0 keeps the codes of the search).
The quantizer is compiled: ``q_k.quantize_q4_k_q5_k`` (numba; see quant/q_k.py).
"""

from __future__ import annotations

import numpy as np

from .base import WeightFormat, f16_to_f32
from .q_k import QK_K, block_bytes, quantize_q4_k_q5_k, unpack_scale_min_k4

_F = np.float32


def split_nibbles(qs: np.ndarray) -> np.ndarray:
    """qs (n, 128) -> the low 4 bits of the 256 codes (n, 256) in element order."""
    q = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & np.uint8(15)).reshape(-1, QK_K)


def dequantize_scaled(d, dmin, scales, q, out):
    """out (n, 256) = (d * sc) * q - dmin * m per 32-element sub-block (Q4_K, Q5_K)."""
    sc, m = unpack_scale_min_k4(scales)
    d1 = (f16_to_f32(d) * sc.astype(_F))[:, :, None]
    m1 = (f16_to_f32(dmin) * m.astype(_F))[:, :, None]
    o = out.reshape(-1, 8, 32)
    np.multiply(d1, q.reshape(-1, 8, 32).astype(_F), out=o)
    np.subtract(o, m1, out=o)


class Q4_KFormat(WeightFormat):
    name = "Q4_K"
    ggml_type = 12
    block_size = QK_K
    type_size = 144
    quantized = True
    block_dtype = np.dtype(
        [("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", (12,)), ("qs", "u1", (128,))]
    )

    def _dequantize_blocks(self, records: np.ndarray, out: np.ndarray) -> None:
        dequantize_scaled(
            records["d"], records["dmin"], records["scales"], split_nibbles(records["qs"]), out
        )

    def _quantize_blocks(self, x: np.ndarray, records: np.ndarray) -> None:
        quantize_q4_k_q5_k(*block_bytes(x, records), 15)


Q4_K = Q4_KFormat()
