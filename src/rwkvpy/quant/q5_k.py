"""Q5_K: Q4_K's super-block (8 sub-blocks of 32, 6-bit scales and mins) with 5-bit codes:
``x = d*sc*q - dmin*m``, q = 0..31.

Block layout (ggml ``block_q5_K``, 176 bytes)::

    f16 d, dmin      super-block scale of the sub-block scales, of the sub-block mins
    u8  scales[12]   6-bit (sc, m) of the 8 sub-blocks, packed as Q4_K's
    u8  qh[32]       byte l, bit k: the fifth bit of element 32 k + l
    u8  qs[128]      the low 4 bits, nibbles as Q4_K's

Dequantization (``dequantize_row_q5_K``): ``(d * sc) * q - dmin * m``, each operation rounded
to float32. Quantization (``quantize_row_q5_K_ref``): as Q4_K with
``make_qkx2_quants(32, 31, rmin=-0.5, rdelta=0.1, nstep=15)`` and codes clamped to 0..31.
The quantizer is compiled: ``q_k.quantize_q4_k_q5_k`` (numba; see quant/q_k.py).
"""

from __future__ import annotations

import numpy as np

from .base import WeightFormat
from .q4_k import dequantize_scaled, split_nibbles
from .q_k import QK_K, block_bytes, quantize_q4_k_q5_k


def high_bits(qh: np.ndarray) -> np.ndarray:
    """qh (n, 32) -> 16 where element e's fifth bit (bit e // 32 of qh[e % 32]) is set."""
    bits = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & np.uint8(1)
    return (bits << np.uint8(4)).reshape(-1, QK_K)


class Q5_KFormat(WeightFormat):
    name = "Q5_K"
    ggml_type = 13
    block_size = QK_K
    type_size = 176
    quantized = True
    block_dtype = np.dtype(
        [
            ("d", "<f2"),
            ("dmin", "<f2"),
            ("scales", "u1", (12,)),
            ("qh", "u1", (32,)),
            ("qs", "u1", (128,)),
        ]
    )

    def _dequantize_blocks(self, records: np.ndarray, out: np.ndarray) -> None:
        q = split_nibbles(records["qs"]) | high_bits(records["qh"])
        dequantize_scaled(records["d"], records["dmin"], records["scales"], q, out)

    def _quantize_blocks(self, x: np.ndarray, records: np.ndarray) -> None:
        quantize_q4_k_q5_k(*block_bytes(x, records), 31)


Q5_K = Q5_KFormat()
