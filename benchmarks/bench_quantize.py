"""Quantization speed of the K-quants (and Q4_0/Q8_0 for scale): million weights per second.

    python benchmarks/bench_quantize.py [--rows 1024] [--cols 4096] [--rounds 5]
                                        [--threads 1,2] [--formats Q2_K,Q3_K,...]

Random Gaussian rows (``rows x cols`` float32) are quantized with ``rwkvpy.quant`` (the
formats' ``quantize``, as ``rwkvpy convert`` calls it) once to compile, then ``rounds`` times
per thread count, the formats taking turns within each round so that a busy machine slows them
alike. The thread count is numba's (``numba.set_num_threads``): the K-quant quantizers run
their super-blocks in parallel, Q4_0/Q8_0 are numpy and use one thread whatever it is.
Reported: weights / wall time, median and best over the rounds; weights / CPU time of the
process (all threads, median), which a busy machine disturbs less; and the load average
before and after (on a shared machine the best round is the meaningful wall-time figure).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from rwkvpy.quant import get_format

FORMATS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q8_0")


def run(rows: int, cols: int, rounds: int, threads: list[int], formats: list[str]) -> list[dict]:
    import numba

    x = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    fmts = {f: get_format(f) for f in formats}
    for fmt in fmts.values():
        fmt.quantize(x[:8])  # compile (or load the cached machine code)
    out = []
    for t in threads:
        numba.set_num_threads(t)
        times = {f: [] for f in formats}
        cpu = {f: [] for f in formats}
        for _ in range(rounds):
            for f, fmt in fmts.items():
                c0, t0 = time.process_time(), time.perf_counter()
                fmt.quantize(x)
                times[f].append(time.perf_counter() - t0)
                cpu[f].append(time.process_time() - c0)
        for f in formats:
            a = np.array(times[f])
            out.append(
                dict(
                    format=f,
                    threads=t,
                    median=x.size / np.median(a) / 1e6,
                    best=x.size / a.min() / 1e6,
                    cpu=x.size / np.median(cpu[f]) / 1e6,
                )
            )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--formats", default=",".join(FORMATS))
    a = p.parse_args()
    threads = [int(t) for t in a.threads.split(",")]
    formats = [f.strip().upper() for f in a.formats.split(",")]
    load0 = os.getloadavg()
    res = run(a.rows, a.cols, a.rounds, threads, formats)
    load1 = os.getloadavg()
    print(
        f"{a.rows} x {a.cols} float32, {a.rounds} rounds, load average "
        f"{load0[0]:.2f} -> {load1[0]:.2f} on {os.cpu_count()} CPUs"
    )
    print(f"{'format':8} {'threads':>7} {'median Mw/s':>12} {'best Mw/s':>10} {'Mw/CPU-s':>9}")
    for r in res:
        print(
            f"{r['format']:8} {r['threads']:7d} {r['median']:12.2f} {r['best']:10.2f} "
            f"{r['cpu']:9.2f}"
        )


if __name__ == "__main__":
    main()
