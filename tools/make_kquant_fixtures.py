"""Make tests/fixtures/kquants/kquants.npz: rows of float32 values and the bytes ggml's own
quantizers write for them in Q2_K .. Q6_K, so that tests/test_quant_k.py checks rwkvpy's
quantizers against ggml without ggml installed.

ggml's bytes come from ``ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, NULL)`` of
a libggml-base shared library (the function llama-quantize calls; without an importance matrix
it runs the reference quantizers ``quantize_row_q*_K_ref``), called through ctypes. Any build of
ggml gives one, e.g. llama-cpp-python's wheel or ggml's CMake target ``ggml-base``; it must be
built for the baseline x86-64 (no fused multiply-adds in the reference code, which is what
ggml's CMake does for ggml-base).

Usage: python tools/make_kquant_fixtures.py path/to/libggml-base.so
"""

from __future__ import annotations

import ctypes
import os
import sys

import numpy as np

TYPES = {"Q2_K": (10, 84), "Q3_K": (11, 110), "Q4_K": (12, 144), "Q5_K": (13, 176),
         "Q6_K": (14, 210)}
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "kquants",
                   "kquants.npz")


def rows() -> np.ndarray:
    """Rows of 256 values (one super-block each): plain, scaled, sparse, constant, tied, with
    outliers, and with NaN / inf / huge / subnormal elements."""
    rng = np.random.default_rng(2024)
    r = [rng.standard_normal(256),
         rng.standard_normal(256) * 1e-3,
         rng.standard_normal(256) * 3e4,                       # scales past float16's range
         rng.standard_normal(256) * 1e-30,                     # scales below float16's
         rng.standard_normal(256) ** 3,                        # heavy tails
         rng.exponential(size=256),                            # one sign only
         np.where(rng.random(256) < 0.7, 0, rng.standard_normal(256)),
         np.concatenate([np.zeros(64), rng.standard_normal(192)]),  # zero sub-blocks
         rng.integers(-8, 8, 256) * 0.5,                        # ties in the rounding
         np.full(256, 0.75),
         np.zeros(256)]
    for v in (np.nan, np.inf, -np.inf, 1e38, 1e-40):
        x = rng.standard_normal(256)
        x[rng.integers(0, 256, 3)] = v
        r.append(x)
    return np.asarray(r, np.float32)


def main(lib_path: str) -> None:
    lib = ctypes.CDLL(lib_path)
    f = lib.ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                  ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    x = np.ascontiguousarray(rows())
    out = {"x": x}
    for name, (t, size) in TYPES.items():
        dst = np.zeros(x.shape[0] * size, np.uint8)
        n = f(t, x.ctypes.data, dst.ctypes.data, 0, x.shape[0], x.shape[1], None)
        assert n == dst.size, (name, n)
        out[name] = dst
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    np.savez_compressed(OUT, **out)
    print(f"wrote {os.path.normpath(OUT)}: {x.shape[0]} rows, {os.path.getsize(OUT)} bytes")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
