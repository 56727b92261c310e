"""The unquantized ggml types: F32, F16 and BF16 (little-endian, one element per "block").

* F32 is copied as is.
* F16 is IEEE binary16; float16 -> float32 is exact, float32 -> float16 rounds to nearest even
  (overflow to inf), as ``GGML_FP32_TO_FP16`` does.
* BF16 is the high 16 bits of a float32. Decoding shifts them back (exact). Encoding is ggml's
  ``ggml_compute_fp32_to_bf16``: a NaN keeps its sign and top payload bits and gets the quiet
  bit (``(bits >> 16) | 0x40``); any other value is rounded to nearest even by adding
  ``0x7fff + ((bits >> 16) & 1)`` before dropping the low half, so values past the largest
  bf16 round to inf and subnormals are kept (not flushed).
"""

from __future__ import annotations

import numpy as np

from .base import WeightFormat


class F32Format(WeightFormat):
    name = "F32"
    ggml_type = 0
    block_size = 1
    type_size = 4
    quantized = False
    block_dtype = np.dtype("<f4")

    def _dequantize_blocks(self, records: np.ndarray, out: np.ndarray) -> None:
        out[:, 0] = records

    def _quantize_blocks(self, x: np.ndarray, records: np.ndarray) -> None:
        records[...] = x[:, 0]


class F16Format(WeightFormat):
    name = "F16"
    ggml_type = 1
    block_size = 1
    type_size = 2
    quantized = False
    block_dtype = np.dtype("<f2")

    def _dequantize_blocks(self, records: np.ndarray, out: np.ndarray) -> None:
        out[:, 0] = records

    def _quantize_blocks(self, x: np.ndarray, records: np.ndarray) -> None:
        records[...] = x[:, 0]


class BF16Format(WeightFormat):
    name = "BF16"
    ggml_type = 30
    block_size = 1
    type_size = 2
    quantized = False
    block_dtype = np.dtype("<u2")

    def _dequantize_blocks(self, records: np.ndarray, out: np.ndarray) -> None:
        bits = out.reshape(-1).view(np.uint32)
        bits[...] = records
        bits <<= np.uint32(16)

    def _quantize_blocks(self, x: np.ndarray, records: np.ndarray) -> None:
        records[...] = fp32_to_bf16_bits(x[:, 0])


def fp32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """ggml's float32 -> bf16 conversion, as uint16 bit patterns."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    hi = u >> np.uint32(16)
    # Cannot overflow uint32: the largest non-NaN pattern is 0xff800000 (-inf).
    rounded = (u + (np.uint32(0x7FFF) + (hi & np.uint32(1)))) >> np.uint32(16)
    is_nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(is_nan, hi | np.uint32(0x40), rounded).astype(np.uint16)


F32 = F32Format()
F16 = F16Format()
BF16 = BF16Format()
