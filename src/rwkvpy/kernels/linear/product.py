"""One entry for every numba product: :func:`row_product` runs a matrix's product from numba
code (the fused one-token blocks) on a *spec*, the tuple :meth:`Linear.numba_spec` gives, whose
length names the product kind (kernels.linear.spec), so that numba compiles only the kinds a
model has.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..kinds import CHUNK
from . import kquant_drivers as _kq
from .rows import _mv_par, _mv_rows
from .spec import _LEN_K_ROWS, _LEN_K_ROWS_INT8, _LEN_K_X8, _LEN_ROWS, _LEN_X8_INT8, _LEN_X8_INT16
from .threads import SERIAL_MAX_ELEMENTS, _row_chunk
from .x8 import _mvx8, _mvx8_par, _mvx8w, _mvx8w_par

_CACHE = {"cache": True, "nogil": True}
#: Elements per block of every row format (passed to the kernels at run time).
_QK = CHUNK


@njit(**_CACHE)
def row_product_serial(spec, x2, y2):
    """y2 (T, out) = x2 (T, in) @ W^T on the calling thread (see :func:`row_product`). Its own
    function, so that a caller on one thread compiles no parallel kernel."""
    kind, a, b = spec[1], spec[2], spec[3]
    n_out = y2.shape[1]
    if len(spec) == _LEN_ROWS:
        _mv_rows(kind, a, x2, y2, np.int64(0), n_out, _QK)
    elif len(spec) == _LEN_X8_INT8:
        _mvx8(kind, a, b, x2, y2)
    elif len(spec) == _LEN_X8_INT16:
        _mvx8w(a, b, x2, y2)
    elif len(spec) == _LEN_K_X8:
        _kq.mvx8(kind, a, b, x2, y2)
    elif len(spec) == _LEN_K_ROWS_INT8:
        _kq.mvq(kind, a, x2, y2)
    elif len(spec) == _LEN_K_ROWS:
        _kq.mv_rows(kind, a, x2, y2, np.int64(0), n_out)


@njit(**_CACHE)
def row_product(spec, x2, y2, n):
    """y2 (T, out) = x2 (T, in) @ W^T from numba code (kernels/decode/'s whole-block
    kernels), ``spec`` being the matrix's :meth:`Linear.numba_spec`; on numba's ``n``
    threads (the caller has set them; 1: serial, :func:`row_product_serial`) when the matrix
    is large, as :func:`_rows_kernel` decides in Python."""
    kind, a, b = spec[1], spec[2], spec[3]
    n_out = y2.shape[1]
    if not (n > 1 and n_out * x2.shape[1] > SERIAL_MAX_ELEMENTS):
        row_product_serial(spec, x2, y2)
        return
    chunk = _row_chunk(n_out, n)
    if len(spec) == _LEN_ROWS:
        _mv_par(kind, a, x2, y2, chunk, _QK)
    elif len(spec) == _LEN_X8_INT8:
        _mvx8_par(kind, a, b, x2, y2, max(1, chunk // 8))
    elif len(spec) == _LEN_X8_INT16:
        _mvx8w_par(a, b, x2, y2, max(1, chunk // 8))
    elif len(spec) == _LEN_K_X8:
        _kq.mvx8_par(kind, a, b, x2, y2, max(1, chunk // 8))
    elif len(spec) == _LEN_K_ROWS_INT8:
        _kq.mvq_par(kind, a, x2, y2, chunk)
    elif len(spec) == _LEN_K_ROWS:
        _kq.mv_par(kind, a, x2, y2, chunk)
