"""Sequence-mode kernels: whole-prompt forms of the per-token recurrences in :mod:`rwkvpy.models`.

:mod:`.wkv` holds the v5/v6 and v7 state recurrences over a sequence: token by token in compiled
vector code on the CPU (:func:`wkv5_serial`, :func:`wkv7_serial`) and in chunked parallel form
for GPUs (:func:`wkv5_chunked`, :func:`wkv7_chunked`).
"""

from . import numba_cache  # noqa: F401  (first: numba's cache keyed on all kernel sources)
from .wkv import wkv5_chunked, wkv5_serial, wkv7_chunked, wkv7_serial

__all__ = ["wkv5_chunked", "wkv5_serial", "wkv7_chunked", "wkv7_serial"]
