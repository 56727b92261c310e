"""Q6_K: super-blocks of 256 weights in 16 sub-blocks of 16, 6-bit codes, a signed 8-bit
scale per sub-block and a float16 super-block scale: ``x = d * sc * (q - 32)``.

Block layout (ggml ``block_q6_K``, 210 bytes)::

    u8  ql[128]      low 4 bits; for each half h (128 elements): byte 64 h + l holds element
                     128 h + l (low nibble) and 128 h + 64 + l (high nibble), byte 64 h + 32 + l
                     elements 128 h + 32 + l and 128 h + 96 + l (l = 0..31)
    u8  qh[64]       high 2 bits: byte 32 h + l, bits 2k..2k+1 for element 128 h + 32 k + l
    i8  scales[16]   scale of each sub-block of 16
    f16 d            super-block scale

Dequantization (``dequantize_row_q6_K``): ``(d * sc) * (q - 32)``, two float32 products.
Quantization (``quantize_row_q6_K_ref``): per sub-block ``make_qx_quants(16, 32, rmse_type=1)``;
the scales are quantized to int8 against the one of largest magnitude (``iscale = -128/max``,
``d = 1/iscale``), then every element re-coded ``nearest_int(x/(d*sc))`` clamped to -32..31
(a sub-block whose stored scale is 0 keeps the search's codes). A super-block whose scales are
all below 1e-15 is written as zeros.
The quantizer is compiled: ``q_k.quantize_q6_k`` (numba; see quant/q_k.py).
"""

from __future__ import annotations

import numpy as np

from .base import WeightFormat, f16_to_f32
from .q_k import QK_K, block_bytes, quantize_q6_k

_F = np.float32


def q6_codes(ql: np.ndarray, qh: np.ndarray) -> np.ndarray:
    """ql (n, 128), qh (n, 64) -> codes 0..63 (n, 256) in element order."""
    lo = ql.reshape(-1, 2, 1, 2, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1, 1)
    lo = (lo & np.uint8(15)).reshape(-1, 2, 4, 32)
    hi = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    return (lo | (hi << np.uint8(4))).reshape(-1, QK_K)


class Q6_KFormat(WeightFormat):
    name = "Q6_K"
    ggml_type = 14
    block_size = QK_K
    type_size = 210
    quantized = True
    block_dtype = np.dtype(
        [("ql", "u1", (128,)), ("qh", "u1", (64,)), ("scales", "i1", (16,)), ("d", "<f2")]
    )

    def _dequantize_blocks(self, records: np.ndarray, out: np.ndarray) -> None:
        q = q6_codes(records["ql"], records["qh"]).astype(np.int16) - 32
        ds = (f16_to_f32(records["d"]) * records["scales"].astype(_F))[:, :, None]
        np.multiply(ds, q.reshape(-1, 16, 16).astype(_F), out=out.reshape(-1, 16, 16))

    def _quantize_blocks(self, x: np.ndarray, records: np.ndarray) -> None:
        quantize_q6_k(*block_bytes(x, records))


Q6_K = Q6_KFormat()
