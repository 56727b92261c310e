"""Make tests/fixtures/kquants/kquants.npz: rows of float32 values and the bytes ggml's own
quantizers write for them in Q2_K .. Q6_K, so that tests/test_quant_k.py checks rwkvpy's
quantizers against ggml without ggml installed; and kquants_wide.json: the sha256 of ggml's
bytes for the many rows of :func:`wide_rows`, which the test regenerates (too many to store).

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
import hashlib
import json
import os
import sys

import numpy as np

TYPES = {
    "Q2_K": (10, 84),
    "Q3_K": (11, 110),
    "Q4_K": (12, 144),
    "Q5_K": (13, 176),
    "Q6_K": (14, 210),
}
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "kquants", "kquants.npz")
WIDE_OUT = os.path.join(os.path.dirname(OUT), "kquants_wide.json")
#: rows (super-blocks) of the wide comparison, and rows per digest
WIDE_ROWS, WIDE_CHUNK = 8192, 1024


def rows() -> np.ndarray:
    """Rows of 256 values (one super-block each): plain, scaled, sparse, constant, tied, with
    outliers, and with NaN / inf / huge / subnormal elements."""
    rng = np.random.default_rng(2024)
    r = [
        rng.standard_normal(256),
        rng.standard_normal(256) * 1e-3,
        rng.standard_normal(256) * 3e4,  # scales past float16's range
        rng.standard_normal(256) * 1e-30,  # scales below float16's
        rng.standard_normal(256) ** 3,  # heavy tails
        rng.exponential(size=256),  # one sign only
        np.where(rng.random(256) < 0.7, 0, rng.standard_normal(256)),
        np.concatenate([np.zeros(64), rng.standard_normal(192)]),  # zero sub-blocks
        rng.integers(-8, 8, 256) * 0.5,  # ties in the rounding
        np.full(256, 0.75),
        np.zeros(256),
    ]
    for v in (np.nan, np.inf, -np.inf, 1e38, 1e-40):
        x = rng.standard_normal(256)
        x[rng.integers(0, 256, 3)] = v
        r.append(x)
    return np.asarray(r, np.float32)


def wide_rows(n: int = WIDE_ROWS) -> np.ndarray:
    """n rows of 256 float32 values of many kinds (row r has kind r % 13): Gaussian-like at
    small and at extreme scales (subnormal to 2^90), heavy tails, one sign, sparse, zero
    sub-blocks, ties, constant, all zero (either sign), NaN/inf/huge/subnormal elements,
    sub-blocks of very different scales, offset, small integers.

    Made from PCG64's raw 64-bit stream (stable across numpy versions, unlike its
    distributions) with exact or correctly rounded float operations only (no transcendental
    function), so every platform makes the same values."""
    bg = np.random.PCG64(2025)
    u = (bg.random_raw(n * 4 * 256).reshape(n, 4, 256) >> np.uint64(11)) * 2.0**-53
    p = bg.random_raw(n * 8).reshape(n, 8)
    g = (u[:, 0] + u[:, 1] + u[:, 2] + u[:, 3] - 2.0) * 1.7  # bell-shaped, |g| < 3.4
    e = (p[:, 0] % np.uint64(241)).astype(np.int64) - 150  # 2^-150 .. 2^90
    es = (p[:, 1] % np.uint64(41)).astype(np.int64) - 20  # 2^-20 .. 2^20
    lanes = np.arange(256) // 16
    bit = ((p[:, 2:3] >> lanes.astype(np.uint64)) & np.uint64(1)).astype(bool)  # per sub-block
    small = np.ldexp(g, es[:, None])
    kinds = [
        small,
        np.ldexp(g, e[:, None]),
        np.ldexp(g**3, es[:, None]),
        np.where((p[:, 3:4] & np.uint64(1)).astype(bool), -1.0, 1.0) * np.abs(small),
        np.where(u[:, 0] < (p[:, 3:4] % np.uint64(100)) / 100.0, 0.0, small),
        np.where(bit, 0.0, small),
        np.ldexp(np.floor(u[:, 0] * 16) - 8, (es - 1)[:, None]),
        np.where(u[:, 1] < 0.9, small[:, :1], 0.0),
        np.where((p[:, 3:4] & np.uint64(1)).astype(bool), -0.0, 0.0) * np.ones_like(g),
        small,  # + specials below
        np.ldexp(
            g, ((p[:, 4:5] >> (4 * lanes).astype(np.uint64)) % np.uint64(25)).astype(np.int64) - 12
        ),
        g + (((p[:, 3:4] % np.uint64(2001)).astype(np.int64) - 1000) / 8.0),
        np.floor(u[:, 0] * 7) - 3,
    ]
    kind = np.arange(n) % len(kinds)
    x = np.choose(kind[:, None], kinds).astype(np.float32)
    specials = np.array(
        [
            np.nan,
            np.inf,
            -np.inf,
            3.4028235e38,
            -3.4028235e38,
            1e38,
            2.0**-149,
            -(2.0**-140),
            -0.0,
            65504.0,
            65520.0,
            2.0**-25,
            3e-8,
        ],
        np.float32,
    )
    for r in np.flatnonzero(kind == 9):
        k = 1 + int(p[r, 5] % np.uint64(16))
        pos = (p[r, 6] >> np.arange(0, 64, 8, dtype=np.uint64)) % np.uint64(256)
        pos = np.concatenate(
            [pos, (p[r, 7] >> np.arange(0, 64, 8, dtype=np.uint64)) % np.uint64(256)]
        )[:k].astype(np.int64)
        x[r, pos] = specials[int(p[r, 5] >> np.uint64(8)) % specials.size]
    return x


def ggml_quantize_chunk(lib_path: str):
    """ctypes binding of ``ggml_quantize_chunk`` in the library at lib_path."""
    f = ctypes.CDLL(lib_path).ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    return f


def ggml_bytes(f, name: str, x: np.ndarray) -> np.ndarray:
    """ggml's bytes of x (rows, 256 k) in type name: (rows, bytes per row) uint8."""
    t, size = TYPES[name]
    x = np.ascontiguousarray(x, np.float32)
    dst = np.zeros((x.shape[0], x.shape[1] // 256 * size), np.uint8)
    n = f(t, x.ctypes.data, dst.ctypes.data, 0, x.shape[0], x.shape[1], None)
    assert n == dst.size, (name, n)
    return dst


def write_fixture(f) -> None:
    x = np.ascontiguousarray(rows())
    out = {"x": x}
    for name in TYPES:
        out[name] = ggml_bytes(f, name, x).reshape(-1)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    np.savez_compressed(OUT, **out)
    print(f"wrote {os.path.normpath(OUT)}: {x.shape[0]} rows, {os.path.getsize(OUT)} bytes")


def write_wide(f) -> None:
    with np.errstate(all="ignore"):
        x = wide_rows()
    wide = {"rows": WIDE_ROWS, "chunk": WIDE_CHUNK, "sha256": {}}
    for name in TYPES:
        dst = ggml_bytes(f, name, x)
        wide["sha256"][name] = [
            hashlib.sha256(dst[a : a + WIDE_CHUNK].tobytes()).hexdigest()
            for a in range(0, WIDE_ROWS, WIDE_CHUNK)
        ]
    with open(WIDE_OUT, "w") as fh:
        json.dump(wide, fh, indent=1)
        fh.write("\n")
    print(f"wrote {os.path.normpath(WIDE_OUT)}: sha256 of {WIDE_ROWS} rows per type")


def main(lib_path: str) -> None:
    f = ggml_quantize_chunk(lib_path)
    write_fixture(f)
    write_wide(f)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
