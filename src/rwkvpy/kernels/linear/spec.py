"""A numba product *spec*: how numba code (kernels.linear.product.row_product) runs one matrix's
product, the tuple :meth:`Linear.numba_spec` gives: (product kind, format kind, arrays) padded
with Nones, its length naming the product kind.
"""

from __future__ import annotations

import numpy as np

#: Product kinds of a numba spec (Linear.numba_spec, row_product): rows of any format
#: (_mv_rows), interleaved groups with int8 activations (_mvx8), with int16 ones (_mvx8w);
#: K-quants (kernels/linear/kquant_drivers.py, ``kind`` kernels/ir/kquants.py's KIND): exact
#: rows (mv_rows), rows with int8 activations (mvq), interleaved groups with int8 activations
#: (mvx8).
ROWS, X8_INT8, X8_INT16, K_ROWS, K_ROWS_INT8, K_X8 = 0, 1, 2, 3, 4, 5
#: The length of a spec of each product kind (:func:`_spec`: 4 + the kind's number, padded
#: with Nones): numba reads a tuple argument's length when it compiles and drops
#: row_product's branches of the other kinds, so a model compiles the products it has only.
_LEN_ROWS, _LEN_X8_INT8, _LEN_X8_INT16, _LEN_K_ROWS, _LEN_K_ROWS_INT8, _LEN_K_X8 = (
    4,
    5,
    6,
    7,
    8,
    9,
)
_NO_TAIL = np.zeros((0, 0), np.uint8)


def _spec(mode: int, kind: int, a: np.ndarray, b: np.ndarray | None = None) -> tuple | None:
    """A numba product spec (see :func:`row_product`), or None for strided arrays (never
    copied): (mode, kind, a, b) and ``mode`` Nones (the length tells row_product the mode when
    it compiles), the arrays as read-only uint8 views, so that the specs of a mode have one
    numba type."""
    arrs = []
    for arr in (a, _NO_TAIL if b is None else b):
        if arr.dtype != np.uint8 or arr.ndim != 2 or not arr.flags.c_contiguous:
            return None
        v = arr.view()
        v.flags.writeable = False
        arrs.append(v)
    return (mode, kind, *arrs) + (None,) * mode
