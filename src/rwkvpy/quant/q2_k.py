"""Q2_K: super-blocks of 256 weights in 16 sub-blocks of 16, 2-bit codes, a 4-bit scale and a
4-bit min per sub-block scaled by float16 super-block factors: ``x = d*sc*q - dmin*m``.

Block layout (ggml ``block_q2_K``, 84 bytes)::

    u8  scales[16]   sub-block j: scale in the low nibble, min in the high nibble
    u8  qs[64]       for each half h (128 elements): byte 32 h + l, bits 2k..2k+1: element
                     128 h + 32 k + l (l = 0..31)
    f16 d, dmin      super-block scale of the scales, of the mins

Dequantization (``dequantize_row_q2_K``): ``(d * sc) * q - dmin * m``, each operation rounded
to float32. Quantization (``quantize_row_q2_K_ref``): weights ``|x|``,
``make_qkx2_quants(16, 3, rmin=-0.5, rdelta=0.1, nstep=15, use_mad)``, scales and mins
quantized to 4 bits against their largest (``d = max/15``), elements re-coded
``nearest_int((x + dm)/d)`` clamped to 0..3.
The quantizer is compiled: ``q_k.quantize_q2_k`` (numba; see quant/q_k.py).
"""

from __future__ import annotations

import numpy as np

from .base import WeightFormat, f16_to_f32
from .q_k import QK_K, block_bytes, quantize_q2_k, unpack_2bit

_F = np.float32


class Q2_KFormat(WeightFormat):
    name = "Q2_K"
    ggml_type = 10
    block_size = QK_K
    type_size = 84
    quantized = True
    block_dtype = np.dtype(
        [("scales", "u1", (16,)), ("qs", "u1", (64,)), ("d", "<f2"), ("dmin", "<f2")]
    )

    def _dequantize_blocks(self, records: np.ndarray, out: np.ndarray) -> None:
        sc = records["scales"]
        dl = (f16_to_f32(records["d"]) * (sc & 15).astype(_F))[:, :, None]
        ml = (f16_to_f32(records["dmin"]) * (sc >> 4).astype(_F))[:, :, None]
        o = out.reshape(-1, 16, 16)
        np.multiply(dl, unpack_2bit(records["qs"]).reshape(-1, 16, 16).astype(_F), out=o)
        np.subtract(o, ml, out=o)

    def _quantize_blocks(self, x: np.ndarray, records: np.ndarray) -> None:
        quantize_q2_k(*block_bytes(x, records))


Q2_K = Q2_KFormat()
