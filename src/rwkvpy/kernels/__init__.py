"""Compiled kernels: the matrix products (:mod:`.linear`), the one-token step (:mod:`.fused`), the
sequence-mode recurrences (:mod:`.wkv`) and their pieces.

:mod:`.wkv` holds the v5/v6 and v7 state recurrences over a sequence: token by token in compiled
vector code on the CPU (:func:`wkv5_serial`, :func:`wkv7_serial`) and in chunked parallel form
for GPUs (:func:`wkv5_chunked`, :func:`wkv7_chunked`); they are imported from here on first use
(importing this package defines no kernel and compiles nothing).
"""

from . import numba_cache  # noqa: F401  (first: numba's cache, before any kernel is defined)

__all__ = ["wkv5_chunked", "wkv5_serial", "wkv7_chunked", "wkv7_serial"]


def __getattr__(name):
    if name in __all__:
        from . import wkv

        return getattr(wkv, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
