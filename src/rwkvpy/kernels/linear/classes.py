"""The weight containers ("linears"), one class per storage format and policy, all with the
interface of :class:`Linear` (kernels.linear's docstring has the table of which serves what).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...formats.base import QTensor, release_pages
from ...quant import get_format
from ..kinds import BLOCK_KINDS, CHUNK, Kind
from .spec import ROWS, X8_INT8, X8_INT16, _spec
from .threads import HAVE_NUMBA, _rows_kernel
from .tiles import _tiled_convert_mm, _tiled_dequant_mm

if HAVE_NUMBA:
    from .product import row_product, row_product_serial
    from .rows import _dec_par, _dec_rows
    from .x8 import _dec_par_x8, _dec_rows_x8, repack_x8

#: Largest T for which the numba kernels handle a prompt themselves (one pass over the weights
#: per vector); above it, row tiles are dequantized and multiplied by torch's GEMM (the
#: crossover: docs/kernels.md).
NUMBA_MAX_T = 2
#: Elements per block of the row formats (passed to the tile decoders at run time).
_QK = CHUNK
#: The formats whose rows :class:`BlockLinear` and the integer classes read.
_BLOCK_NAMES = tuple(k.name for k in BLOCK_KINDS)


class Linear:
    """y = x @ W^T. ``x`` float32 ``(in,)`` or ``(T, in)`` (other float dtypes are converted,
    more leading dimensions are flattened); returns float32 ``(out,)`` or ``(T, out)``.

    Attributes: ``out_features``, ``in_features``, ``fmt`` (storage format, ggml's name),
    ``nbytes`` (bytes of weights read per matrix-vector product), ``strategy`` (kernel name),
    ``exact`` (True: equal to the float32 reference up to summation order).
    """

    out_features: int
    in_features: int
    fmt: str
    nbytes: int
    strategy: str = ""
    exact: bool = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            x = x.float()
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: input has {x.shape[-1]} features, "
                f"expected {self.in_features}"
            )
        if x.dim() == 1:
            return self._mv(x)
        if x.dim() == 2:
            return self._mm(x)
        lead = x.shape[:-1]
        return self._mm(x.reshape(-1, self.in_features)).reshape(*lead, self.out_features)

    #: Largest T served by :meth:`_rows` (a numba kernel, numpy in and out); 0: none.
    rows_max_t = 0

    def _mv(self, x: torch.Tensor) -> torch.Tensor:
        return self._mm(x.unsqueeze(0)).squeeze(0)

    def np_mm(self, x: np.ndarray) -> np.ndarray:
        """``x`` float32 (T, in) numpy, C-contiguous -> (T, out) numpy: the one-token step's
        entry (kernels/decode/), without torch conversions where a numba kernel serves."""
        if x.shape[0] <= self.rows_max_t:
            return self._rows(x)
        return self._mm(torch.from_numpy(x)).numpy()

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.rows_max_t:
            return torch.from_numpy(self._rows(x.contiguous().numpy()))
        return self._gemm(x)

    def _rows(self, xn: np.ndarray) -> np.ndarray:
        """T <= ``rows_max_t`` vectors in one pass of the numba kernels over the weights
        (:func:`row_product` on :meth:`numba_spec`), parallel where :func:`_rows_kernel`
        decides."""
        spec = self.numba_spec()
        y = np.empty((xn.shape[0], self.out_features), np.float32)
        _rows_kernel(
            lambda: row_product_serial(spec, xn, y),
            lambda n: row_product(spec, xn, y, n),
            self.out_features,
            self.in_features,
        )
        return y

    def numba_spec(self) -> tuple | None:
        """How numba code runs this product (:func:`row_product`) for up to ``rows_max_t``
        vectors, or None where the product is torch's."""
        return None

    def _cached_spec(self, mode: int, a: np.ndarray, b: np.ndarray | None = None):
        spec = self.__dict__.get("_numba_spec")
        if spec is None:
            spec = self._numba_spec = _spec(mode, self._kind, a, b)
        return spec

    def _gemm(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.fmt}, {self.out_features}x{self.in_features}, "
            f"{self.strategy})"
        )


