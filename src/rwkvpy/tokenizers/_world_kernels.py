"""Numba kernels of the World tokenizer (imported only when numba is installed).

The trie of the vocabulary is flat: node ids 0..n-1; ``root[b]`` is the node of the one-byte
prefix ``b`` (-1: none); every deeper edge (parent node, byte) -> child node lives in an
open-addressing hash table (``keys``: ``parent << 8 | byte`` as uint64, ``EMPTY`` where free;
``vals``: child node), probed linearly from a multiplicative (Fibonacci) hash of the key.
``node_token[node]`` is the token id that ends at the node, -1 where none does. The table is
built in ``world._hash_table`` with the same constants.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .. import numba_cache  # noqa: F401  (numba's cache in the user cache folder)

EMPTY = np.uint64(0xFFFFFFFFFFFFFFFF)
_MUL = np.uint64(0x9E3779B97F4A7C15)
_ONE = np.uint64(1)
_EIGHT = np.uint64(8)


@njit(cache=True, nogil=True)
def encode(data, root, node_token, keys, vals, shift, out):
    """Greedy longest match over ``data`` (uint8); writes the token ids to ``out`` and returns
    how many. Returns ``-(i + 1)`` when no token starts with the bytes at offset ``i``."""
    n = data.shape[0]
    mask = np.uint64(keys.shape[0] - 1)
    i = 0
    k = 0
    while i < n:
        node = root[data[i]]
        if node < 0:
            return -(i + 1)
        best_tok = node_token[node]
        best_end = i + 1
        j = i + 1
        while j < n:
            key = (np.uint64(node) << _EIGHT) | np.uint64(data[j])
            h = (key * _MUL) >> shift
            child = -1
            while True:
                kk = keys[h]
                if kk == key:
                    child = vals[h]
                    break
                if kk == EMPTY:
                    break
                h = (h + _ONE) & mask
            if child < 0:
                break
            node = child
            j += 1
            t = node_token[node]
            if t >= 0:
                best_tok = t
                best_end = j
        if best_tok < 0:
            return -(i + 1)
        out[k] = best_tok
        k += 1
        i = best_end
    return k
