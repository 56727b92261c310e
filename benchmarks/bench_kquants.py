"""K-quant products against Q4_0 and Q8_0: GB/s of weights read (one vector) and GOPS (prompts).

    python benchmarks/bench_kquants.py [--rounds 9] [--mode fast|exact] [--prompt]
                                       [--shapes 2048x2048,8192x2048] [--threads 1,2]
                                       [--memory-mb 256] [--cpu-time]

For each shape and thread count: random weights quantized to Q4_0, Q8_0, Q4_K, Q5_K, Q6_K, the
linear rwkvpy.kernels.linear.make_linear picks for the mode (fast, AVX2 and up: Int8DotLinear,
Int16DotLinear, KQuantX8Linear), and in mode fast also the K-quants' row kernels on ggml's rows
(KQuantDotLinear, "rows": what KQuantX8Linear replaced), timed on ``lin.np_mm(x)``:

* one vector, in cache: the same matrix called again and again (2048 x 2048 is 2-4.5 MB, in
  L2/L3; 8192 x 2048 is 9-18 MB, in a large L3);
* one vector, from memory: copies of the matrix, at least ``--memory-mb`` in all (default 256,
  several times a 32 MB L3), called in turn, so that each call reads its weights from memory;
* ``--prompt``: T = 16, 64, 512 vectors in one call (GOPS: 2 x weights x T / time).

The formats take turns within each round (so that a busy machine slows them alike); reported
per format: median and best over the rounds, and the load average before and after.
``--cpu-time``: one thread's rows timed by the CPU time of the calling thread
(``time.thread_time``, where one-thread products run), which leaves out the time the thread
waited for a CPU on a busy machine (not the slowdown from others sharing the caches and the
memory); rows with more threads keep the wall clock.
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
ROWS = ("Q4_K", "Q5_K", "Q6_K")  # also timed on the row kernels (mode fast)
PROMPTS = (16, 64, 512)


def _linears(O, K, mode, copies_mb):
    """{label: [linear, ...]}: one linear per label, or copies of it for at least copies_mb."""
    from rwkvpy.kernels.kquants import KQuantDotLinear

    rng = np.random.default_rng(0)
    w = rng.standard_normal((O, K)).astype(np.float32)
    out = {}
    for f in FORMATS:
        data = get_format(f).quantize(w)
        n = max(1, -(-int(copies_mb * 1e6) // data.nbytes)) if copies_mb else 1
        qs = [QTensor(f, (O, K), data if k == 0 else data.copy()) for k in range(n)]
        out[f] = [make_linear(q, mode) for q in qs]
        if mode == "fast" and f in ROWS:
            out[f + " rows"] = [KQuantDotLinear(q) for q in qs]
    return out


def _time(lins, x, calls, rounds, clock=time.perf_counter):
    """{label: seconds per call (one per round)}: labels in turn each round; each call of a
    round's batch on the next copy."""
    times = {k: [] for k in lins}
    for ls in lins.values():
        for lin in ls:
            lin.np_mm(x)  # compile, touch
    for _ in range(rounds):
        for k, ls in lins.items():
            n = max(calls, len(ls))
            t0 = clock()
            for j in range(n):
                ls[j % len(ls)].np_mm(x)
            times[k].append((clock() - t0) / n)
    return times


def run(
    rounds: int,
    mode: str,
    shapes,
    threads,
    memory_mb: float,
    prompt: bool,
    cpu_time: bool = False,
    calls: int = 20,
) -> list[dict]:
    rows = []
    for O, K in shapes:
        rng = np.random.default_rng(1)
        cases = [("cache", 1, 0), ("memory", 1, memory_mb)]
        if prompt:
            cases += [("cache", T, 0) for T in PROMPTS]
        built = {}
        for where, T, mb in cases:
            if mb not in built:
                built[mb] = _linears(O, K, mode, mb)
            lins = built[mb]
            x = rng.standard_normal((T, K)).astype(np.float32)
            for th in threads:
                torch.set_num_threads(th)
                n_calls = calls if T == 1 else max(2, calls * 16 // T)
                cpu = cpu_time and th == 1
                times = _time(
                    lins, x, n_calls, rounds, time.thread_time if cpu else time.perf_counter
                )
                for f, t in times.items():
                    t = np.array(t)
                    lin = lins[f][0]
                    med, best = float(np.median(t)), float(t.min())
                    row = dict(
                        shape=f"{O}x{K}",
                        where=where,
                        T=T,
                        threads=th,
                        format=f,
                        strategy=lin.strategy,
                        mbytes=lin.nbytes / 1e6,
                        copies=len(lins[f]),
                        us=med * 1e6,
                        clock="cpu" if cpu else "wall",
                    )
                    if T == 1:
                        row.update(
                            gbs_median=lin.nbytes / med / 1e9, gbs_best=lin.nbytes / best / 1e9
                        )
                    else:
                        ops = 2 * O * K * T
                        row.update(gops_median=ops / med / 1e9, gops_best=ops / best / 1e9)
                    rows.append(row)
        built.clear()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--mode", default="fast", choices=("fast", "exact"))
    ap.add_argument("--shapes", default="2048x2048,8192x2048")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--memory-mb", type=float, default=256.0)
    ap.add_argument("--prompt", action="store_true")
    ap.add_argument(
        "--cpu-time", action="store_true", help="one thread's rows: the calling thread's CPU time"
    )
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    threads = [int(v) for v in args.threads.split(",")]
    load = os.getloadavg()[0]
    rows = run(args.rounds, args.mode, shapes, threads, args.memory_mb, args.prompt, args.cpu_time)
    print(
        f"mode {args.mode}, {os.cpu_count()} CPUs, load average {load:.1f} -> "
        f"{os.getloadavg()[0]:.1f}, {args.rounds} rounds"
    )
    print(
        f"{'shape':>10} {'where':>6} {'T':>4} {'thr':>3} {'format':>9} {'kernel':>13} "
        f"{'MB':>6} {'clock':>5} {'us':>9} {'med':>7} {'best':>7}"
    )
    for r in rows:
        unit = "gbs" if r["T"] == 1 else "gops"
        print(
            f"{r['shape']:>10} {r['where']:>6} {r['T']:>4} {r['threads']:>3} {r['format']:>9} "
            f"{r['strategy']:>13} {r['mbytes']:6.2f} {r['clock']:>5} {r['us']:9.1f} "
            f"{r[unit + '_median']:7.1f} {r[unit + '_best']:7.1f}"
            f"{'  GOPS' if unit == 'gops' else ''}"
        )


if __name__ == "__main__":
    main()
