"""The common part of every ggml weight format: sizes, checks, chunked (de)quantization.

A :class:`WeightFormat` turns the raw bytes of one tensor, as ggml stores them (a GGUF or
rwkv.cpp file, usually read through ``np.memmap``), into a float32 array, and a float32 array
into those bytes. Shapes are given in PyTorch order: the last dimension is the row, the one
ggml calls ``ne[0]``; blocks never straddle two rows, so it must be a multiple of the block size.

Each format describes one block with a numpy structured dtype that mirrors ggml's C struct
(``block_q4_0`` and so on, packed, little-endian), so reading a block's fields is a zero-copy
view of the bytes, including unaligned, read-only memory maps. The work is done in chunks of
about :data:`CHUNK_ELEMENTS` elements so that temporaries stay small whatever the tensor's size:
dequantizing needs the float32 output plus a few tens of MiB.

Bit-exactness notes shared by the quantized formats (see each format's module for the rest):

* every float operation is a float32 numpy ufunc applied in the order ggml's C code applies
  it (numpy never fuses a multiply and an add);
* ggml's reference quantizers scan a block with strict comparisons, so among equal candidates
  the first one wins, NaN inputs are skipped, and a zero's sign is the first zero's sign: the
  helpers below reproduce that, where ``np.min`` or ``np.argmax`` alone would not;
* C converts a NaN or infinite float to an integer with undefined behaviour; x86 gives 0 (the
  ``cvttss2si`` "integer indefinite" value truncated to a byte), and so do we;
* the K-quants' quantizers (:mod:`.q_k`: ggml's searches for the best scale of each sub-block)
  run in numba, in ggml's float32 operation order with no fast-math (no reassociation, no
  fused multiply-add), so they stay byte-exact with ggml (tests/fixtures/kquants).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import numpy as np

from ..errors import QuantizationError

#: Elements per chunk in :meth:`WeightFormat.dequantize` and :meth:`WeightFormat.quantize`.
CHUNK_ELEMENTS = 1 << 20

FLT_MAX = np.float32(np.finfo(np.float32).max)


class WeightFormat:
    """One ggml tensor data type.

    Attributes:
        name: ggml's name of the type (``"Q5_1"``).
        ggml_type: the value of ggml's ``enum ggml_type`` (and of GGUF's tensor type field).
        block_size: elements per block (1 for the float types).
        type_size: bytes per block.
        quantized: whether the type is a block quantization (``False`` for F32, F16, BF16).
        block_dtype: numpy dtype of one block, a packed structured dtype for quantized types.
    """

    name: str = ""
    ggml_type: int = -1
    block_size: int = 1
    type_size: int = 0
    quantized: bool = False
    block_dtype: np.dtype = np.dtype(np.uint8)

    def __repr__(self) -> str:
        return f"<WeightFormat {self.name}>"

    # ------------------------------------------------------------------ sizes

    def _shape(self, shape: Any) -> tuple[int, ...]:
        if isinstance(shape, (int, np.integer)):
            shape = (shape,)
        try:
            dims = tuple(operator.index(n) for n in shape)
        except TypeError:
            raise QuantizationError(
                f"{self.name}: shape must be a tuple of integers, got {shape!r}"
            ) from None
        if any(n < 0 for n in dims):
            raise QuantizationError(f"{self.name}: shape {dims} has a negative dimension")
        return dims

    def n_blocks(self, shape: Iterable[int]) -> int:
        """Number of blocks of a tensor of ``shape``; the row (last dim) must fill whole blocks."""
        dims = self._shape(shape)
        row = dims[-1] if dims else 1
        if row % self.block_size:
            raise QuantizationError(
                f"{self.name}: row size {row} (last dim of shape {dims}) is not a multiple "
                f"of the block size {self.block_size}"
            )
        return int(np.prod(dims, dtype=np.int64)) // self.block_size

    def nbytes(self, shape: Iterable[int]) -> int:
        """Bytes taken by a tensor of ``shape`` (PyTorch order, last dim = row)."""
        return self.n_blocks(shape) * self.type_size

    def _size_error(self, dims: tuple[int, ...], got: int) -> QuantizationError:
        nb = self.n_blocks(dims)
        unit = "blocks" if self.quantized else "elements"
        return QuantizationError(
            f"{self.name} data for shape {dims} needs {nb * self.type_size} bytes "
            f"({nb} {unit} of {self.type_size} bytes), got {got}"
        )

    # -------------------------------------------------------------- public API

    def dequantize(self, data: Any, shape: Iterable[int]) -> np.ndarray:
        """Decode ``data`` (the tensor's bytes) into a new float32 array of ``shape``.

        ``data`` is a 1-D uint8 array (an ``np.memmap`` slice is fine, read-only and at any
        offset), or any bytes-like object; it is never written to. The result equals ggml's
        ``dequantize_row_*`` output bit for bit.
        """
        dims = self._shape(shape)
        raw = _as_bytes(data, self.name)
        nb = self.n_blocks(dims)
        if raw.size != nb * self.type_size:
            raise self._size_error(dims, raw.size)
        out = np.empty(dims, dtype=np.float32)
        if nb == 0:
            return out
        records = raw.view(self.block_dtype)
        out_blocks = out.reshape(nb, self.block_size)
        step = max(1, CHUNK_ELEMENTS // self.block_size)
        with np.errstate(all="ignore"):
            for start in range(0, nb, step):
                stop = min(start + step, nb)
                self._dequantize_blocks(records[start:stop], out_blocks[start:stop])
        return out

    def quantize(self, x: Any) -> np.ndarray:
        """Encode the float array ``x`` (shape ``(..., K)``) into ggml's bytes, a 1-D uint8 array.

        Other float or integer dtypes are first converted to float32, as ggml's converters do.
        The bytes equal those of ggml's reference quantizer ``quantize_row_*_ref``.
        """
        arr = np.asarray(x)
        if arr.dtype.kind not in "fiub":
            raise QuantizationError(
                f"{self.name}: cannot quantize an array of dtype {arr.dtype}, expected float32"
            )
        nb = self.n_blocks(arr.shape)
        out = np.empty(nb * self.type_size, dtype=np.uint8)
        if nb == 0:
            return out
        records = out.view(self.block_dtype)
        blocks = arr.reshape(nb, self.block_size)
        step = max(1, CHUNK_ELEMENTS // self.block_size)
        with np.errstate(all="ignore"):
            for start in range(0, nb, step):
                stop = min(start + step, nb)
                chunk = np.asarray(blocks[start:stop], dtype=np.float32)
                self._quantize_blocks(chunk, records[start:stop])
        return out

    # ------------------------------------------------------- per-format hooks

    def _dequantize_blocks(self, records: np.ndarray, out: np.ndarray) -> None:
        """Decode ``records`` (n blocks of :attr:`block_dtype`) into ``out`` (n, block_size)."""
        raise NotImplementedError

    def _quantize_blocks(self, x: np.ndarray, records: np.ndarray) -> None:
        """Encode ``x`` (n, block_size) float32 into ``records`` (n blocks, writable)."""
        raise NotImplementedError


def _as_bytes(data: Any, name: str) -> np.ndarray:
    """A 1-D uint8 view of ``data`` (copied only when not contiguous)."""
    if isinstance(data, np.ndarray):
        arr = np.asarray(data)  # drops the np.memmap subclass, keeps the view
    else:
        try:
            arr = np.frombuffer(data, dtype=np.uint8)
        except TypeError:
            raise QuantizationError(
                f"{name} data must be a uint8 array or a bytes-like object, "
                f"got {type(data).__name__}"
            ) from None
    if arr.dtype != np.uint8:
        arr = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    return arr


# ------------------------------------------------------------------------------------------
# Helpers reproducing ggml's reference quantizers (ggml-quants.c, quantize_row_*_ref).


def f16_to_f32(h: np.ndarray) -> np.ndarray:
    """float16 field -> float32, exact (as GGML_FP16_TO_FP32), shaped (n, 1) for broadcasting."""
    return h.astype(np.float32)[:, None]


def signed_absmax(x: np.ndarray) -> np.ndarray:
    """Per row, the element of largest magnitude, with its sign, as Q4_0/Q5_0 pick it.

    ggml keeps ``amax = 0, max = 0`` and replaces both when ``amax < fabsf(v)``: the first
    element of largest magnitude wins, NaNs never win, and a row with no element above 0
    (zeros of either sign, NaNs) gives ``+0.0``.
    """
    mag = np.fmax(np.abs(x), np.float32(0))  # NaN -> 0, so a NaN never beats amax
    idx = mag.argmax(axis=1)
    rows = np.arange(x.shape[0])
    return np.where(mag[rows, idx] > 0, x[rows, idx], np.float32(0))


def ggml_min_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row ``(min, max)`` as Q4_1/Q5_1 compute them.

    ggml starts from ``min = FLT_MAX, max = -FLT_MAX`` and updates on ``v < min`` / ``v > max``:
    NaNs are skipped, a row of +inf has ``min == FLT_MAX``, and when the result is a zero its
    sign is the sign of the row's first zero.
    """
    mn = np.fmin.reduce(x, axis=1, initial=FLT_MAX)
    mx = np.fmax.reduce(x, axis=1, initial=-FLT_MAX)
    for ext in (mn, mx):
        zero_rows = np.flatnonzero(ext == 0)
        if zero_rows.size:
            sub = x[zero_rows]
            ext[zero_rows] = sub[np.arange(zero_rows.size), (sub == 0).argmax(axis=1)]
    return mn, mx


def inverse_scale(d: np.ndarray) -> np.ndarray:
    """``d ? 1.0f/d : 0.0f`` in float32 (a NaN d is true in C, so it gives NaN)."""
    out = np.zeros_like(d)
    np.divide(np.float32(1), d, out=out, where=d != 0)
    return out


def truncate_codes(v: np.ndarray, top: int) -> np.ndarray:
    """``MIN(top, (int)v)`` for v >= 0 as uint8; NaN/inf give 0 (x86's result for the UB cast)."""
    q = np.trunc(v)
    q[~np.isfinite(q)] = 0
    np.clip(q, 0, top, out=q)
    return q.astype(np.uint8)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Low 4 bits of codes (n, 32) -> qs (n, 16): element j in the low nibble of byte j,
    element j + 16 in its high nibble."""
    half = q.shape[1] // 2
    return (q[:, :half] & np.uint8(0x0F)) | (q[:, half:] << np.uint8(4))


def unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """qs (n, 16) -> codes (n, 32), the inverse of :func:`pack_nibbles`."""
    n, half = qs.shape
    q = np.empty((n, 2 * half), dtype=np.uint8)
    np.bitwise_and(qs, np.uint8(0x0F), out=q[:, :half])
    np.right_shift(qs, np.uint8(4), out=q[:, half:])
    return q


def pack_high_bits(q: np.ndarray) -> np.ndarray:
    """Bit 4 of codes (n, 32) -> qh (n, 4), the bytes of a little-endian uint32 whose bit j is
    element j's fifth bit."""
    return np.packbits((q >> np.uint8(4)) & np.uint8(1), axis=1, bitorder="little")


def unpack_high_bits(qh: np.ndarray) -> np.ndarray:
    """qh (n, 4) -> (n, 32) uint8 holding 0x10 where element j's fifth bit is set."""
    return np.unpackbits(qh, axis=1, bitorder="little") << np.uint8(4)
