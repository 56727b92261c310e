"""Compiled CPU kernels, by concern:

* :mod:`.linear`: the matrix products (one class per storage format and policy, make_linear
  the one place that picks; exact row kernels, the integer products, the K-quants' drivers,
  prompt tiles, numba's threads); :mod:`.kquants`: the K-quants' linears;
* :mod:`.decode`: the one-token step, one module per RWKV version;
* :mod:`.wkv`: the v4, v5/v6 and v7 state recurrences over a sequence: token by token in
  compiled vector code on the CPU (wkv/serial.py: :func:`wkv5_serial`, :func:`wkv7_serial`)
  and in chunked parallel form for GPUs (wkv/chunked.py: :func:`wkv5_chunked`,
  :func:`wkv7_chunked`), imported from here on first use;
* :mod:`.ir`: the explicit LLVM vector code they are built from, by subject (the K-quants'
  too); :mod:`.kinds`: the formats as the kernels number them;
* :mod:`.plan`: the one place that chooses a model's fast paths (products, recurrences, the
  one-token step, the repack cache) for its mode, devices and CPU level (:mod:`.cpu`);
  :mod:`.cache` (repacked weights on disk), :mod:`.gpu`; numba's cache:
  :mod:`rwkvpy.numba_cache`.

Importing this package defines no kernel and compiles nothing.
"""

from .. import numba_cache  # noqa: F401  (first: numba's cache, before any kernel is defined)

__all__ = ["wkv5_chunked", "wkv5_serial", "wkv7_chunked", "wkv7_serial"]


def __getattr__(name):
    if name in __all__:
        from . import wkv

        return getattr(wkv, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
