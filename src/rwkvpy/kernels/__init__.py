"""Sequence-mode kernels: whole-prompt forms of the per-token recurrences in :mod:`rwkvpy.models`.

:mod:`.wkv` holds chunked parallel forms of the v5/v6 (:func:`wkv5_chunked`) and v7
(:func:`wkv7_chunked`) state recurrences.
"""

from . import numba_cache  # noqa: F401  (first: numba's cache keyed on all kernel sources)
from .wkv import wkv5_chunked, wkv7_chunked

__all__ = ["wkv5_chunked", "wkv7_chunked"]