class F32Linear(Linear):
    """Float32 weights: ``torch.mv`` for one vector (MKL sgemv: as fast as ``F.linear`` on one
    vector or faster in docs/kernels.md's measurements), ``F.linear`` (MKL sgemm) for T > 1.
    Exact.

    Where numba is missing, also the strategy for F16/BF16 weights (``fmt="F16"``, converted
    to float32 at load); with numba :class:`FloatLinear` reads them as stored, faster.
    """

    strategy = "torch-f32"

    def __init__(self, w: torch.Tensor, fmt: str = "F32"):
        src = w
        w = w.detach().to(torch.float32)
        self.out_features, self.in_features = (int(s) for s in w.shape)
        self.fmt = fmt
        self.nbytes = w.numel() * 4
        # Tall matrices (out > in: the head, the FFN key) are stored transposed, (in, out)
        # contiguous, and multiplied as x @ W^T, which measured faster for them; wide ones
        # (768x3072) are faster row-major (docs/kernels.md). For a file's
        # F32 tensor this is one copy at load, which replaces the mapped one in use.
        self.transposed = self.out_features > self.in_features
        self.weight_t = w.t().contiguous() if self.transposed else None
        self.weight = self.weight_t.t() if self.transposed else w.contiguous()
        if self.weight.data_ptr() != src.data_ptr():
            # a copy (F16 -> F32, or transposed) replaces a mapped file's tensor: its pages
            # leave the resident set instead of doubling it (formats.base.release_pages)
            release_pages(src)

    def _mv(self, x):
        if self.transposed:
            return x @ self.weight_t
        return torch.mv(self.weight, x)

    def _mm(self, x):
        if self.transposed:
            return x @ self.weight_t
        return F.linear(x, self.weight)


class DequantLinear(F32Linear):
    """Any weight dequantized to float32 at load (exact; 2-8x the memory and bytes per token
    of the stored format). The fallback without numba."""

    strategy = "dequant-f32"

    def __init__(self, w, fmt: str | None = None):
        if isinstance(w, QTensor):
            fmt = fmt or get_format(w.fmt).name
            w = w.dequantize()
        super().__init__(w, fmt or _torch_fmt(w))


class FloatLinear(Linear):
    """F32, F16 or BF16 weights kept exactly as stored (no copy: a file's tensor stays a view
    of its mapping), float32 activations: one vectorized numba kernel per matrix-vector
    product (kernels/ir/rows.py: F16 widened by ``vcvtph2ps``, BF16 by a shift), float32 lanes.
    Exact. For T > :data:`NUMBA_MAX_T`: torch's float32 GEMM (F16/BF16 row tiles converted to
    float32 first). Its speeds against torch.mv: docs/kernels.md.
    """

    strategy = "numba-float"

    def __init__(self, w: torch.Tensor, fmt: str | None = None):
        if not HAVE_NUMBA:  # pragma: no cover
            raise RuntimeError("FloatLinear needs numba")
        if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(
                f"FloatLinear stores float32, float16 or bfloat16 weights, got {w.dtype}"
            )
        self.fmt = fmt or _torch_fmt(w)
        self.weight = w.detach().contiguous()
        self.out_features, self.in_features = _shape2(self.weight.shape)
        self.nbytes = self.weight.numel() * self.weight.element_size()
        self._kind = int(Kind[_torch_fmt(w)])
        raw = self.weight.view(torch.uint8).numpy().reshape(self.out_features, -1)
        raw.flags.writeable = False
        self._raw2 = raw

    rows_max_t = NUMBA_MAX_T

    def numba_spec(self):
        return self._cached_spec(ROWS, self._raw2)

    def _gemm(self, x):
        if self.weight.dtype == torch.float32:
            return F.linear(x, self.weight)
        return _tiled_convert_mm(self.weight, x)


