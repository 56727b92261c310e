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
"""

from __future__ import annotations

import numpy as np

from .base import WeightFormat, f16_to_f32
from .q_k import (QK_K, clamp, fold_max, make_qkx2_quants, nearest_int, pack_scale_min_k4,
                  seqsum, unpack_scale_min_k4)

_F = np.float32


def split_nibbles(qs: np.ndarray) -> np.ndarray:
    """qs (n, 128) -> the low 4 bits of the 256 codes (n, 256) in element order."""
    q = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & np.uint8(15)).reshape(-1, QK_K)


def join_nibbles(L: np.ndarray) -> np.ndarray:
    """Codes (n, 256), low 4 bits used -> qs (n, 128), the inverse of :func:`split_nibbles`."""
    q = (L.reshape(-1, 4, 2, 32) & 15).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def dequantize_scaled(d, dmin, scales, q, out):
    """out (n, 256) = (d * sc) * q - dmin * m per 32-element sub-block (Q4_K, Q5_K)."""
    sc, m = unpack_scale_min_k4(scales)
    d1 = (f16_to_f32(d) * sc.astype(_F))[:, :, None]
    m1 = (f16_to_f32(dmin) * m.astype(_F))[:, :, None]
    o = out.reshape(-1, 8, 32)
    np.multiply(d1, q.reshape(-1, 8, 32).astype(_F), out=o)
    np.subtract(o, m1, out=o)


def quantize_scaled(x, nmax, rmin, nstep, records):
    """The shared part of quantize_row_q4_K_ref / q5_K_ref: fills records' d, dmin and scales
    and returns the codes (n, 256), 0..nmax."""
    n = x.shape[0]
    xs = x.reshape(n * 8, 32)
    av = np.sqrt(seqsum(xs * xs) / _F(32))
    w = av[:, None] + np.abs(xs)
    scales, mins, L = make_qkx2_quants(xs, w, nmax, rmin, 0.1, nstep, False)
    scales = scales.reshape(n, 8)
    mins = mins.reshape(n, 8)
    max_scale = fold_max(scales)
    max_min = fold_max(mins)
    inv_scale = np.where(max_scale > 0, _F(63) / max_scale, _F(0))
    inv_min = np.where(max_min > 0, _F(63) / max_min, _F(0))
    ls = np.minimum(nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    records["scales"] = pack_scale_min_k4(ls, lm)
    records["d"] = max_scale / _F(63)
    records["dmin"] = max_min / _F(63)
    d = f16_to_f32(records["d"]) * ls.astype(_F)
    dm = f16_to_f32(records["dmin"]) * lm.astype(_F)
    L = L.reshape(n, 8, 32).astype(np.int64)
    new = clamp(nearest_int((x.reshape(n, 8, 32) + dm[:, :, None]) / d[:, :, None]), 0, nmax)
    return np.where((d != 0)[:, :, None], new, L).reshape(n, QK_K)


class Q4_KFormat(WeightFormat):
    name = "Q4_K"
    ggml_type = 12
    block_size = QK_K
    type_size = 144
    quantized = True
    block_dtype = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", (12,)),
                            ("qs", "u1", (128,))])

    def _dequantize_blocks(self, records: np.ndarray, out: np.ndarray) -> None:
        dequantize_scaled(records["d"], records["dmin"], records["scales"],
                          split_nibbles(records["qs"]), out)

    def _quantize_blocks(self, x: np.ndarray, records: np.ndarray) -> None:
        L = quantize_scaled(x, 15, -1.0, 20, records)
        records["qs"] = join_nibbles(L)


Q4_K = Q4_KFormat()
