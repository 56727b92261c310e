"""Sequence-mode forms of the RWKV v4, v5/v6 and v7 state recurrences: token by token in
compiled vector code on the CPU (:mod:`.serial`: :func:`wkv4_serial`, :func:`wkv5_serial`,
:func:`wkv7_serial`) and in chunked parallel form for GPUs (:mod:`.chunked`:
:func:`wkv5_chunked`, :func:`wkv7_chunked`).
"""

from .chunked import (
    GPU_CHUNK,
    SAFE_DECAY,
    SCRATCH_BYTES,
    V5_CHUNK,
    V7_CHUNK,
    release_scratch,
    wkv5_chunked,
    wkv7_chunked,
)
from .serial import wkv4_serial, wkv5_serial, wkv7_serial

try:
    from .serial import wkv4_step  # noqa: F401  (numba: the one-token v4 step's)
except ImportError:  # pragma: no cover - numba is optional
    pass

__all__ = [
    "GPU_CHUNK",
    "SAFE_DECAY",
    "SCRATCH_BYTES",
    "V5_CHUNK",
    "V7_CHUNK",
    "release_scratch",
    "wkv4_serial",
    "wkv5_chunked",
    "wkv5_serial",
    "wkv7_chunked",
    "wkv7_serial",
]