class BlockLinear(Linear):
    """Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 weights as ggml's blocks (no repacking, no copy of an
    ``np.memmap``), numba kernels parallel over output rows: each weight decoded exactly as
    ggml's ``dequantize_row_*``, multiplied and accumulated in float32 (see the notes above the
    kernels). Exact: equal to the float32 ``x @ dequantize(W).T`` up to summation order.

    T <= :data:`NUMBA_MAX_T` vectors in the same kernel (each row's bytes stay in L1 across
    them); larger T: row tiles dequantized by numba (bit-exact) to float32, multiplied with
    torch's float32 GEMM.

    One vector is compute-bound on AVX2 (the block decoding's arithmetic); prompts run at the
    speed of float32 weights, the tiles' dequantization a small part of it (docs/kernels.md).
    Crossover with tiles: :data:`NUMBA_MAX_T`.
    """

    strategy = "numba-blocks"

    def __init__(self, w: QTensor):
        if not HAVE_NUMBA:  # pragma: no cover
            raise RuntimeError("BlockLinear needs numba")
        fmt = get_format(w.fmt)
        if fmt.name not in _BLOCK_NAMES:
            raise ValueError(f"BlockLinear reads Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks, got {fmt.name}")
        self.fmt = fmt.name
        self.out_features, self.in_features = _shape2(w.shape)
        self._raw2 = _rows_view(w, fmt, self.out_features, self.in_features)
        self._kind = int(Kind[fmt.name])
        self.nbytes = int(self._raw2.nbytes)

    rows_max_t = NUMBA_MAX_T

    def numba_spec(self):
        return self._cached_spec(ROWS, self._raw2)

    def _gemm(self, x):
        kind, raw2 = self._kind, self._raw2
        return _tiled_dequant_mm(
            lambda out, r0, r1: _dec_rows(kind, raw2, out, r0, r0, r1, _QK),
            lambda out, r0, r1, chunk: _dec_par(kind, raw2, out, r0, r1, chunk, _QK),
            x,
            self.out_features,
        )


