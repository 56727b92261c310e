"""Benchmark of rwkvpy.kernels.linear: every format x strategy, one matvec and a T=512 product.

Weights are larger than the caches: each strategy rotates through several distinct copies of
its matrix (at least ``--pool`` MiB in all; L3 is 32 MiB here), so every call reads its weights
from memory. The streaming read bandwidth of the machine is measured in the same run (the faster of a sum
and of a matvec over a 1 GiB float32 tensor, interleaved with the calls), for each thread
count, and each matvec is reported as the fraction of it reached (bytes of weights read per
matvec / time / bandwidth).

    python benchmarks/bench_linear.py                 # everything (~15-25 min on 2 cores)
    python benchmarks/bench_linear.py --shapes 2048x2048 --threads 2 --no-prompt
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from rwkvpy.formats.base import QTensor
from rwkvpy.kernels import linear as L
from rwkvpy.kernels.cpu import host_level
from rwkvpy.quant import get_format


class Fp16Torch(L.Linear):
    """fp16 weights and fp16 activations in torch (F.linear): a lossy candidate, for reference."""

    strategy = "torch-f16 (lossy)"
    exact = False

    def __init__(self, w):
        self.weight = w.to(torch.float16).contiguous()
        self.out_features, self.in_features = self.weight.shape
        self.fmt = "F16"
        self.nbytes = self.weight.numel() * 2

    def _mm(self, x):
        return F.linear(x.half(), self.weight).float()


class MvF32(L.F32Linear):
    strategy = "torch-f32 F.linear(1 vec)"

    def _mv(self, x):
        return F.linear(x, self.weight)


def candidates(fmt, w32, qt):
    """(label, factory) for every strategy that stores this format; each factory call makes a
    linear over its own copy of the weights (distinct memory)."""
    out = []

    def q():
        return QTensor(qt.fmt, qt.shape, qt.data.copy())

    if fmt == "F32":
        out.append(("numba float (exact)", lambda: L.FloatLinear(w32.clone())))
        out.append(("torch.mv / F.linear", lambda: L.F32Linear(w32.clone())))
        out.append(("F.linear for 1 vec", lambda: MvF32(w32.clone())))
    elif fmt in ("F16", "BF16"):
        dt = torch.float16 if fmt == "F16" else torch.bfloat16
        wh = w32.to(dt)
        out.append(("numba half (exact)", lambda: L.FloatLinear(wh.clone())))
        out.append(("f32 at load (exact)", lambda: L.F32Linear(wh.float(), fmt=fmt)))
        if fmt == "F16":
            out.append(("fp16 torch (lossy)", lambda: Fp16Torch(wh.clone())))
    else:
        out.append(("numba blocks (exact)", lambda: L.BlockLinear(q())))
        if L._int8_dot():
            out.append(("int8 dots, 8-row groups", lambda: L.Int8DotLinear(q())))
            if fmt == "Q8_0":
                out.append(("int16 dots, 8-row groups", lambda: L.Int16DotLinear(q())))
        out.append(("dequant f32 at load", lambda: L.DequantLinear(q())))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="65536x768,2048x2048,7168x2048")
    ap.add_argument("--formats", default="F32,F16,BF16,Q4_0,Q4_1,Q5_0,Q5_1,Q8_0")
    ap.add_argument("--threads", default="2,1")
    ap.add_argument("--pool", type=int, default=128, help="MiB of distinct weight copies")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--prompt-reps", type=int, default=3)
    ap.add_argument("--no-prompt", action="store_true")
    ap.add_argument("--only", default="", help="substring of strategy labels to keep")
    args = ap.parse_args()

    print(
        f"torch {torch.__version__}, numba {'yes' if L.HAVE_NUMBA else 'no'}, "
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}, "
        f"rwkvpy CPU level {host_level()}, {os.cpu_count()} cpus"
    )
    print(
        "Calls are interleaved (one call of each strategy in turn, then the next round), so "
        "that the load of a shared machine weighs on all of them alike; the bandwidth probe "
        "(sum and matvec over a 1 GiB tensor) runs in the same rounds."
    )
    threads = [int(t) for t in args.threads.split(",")]
    probe = torch.ones(1 << 28)
    rng = np.random.default_rng(0)
    for shape in args.shapes.split(","):
        O, K = (int(s) for s in shape.split("x"))
        w32 = torch.from_numpy(rng.standard_normal((O, K), dtype=np.float32) * 0.02)
        cands = []  # (fmt, label, [linears])
        for fmt in args.formats.split(","):
            f = get_format(fmt)
            qt = QTensor(f.name, (O, K), f.quantize(w32.numpy())) if f.quantized else None
            for label, make in candidates(f.name, w32, qt):
                if args.only and args.only not in label:
                    continue
                lin0 = make()
                n_copies = max(2, (args.pool << 20) // max(1, lin0.nbytes))
                cands.append((f.name, label, [lin0] + [make() for _ in range(n_copies - 1)]))
        results = {}
        for n in threads:
            torch.set_num_threads(n)
            x = torch.randn(K)
            bw, t1 = interleaved(cands, x, args.reps, probe)
            tp = None
            if not args.no_prompt:
                X = torch.randn(args.prompt, K)
                _, tp = interleaved(cands, X, args.prompt_reps, None)
            results[n] = (bw, t1, tp)
        print(
            f"\n{O}x{K}: read bandwidth (median, same rounds) "
            + ", ".join(f"{n} thread(s) {results[n][0]:.1f} GB/s" for n in threads)
        )
        for i, (fmt, label, lins) in enumerate(cands):
            cols = []
            for n in threads:
                bw, t1, tp = results[n]
                frac = lins[0].nbytes / t1[i] / 1e9 / bw
                c = f"{n}t: mv {t1[i] * 1e3:7.3f} ms ({frac:4.2f} bw)"
                if tp is not None:
                    gf = 2 * args.prompt * O * K / tp[i] / 1e9
                    c += f", T={args.prompt} {tp[i] * 1e3:7.1f} ms ({gf:4.0f} GFLOPS)"
                cols.append(c)
            print(f"{fmt:5s} {label:24s} {lins[0].strategy:24s} | " + " | ".join(cols), flush=True)
        del cands


def interleaved(cands, x, reps, probe):
    """Median time of one call per candidate (copies rotated), rounds interleaved; and the
    median bandwidth of the probe over the same rounds (GB/s) if a probe is given."""
    times = [[] for _ in cands]
    bws = []
    for lins in (c[2] for c in cands):  # warm-up (compiles, first-touch)
        lins[0](x)
    for r in range(reps):
        if probe is not None:  # two streaming reads of 1 GiB; the faster one counts
            t = time.perf_counter()
            probe.sum()
            t1 = time.perf_counter() - t
            mat = probe.view(-1, 4096)
            t = time.perf_counter()
            torch.mv(mat, probe[:4096])
            t2 = time.perf_counter() - t
            bws.append(probe.nbytes / min(t1, t2) / 1e9)
        for i, (_, _, lins) in enumerate(cands):
            lin = lins[r % len(lins)]
            t = time.perf_counter()
            lin(x)
            times[i].append(time.perf_counter() - t)
    bw = statistics.median(bws) if bws else float("nan")
    return bw, [statistics.median(ts) for ts in times]


if __name__ == "__main__":
    main()
