"""numba's threads for the product kernels: the threading layer, the pool's size, the lock
around parallel launches, and the choice between a driver's serial and parallel form.

The numba kernels run on as many threads as ``torch.get_num_threads()``. numba's threading
layer is chosen here (``numba.config``, before its first parallel launch): OpenMP first, else
'workqueue', unless the user chose one (``NUMBA_THREADING_LAYER`` or
``NUMBA_THREADING_LAYER_PRIORITY`` in the environment, or ``numba.config.THREADING_LAYER`` set
before rwkvpy's kernels are imported): that choice stays. A launch on OpenMP's spinning pool
costs a few microseconds, on workqueue tens of microseconds. Decode runs every product in
numba, so torch's own OpenMP pool (a second one) stays idle between prompts. workqueue aborts
the process when two Python threads launch parallel kernels at once, so launches take
:data:`PARALLEL_LOCK` (a caller that finds it held runs the serial kernel). Below
:data:`SERIAL_MAX_ELEMENTS` weights, or with one torch thread, the serial kernel runs
directly.
"""

from __future__ import annotations

import os
import threading

import torch

try:  # numba is optional
    import numba
    from numba import njit

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    HAVE_NUMBA = False

#: numba's variables that choose its threading layer: where the user set one, rwkvpy keeps it.
USER_LAYER_VARIABLES = ("NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY")

#: Below this many weight elements a numba matvec runs serially (a launch costs more than the
#: work it splits).
SERIAL_MAX_ELEMENTS = 1 << 18

if HAVE_NUMBA:
    from numba.np.ufunc import parallel as _nb_parallel

    if (
        not getattr(_nb_parallel, "_is_initialized", False)
        and numba.config.THREADING_LAYER == "default"
        and not any(k in os.environ for k in USER_LAYER_VARIABLES)
    ):
        # Set before the first parallel launch (importing numba does not read it again):
        # OpenMP where numba finds it, else workqueue (see the module docstring).
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]

    @njit(cache=True, nogil=True)
    def _row_chunk(n_out, n):
        """Rows per chunk of a row-parallel kernel on n threads: 8 chunks per thread."""
        return max(1, -(-n_out // (8 * n)))


#: Held while a numba parallel kernel runs. numba's workqueue layer (the fallback where OpenMP is
#: missing) aborts the process when two
#: Python threads launch parallel kernels at once, so a caller that finds it taken runs the
#: serial kernel instead (every kernel releases the GIL). Other numba parallel code in the
#: process should take it too.
PARALLEL_LOCK = threading.Lock()


_POOL = threading.local()  # numba's thread count is a per-thread setting


def start_numba_pool() -> None:
    """Start numba's thread pool now. Its OpenMP layer sets the process's OpenMP thread count
    (torch's too: they share the runtime) to numba's pool size when it starts, which happens at
    the first call of a function that holds a parallel kernel; started before torch's count is
    set, the count asked for stays."""
    if HAVE_NUMBA:
        numba.get_num_threads()


def _numba_threads(n: int | None = None) -> int:
    """Point numba's pool at torch's thread count (capped by numba's pool size)."""
    n = max(1, min(torch.get_num_threads() if n is None else n, numba.config.NUMBA_NUM_THREADS))
    if getattr(_POOL, "n", None) != n:
        numba.set_num_threads(n)
        _POOL.n = n
    return n


def _rows_kernel(serial, parallel, n_out, K):
    """Run a row-parallel driver: ``parallel(n)`` on numba's n threads for a large matrix when
    torch allows more than one thread and no other parallel launch is running, else
    ``serial()``."""
    n = torch.get_num_threads()
    if n_out * K > SERIAL_MAX_ELEMENTS and n > 1 and PARALLEL_LOCK.acquire(blocking=False):
        try:
            parallel(_numba_threads(n))
        finally:
            PARALLEL_LOCK.release()
    else:
        serial()