class Int8DotLinear(Linear):
    """Q4_0, Q4_1, Q5_0, Q5_1 (and Q8_0) weights repacked once into groups of 8 interleaved rows (the same
    bytes, moved: kernels/ir/x8.py), the activations rounded to int8 per 32-value block, integer
    dot products with AVX2's vpmaddubsw / vpmaddwd: ggml's method of multiplying (rwkv.cpp
    multiplies its quantized matrices this way), in a layout where each row's sum stays in its
    own lane. ``policy="fast"`` on CPUs with AVX2.

    Lossy through the activations only: each block of 32 is rounded with its own scale
    amax / 127 (float32), so an element moves by at most 1/254 of its block's largest
    magnitude; the weights are used exactly. Error added on the rwkv.cpp fixtures: see
    tests/test_fast_paths.py and the README.

    Memory: the repacked groups replace the file's bytes (the file's pages are released after
    repacking; rows past the last whole group stay as ggml's rows). ``repacked()`` gives them
    to the repack cache, so that a later load memory-maps them instead of repacking.

    Prompts (any T) run the same integer products, four vectors per pass over a group's codes,
    faster than exactly dequantized tiles and torch's float32 GEMM at every T (the
    interleaved layout's and the prompts' measurements: docs/kernels.md).
    """

    strategy = "int8-dot"
    exact = False
    rows_max_t = 1 << 62  # every T: the integer kernels (above)

    def __init__(self, w: QTensor, repacked: dict | None = None):
        if not HAVE_NUMBA:  # pragma: no cover
            raise RuntimeError("Int8DotLinear needs numba")
        fmt = get_format(w.fmt)
        if fmt.name not in _BLOCK_NAMES:
            raise ValueError(f"Int8DotLinear reads Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks, got {fmt.name}")
        self.fmt = fmt.name
        O, K = self.out_features, self.in_features = _shape2(w.shape)
        self._kind = int(Kind[fmt.name])
        row_bytes = fmt.nbytes((1, K))
        shapes = {"x8": (O // 8, 8 * row_bytes), "tail": (O % 8, row_bytes)}
        if repacked is not None and all(
            isinstance(repacked.get(k), torch.Tensor)
            and repacked[k].dtype == torch.uint8
            and tuple(repacked[k].shape) == v
            for k, v in shapes.items()
        ):
            self._pk = repacked["x8"].numpy()
            self._tail = repacked["tail"].numpy()
        else:
            raw2 = _rows_view(w, fmt, O, K)
            self._pk = repack_x8(self._kind, raw2)
            self._tail = np.array(raw2[8 * (O // 8) :])
            release_pages(raw2)  # the file's copy is not read again
        self.nbytes = int(self._pk.nbytes + self._tail.nbytes)

    def repacked(self) -> dict:
        return {"x8": torch.from_numpy(self._pk), "tail": torch.from_numpy(self._tail)}

    def numba_spec(self):
        return self._cached_spec(X8_INT8, self._pk, self._tail)

    def _gemm(self, x):
        kind, pk, tail = self._kind, self._pk, self._tail
        return _tiled_dequant_mm(
            lambda out, r0, r1: _dec_rows_x8(kind, pk, tail, out, r0, r0, r1, _QK),
            lambda out, r0, r1, chunk: _dec_par_x8(kind, pk, tail, out, r0, r1, chunk, _QK),
            x,
            self.out_features,
        )


class Int16DotLinear(Int8DotLinear):
    """Q8_0 weights in Int8DotLinear's interleaved groups, the activations rounded to int16 per
    32-value block (scale amax / 32767), integer products with vpmaddwd (kernels/ir/x8.py,
    ``dotx8w_q8_0``). ``policy="fast"`` for Q8_0 on CPUs with AVX2.

    Why not int8 activations as for Q4/Q5: against 8-bit weights they double Q8_0's own error
    (docs/performance.md, "Speed"); 16-bit ones move each activation by at most 1/65534 of its block's
    largest magnitude, which adds well under 1 % of the format's own error on the fixtures
    (tests/test_fast_paths.py), at the speed of the int8 kernels. Rows past the last whole
    group use the exact float kernel.
    """

    strategy = "int16-dot"
    # every T (inherited): the step-by-step x8 kernels (kernels/ir/x8.py) beat exact tiles and
    # float32 GEMM at every length (docs/kernels.md)

    def __init__(self, w: QTensor, repacked: dict | None = None):
        if w.fmt != "Q8_0":
            raise ValueError(f"Int16DotLinear reads Q8_0 blocks, got {w.fmt}")
        super().__init__(w, repacked)

    def numba_spec(self):
        return self._cached_spec(X8_INT16, self._pk, self._tail)


def _rows_view(w: QTensor, fmt, O: int, K: int) -> np.ndarray:
    """The tensor's bytes as a read-only (O, row_bytes) uint8 view (copied only if they are
    not contiguous)."""
    if K % fmt.block_size:
        raise ValueError(
            f"{fmt.name}: in_features {K} is not a multiple of the block size {fmt.block_size}"
        )
    raw = np.asarray(w.data).reshape(-1)
    if raw.dtype != np.uint8:
        raw = np.ascontiguousarray(raw).view(np.uint8)
    want = fmt.nbytes((O, K))
    if raw.size != want:
        raise ValueError(
            f"{fmt.name} data of {raw.size} bytes does not fit shape {(O, K)} ({want} bytes)"
        )
    raw2 = np.ascontiguousarray(raw).reshape(O, -1).view()
    raw2.flags.writeable = False
    return raw2


def _torch_fmt(w) -> str:
    return {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}.get(
        w.dtype, str(w.dtype)
    )


def _shape2(shape) -> tuple[int, int]:
    if len(shape) != 2:
        raise ValueError(f"a linear weight must be 2-D (out, in), got shape {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def _qtensor_to_torch(w: QTensor) -> torch.Tensor:
    """An unquantized QTensor (F32/F16/BF16 bytes) as a torch tensor (a copy)."""
    fmt = get_format(w.fmt)
    np_dt, t_dt = {
        "F32": (np.float32, None),
        "F16": (np.float16, None),
        "BF16": (np.int16, torch.bfloat16),
    }[fmt.name]
    raw = np.asarray(w.data).reshape(-1)
    if raw.dtype != np.uint8:
        raw = np.ascontiguousarray(raw).view(np.uint8)
    t = torch.from_numpy(np.array(raw.view(np_dt).reshape(w.shape)))
    return t.view(t_dt) if t_dt is not None else t
