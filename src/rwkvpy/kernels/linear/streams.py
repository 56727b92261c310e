"""Where the streams of a one-vector product start: the kernels that read several rows or
groups of a matrix at once (ir.x8's ``dotsx8_*``, ir.kquants_x8's, ir.rows' ``dots_*``) take
them ``stream_groups(...)`` rows or groups apart.
"""

from __future__ import annotations

from numba import njit

#: Bytes of one way of the L1 data cache (its sets times its 64-byte line: 32 KiB 8-way on AMD
#: Zen, 48 KiB 12-way on Intel's recent cores): addresses a multiple of this apart share a set.
L1_WAY_BYTES = 4096
#: The least distance, modulo L1_WAY_BYTES, between any two streams of one product
#: (stream_groups): streams at the same offset of their pages (on the same L1 sets) read at
#: about half speed in some shapes (docs/kernels.md, "Streams off one cache set").
STREAM_GAP = 128
#: The least distance between two streams' starts (bytes): closer streams read slower than the
#: same rows or groups read one by one (docs/kernels.md, "Streams only far apart"), so a range
#: of fewer than ns times this many bytes is read one by one.
STREAM_MIN_BYTES = 48 << 10


@njit(inline="always", cache=True, nogil=True)
def stream_groups(n, row_bytes, ns):
    """Rows (or groups) between the starts of ``ns`` streams that read ``n`` of them, each
    ``row_bytes`` long, at once (what comes after the streams' end the caller reads one by
    one): 0 (no streams) where n // ns of them are fewer than STREAM_MIN_BYTES; else n // ns,
    or the largest count at most an eighth fewer that keeps every two streams STREAM_GAP bytes
    apart modulo L1_WAY_BYTES (n // ns where none does)."""
    q = n // ns
    if q * row_bytes < STREAM_MIN_BYTES:
        return 0
    for s in range(q, q - q // 8 - 1, -1):  # q >= 1 here: every s >= 1
        ok = True
        for k in range(1, ns):
            d = (k * s * row_bytes) % L1_WAY_BYTES
            if min(d, L1_WAY_BYTES - d) < STREAM_GAP:
                ok = False
        if ok:
            return s
    return q
