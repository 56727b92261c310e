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
"""

from __future__ import annotations

import numpy as np

from .base import WeightFormat, f16_to_f32
from .q_k import QK_K, clamp, fold_max, make_qkx2_quants, nearest_int, pack_2bit, unpack_2bit

_F = np.float32


class Q2_KFormat(WeightFormat):
    name = "Q2_K"
    ggml_type = 10
    block_size = QK_K
    type_size = 84
    quantized = True
    block_dtype = np.dtype([("scales", "u1", (16,)), ("qs", "u1", (64,)), ("d", "<f2"),
                            ("dmin", "<f2")])

    def _dequantize_blocks(self, records: np.ndarray, out: np.ndarray) -> None:
        sc = records["scales"]
        dl = (f16_to_f32(records["d"]) * (sc & 15).astype(_F))[:, :, None]
        ml = (f16_to_f32(records["dmin"]) * (sc >> 4).astype(_F))[:, :, None]
        o = out.reshape(-1, 16, 16)
        np.multiply(dl, unpack_2bit(records["qs"]).reshape(-1, 16, 16).astype(_F), out=o)
        np.subtract(o, ml, out=o)

    def _quantize_blocks(self, x: np.ndarray, records: np.ndarray) -> None:
        n = x.shape[0]
        xs = x.reshape(n * 16, 16)
        scales, mins, L = make_qkx2_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
        scales, mins = scales.reshape(n, 16), mins.reshape(n, 16)
        max_scale, max_min = fold_max(scales), fold_max(mins)
        has_s, has_m = max_scale > 0, max_min > 0
        ls = np.where(has_s[:, None], nearest_int((_F(15) / max_scale)[:, None] * scales), 0)
        lm = np.where(has_m[:, None], nearest_int((_F(15) / max_min)[:, None] * mins), 0)
        # C stores l into a byte, then or-s l << 4 into it
        sc = ((ls & 0xFF) | ((lm << 4) & 0xFF)).astype(np.uint8)
        records["scales"] = sc
        records["d"] = np.where(has_s, max_scale / _F(15), _F(0))
        records["dmin"] = np.where(has_m, max_min / _F(15), _F(0))
        d = f16_to_f32(records["d"]) * (sc & 15).astype(_F)
        dm = f16_to_f32(records["dmin"]) * (sc >> 4).astype(_F)
        new = clamp(nearest_int((x.reshape(n, 16, 16) + dm[:, :, None]) / d[:, :, None]), 0, 3)
        L = np.where((d != 0)[:, :, None], new, L.reshape(n, 16, 16).astype(np.int64))
        records["qs"] = pack_2bit(L.reshape(n, QK_K))


Q2_K = Q2_KFormat()
