"""Sequence-mode recurrences: the CPU's serial kernels and the chunked forms (kernels/wkv.py)
against the per-token loops of models/ at T tokens, H heads of 64 (default: the 0.1B shape,
T = 512). Medians, alternating calls.

    python benchmarks/bench_wkv.py --threads 2 --T 512 --heads 12
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from rwkvpy.kernels import wkv5_chunked, wkv5_serial, wkv7_chunked, wkv7_serial
from rwkvpy.models.v5 import wkv_heads
from rwkvpy.models.v7 import wkv7


def median_ms(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def medians_ms(fns, reps):
    """Median times of several functions called in turn (one noisy stretch hits all alike)."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) * 1e3 for ts in times]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--heads", type=int, default=12)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    T, H, N = a.T, a.heads, 64
    r, k, v = (torch.randn(T, H, N, generator=g) for _ in range(3))
    w = torch.exp(-torch.exp(torch.randn(T, H, N, generator=g) - 1))
    u = torch.randn(H, N, generator=g)
    S = torch.randn(H, N, N, generator=g) * 0.1
    ref5 = median_ms(lambda: wkv_heads(r, k, v, w, u, S), 3)
    chunk5, serial5 = medians_ms(
        [lambda: wkv5_chunked(r, k, v, w, u, S), lambda: wkv5_serial(r, k, v, w, u, S)], 10
    )
    kk = F.normalize(torch.randn(T, H, N, generator=g), dim=-1)
    aa = torch.rand(T, H, N, generator=g)
    w7 = torch.exp(-0.6065 * torch.rand(T, H, N, generator=g))
    ref7 = median_ms(lambda: wkv7(r, w7, k, v, kk, aa, S), 3)
    chunk7, serial7 = medians_ms(
        [lambda: wkv7_chunked(r, w7, k, v, kk, aa, S), lambda: wkv7_serial(r, w7, k, v, kk, aa, S)],
        10,
    )
    print(
        f"{a.threads} threads, T={T}, H={H}: v5/v6 torch loop {ref5:.1f} ms, chunked "
        f"{chunk5:.2f} ms, serial {serial5:.2f} ms; v7 torch loop {ref7:.1f} ms, chunked "
        f"{chunk7:.2f} ms, serial {serial7:.2f} ms"
    )


if __name__ == "__main__":
    main()
