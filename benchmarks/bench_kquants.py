"""One-vector products of K-quant matrices against Q4_0 and Q8_0: GB/s of weights read.

    python benchmarks/bench_kquants.py [--rounds 15] [--mode fast|exact]

For each shape (2048 x 2048, 8192 x 2048) and thread count (1, 2): random weights quantized to
Q4_0, Q8_0, Q4_K, Q5_K, Q6_K, the linear rwkvpy.kernels.linear.make_linear picks for the mode
(fast: Int8DotLinear / Int16DotLinear and the K-quants' integer kernels on AVX2 CPUs), and the
time of ``lin.np_mm(x)`` for one vector. The formats take turns within each round (so that a
busy machine slows them alike); reported: bytes of weights / time, median and best over the
rounds. A 2048 x 2048 matrix (2-4.5 MB) stays in the L2/L3 caches between calls; 8192 x 2048
(9-18 MB) mostly in L3 on large-cache CPUs.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from rwkvpy.formats.base import QTensor
from rwkvpy.kernels.linear import make_linear
from rwkvpy.quant import get_format

FORMATS = ("Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
SHAPES = ((2048, 2048), (8192, 2048))


def run(rounds: int, mode: str, calls: int = 20) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for O, K in SHAPES:
        w = rng.standard_normal((O, K)).astype(np.float32)
        x = rng.standard_normal((1, K)).astype(np.float32)
        lins = {f: make_linear(QTensor(f, (O, K), get_format(f).quantize(w)), mode)
                for f in FORMATS}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            times = {f: [] for f in FORMATS}
            for lin in lins.values():
                lin.np_mm(x)  # compile, warm the caches
            for _ in range(rounds):
                for f, lin in lins.items():
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        lin.np_mm(x)
                    times[f].append((time.perf_counter() - t0) / calls)
            for f, lin in lins.items():
                t = np.array(times[f])
                rows.append(dict(shape=f"{O}x{K}", threads=threads, format=f,
                                 strategy=lin.strategy, mbytes=lin.nbytes / 1e6,
                                 us=float(np.median(t)) * 1e6,
                                 gbs_median=lin.nbytes / float(np.median(t)) / 1e9,
                                 gbs_best=lin.nbytes / float(t.min()) / 1e9))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--mode", default="fast", choices=("fast", "exact"))
    args = ap.parse_args()
    load = os.getloadavg()[0]
    rows = run(args.rounds, args.mode)
    print(f"mode {args.mode}, {os.cpu_count()} CPUs, load average {load:.1f} -> "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'shape':>10} {'thr':>3} {'format':>6} {'kernel':>14} {'MB':>6} {'us':>8} "
          f"{'GB/s med':>8} {'GB/s best':>9}")
    for r in rows:
        print(f"{r['shape']:>10} {r['threads']:>3} {r['format']:>6} {r['strategy']:>14} "
              f"{r['mbytes']:6.2f} {r['us']:8.1f} {r['gbs_median']:8.1f} {r['gbs_best']:9.1f}")


if __name__ == "__main__":
    main()
