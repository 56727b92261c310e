"""Weight containers ("linears"): y = x @ W^T for a weight W (out, in) in each storage format.

Every class has the same interface (:class:`Linear`): ``lin(x)`` takes float32 ``x`` of shape
``(in,)`` or ``(T, in)`` and returns float32 ``(out,)`` or ``(T, out)``; ``out_features``,
``in_features``, ``fmt`` (the storage format, ggml's name), ``nbytes`` (bytes of weights read
per matrix-vector product), ``strategy`` (a short name of the kernel) and ``exact``.
:func:`make_linear` picks the class for a weight and a policy:

* ``policy="exact"``: weights exactly as stored, float32 activations, float32 accumulation:
  equal to ``x @ dequantize(W).T`` in float32 up to summation order (tested at 1e-5 of the
  output scale).
* ``policy="fast"``: a lossy kernel where it is clearly faster and its error is small against
  the format's own (documented per class, measured in tests/test_kernels_linear.py and, on the
  fixtures' logits, tests/test_fast_paths.py).

Per format (one token; prompts: see below), with the CPU level of kernels/cpu.py:

=========  =============================================  ===================================
format     policy="exact"                                 policy="fast" (default of load)
=========  =============================================  ===================================
F32        :class:`FloatLinear` (numba, as stored)        same, at every level
F16, BF16  :class:`FloatLinear` (numba, 2 bytes/weight)   same, at every level
Q4_0/Q4_1  :class:`BlockLinear` (numba on ggml blocks)    level avx2 and up:
Q5_0/Q5_1  :class:`BlockLinear`                           :class:`Int8DotLinear` (groups of 8
                                                          interleaved rows, int8 activations);
                                                          generic: :class:`BlockLinear`
Q8_0       :class:`BlockLinear`                           avx2 and up: :class:`Int16DotLinear`
                                                          (int16 activations); generic:
                                                          :class:`BlockLinear`
=========  =============================================  ===================================

No product rounds F16/BF16/F32 weights or their activations: torch's bf16 products on the CPU
return bf16 outputs, whose 8 significant bits break the accuracy contract (docs/accuracy.md),
so native-bf16 CPUs multiply these formats in float32 too.

The integer classes repack once (cached, kernels/cache.py); the exact ones read the file's bytes
as they are. Every numba product is one of kernels/ir/'s explicit LLVM vector kernels, whose
operation order is fixed in the IR: the same numbers on every CPU that runs them. The integer
classes read interleaved groups because ggml's row order keeps too few reads in flight; torch's
own kernels (torch.mv, int4 and int8 weight kernels with bf16 activations) were slower in whole
tokens or lossier than the formats (docs/performance.md). :class:`F32Linear` and
:class:`DequantLinear` serve where numba is missing.

Prompts (T > 1): the float kernels take T <= :data:`NUMBA_MAX_T` vectors in one pass; above,
the weights are dequantized in row tiles (bit-exact) and multiplied with torch's float32 GEMM,
which is far faster per flop. :class:`Int8DotLinear` and :class:`Int16DotLinear` take every T
with their integer kernels (4 vectors per pass over the codes).

Threads: the numba kernels run on torch's thread count (:mod:`.threads`). numba is optional:
without it the quantized formats are dequantized to float32 at load (exact, 2-8x the memory)
and F16/BF16 weights are converted to float32.

Modules: :mod:`.classes` (the interface :class:`Linear` and one class per format and policy),
:mod:`.choose` (:func:`make_linear`), :mod:`.rows` (exact products on ggml's rows), :mod:`.x8`
(the integer products on interleaved groups), :mod:`.tiles` (prompts through torch's GEMM),
:mod:`.product` (:func:`row_product`, the entry of numba code), :mod:`.threads` (numba's pool).
"""

from __future__ import annotations

from .choose import INT8_DOT_FORMATS, INT16_DOT_FORMATS, POLICIES, _int8_dot, make_linear  # noqa: F401
from .classes import (
    NUMBA_MAX_T,
    BlockLinear,
    DequantLinear,
    F32Linear,
    FloatLinear,
    Int8DotLinear,
    Int16DotLinear,
    Linear,
)
from .spec import K_ROWS, K_ROWS_INT8, K_X8, ROWS, X8_INT8, X8_INT16
from .threads import HAVE_NUMBA, PARALLEL_LOCK, SERIAL_MAX_ELEMENTS, start_numba_pool  # noqa: I001
from .tiles import TILE_ELEMENTS

if HAVE_NUMBA:
    from .product import row_product  # noqa: F401
    from .x8 import X8_TOKENS, repack_x8  # noqa: F401

__all__ = [
    "HAVE_NUMBA",
    "INT8_DOT_FORMATS",
    "INT16_DOT_FORMATS",
    "K_ROWS",
    "K_ROWS_INT8",
    "K_X8",
    "NUMBA_MAX_T",
    "PARALLEL_LOCK",
    "POLICIES",
    "ROWS",
    "SERIAL_MAX_ELEMENTS",
    "TILE_ELEMENTS",
    "X8_INT8",
    "X8_INT16",
    "BlockLinear",
    "DequantLinear",
    "F32Linear",
    "FloatLinear",
    "Int16DotLinear",
    "Int8DotLinear",
    "Linear",
    "make_linear",
    "start_numba_pool",
] + (["X8_TOKENS", "repack_x8", "row_product"] if HAVE_NUMBA else [])
