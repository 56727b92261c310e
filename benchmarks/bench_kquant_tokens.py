"""Per-token time of one random model in several formats, one thread, the models taking turns
token by token in one process: the K-quants' products against Q4_0's and Q8_0's per byte.

    python benchmarks/bench_kquant_tokens.py [--preset v7-0.1b] [--types q4_0,q8_0,q4_k_m,q5_k,q6_k]
                                             [--tokens 80] [--dir /tmp/rwkvpy-bench] [--wall]
                                             [--quantize-head] [--products]

Each type is converted once (``rwkvpy convert`` of a ``rwkvpy.synth`` model, kept in ``--dir``)
and loaded in mode fast with one thread, without the repack cache (``--quantize-head``: the
32-weight types' heads quantized too, as the K-quant types' are, so that all of a model's large
products are in its type). Each round feeds every model
its next token (the same token ids for all), timed by the calling thread's CPU time (``--wall``:
the wall clock), which on a busy machine leaves out the waits for a CPU but not the slowdown
from others sharing the caches and the memory. Reported per type: the bytes its products read
per token (the sum of its linears' bytes: the whole model is read once per token, far more than
the caches hold), median, mean and p90 ms per token; then the line through Q4_0 and Q8_0
(non-product time + time per MB) and the time it predicts for each other type from its bytes:
a measured time at or below the prediction means products at least as fast per byte as the
32-weight formats'.

``--products``: the products alone, in the model's order (each matrix read from memory, as in
a token): every linear's one-vector product (``row_product_serial`` on its numba spec, the
kernel the fused step calls on one thread) timed by thread CPU time, the types taking turns
round by round; per type the sum of the medians and GB/s, and per matrix role (``head``,
``att.key``, ...) ms and GB/s: a role far below the others' GB/s is a kernel or layout problem
of that shape.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch


def _models(preset: str, types: list, folder: str, quantize_head: bool = False) -> dict:
    import rwkvpy
    from rwkvpy.convert import convert
    from rwkvpy.synth import save_random_model

    os.makedirs(folder, exist_ok=True)
    src = os.path.join(folder, f"{preset}.pth")
    if not os.path.exists(src):
        save_random_model(src, preset)
    out = {}
    for t in types:
        qh = quantize_head and "_k" not in t
        dst = os.path.join(folder, f"{preset}-{t}{'-qhead' if qh else ''}.gguf")
        if not os.path.exists(dst):
            convert(src, dst, type=t, progress=False, quantize_head=qh)
        out[t] = rwkvpy.load(dst, mode="fast", threads=1, cache=False)
    return out


def _mbytes(model) -> float:
    return sum(getattr(lin, "nbytes", 0) for lin in model._net.lin.values()) / 1e6


def run(
    preset: str, types: list, tokens: int, folder: str, wall: bool, quantize_head: bool = False
) -> list:
    models = _models(preset, types, folder, quantize_head)
    clock = time.perf_counter if wall else time.thread_time
    rng = np.random.default_rng(0)
    vocab = next(iter(models.values())).config.vocab_size
    ids = rng.integers(0, vocab, tokens + 8).tolist()
    states = {t: None for t in models}
    times: dict = {t: [] for t in models}
    with torch.inference_mode():
        for n, tok in enumerate(ids):
            for t, m in models.items():
                t0 = clock()
                _, states[t] = m.forward([tok], states[t])
                if n >= 8:  # the first tokens warm the caches and compile what is left
                    times[t].append(clock() - t0)
    rows = []
    for t, m in models.items():
        ms = np.array(times[t]) * 1e3
        rows.append(
            dict(
                type=t,
                mb=_mbytes(m),
                median=float(np.median(ms)),
                mean=float(ms.mean()),
                p90=float(np.percentile(ms, 90)),
                step=str(m.kernels.get("step")),
            )
        )
    return rows


def products(preset: str, types: list, rounds: int, folder: str, quantize_head: bool) -> list:
    """Per type: (type, [(role, ms, MB)]) from ``rounds`` timed passes over its products (see
    the module docstring)."""
    from collections import defaultdict

    from rwkvpy.kernels.linear.product import row_product_serial

    models = _models(preset, types, folder, quantize_head)
    rng = np.random.default_rng(0)
    mats = {}
    for t, m in models.items():
        mats[t] = []
        for name, lin in m._net.lin.items():
            spec = lin.numba_spec()
            if spec is not None:
                x = rng.standard_normal((1, lin.in_features)).astype(np.float32)
                mats[t].append((name, spec, x, np.empty((1, lin.out_features), np.float32), lin))
    times: dict = {t: defaultdict(list) for t in models}
    for r in range(rounds + 2):  # two rounds to warm up
        for t in models:
            for name, spec, x, y, _ in mats[t]:
                t0 = time.thread_time()
                row_product_serial(spec, x, y)
                if r >= 2:
                    times[t][name].append(time.thread_time() - t0)
    out = []
    for t in models:
        roles: dict = defaultdict(lambda: [0.0, 0.0])
        for name, _, _, _, lin in mats[t]:
            role = name.split(".", 2)[2] if name.startswith("blocks.") else name
            roles[role][0] += float(np.median(times[t][name])) * 1e3
            roles[role][1] += lin.nbytes / 1e6
        out.append((t, sorted(((k, *v) for k, v in roles.items()), key=lambda v: -v[1])))
    return out


def main() -> None:
    os.environ.setdefault("RWKVPY_BACKGROUND_COMPILE", "0")  # time the kernels, not a first run
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="v7-0.1b")
    ap.add_argument("--types", default="q4_0,q8_0,q4_k_m,q5_k,q6_k")
    ap.add_argument("--tokens", type=int, default=80, help="tokens (--products: rounds)")
    ap.add_argument("--dir", default="/tmp/rwkvpy-bench")
    ap.add_argument("--wall", action="store_true", help="wall clock instead of thread CPU time")
    ap.add_argument(
        "--quantize-head", action="store_true", help="the 32-weight types' heads quantized too"
    )
    ap.add_argument("--products", action="store_true", help="time the products alone (per role)")
    args = ap.parse_args()
    load = os.getloadavg()
    if args.products:
        got = products(
            args.preset, args.types.split(","), args.tokens, args.dir, args.quantize_head
        )
        print(
            f"{args.preset} products, 1 thread, {args.tokens} rounds, cpu clock, load average "
            f"{load[0]:.1f} -> {os.getloadavg()[0]:.1f}"
        )
        for t, roles in got:
            ms, mb = sum(r[1] for r in roles), sum(r[2] for r in roles)
            print(f"{t:>8}: {ms:6.2f} ms  {mb:6.1f} MB  {mb / ms:5.1f} GB/s")
            for role, rms, rmb in roles:
                if rmb >= 1:
                    print(f"{'':10}{role:<24} {rms:6.3f} ms {rmb:6.1f} MB {rmb / rms:5.1f} GB/s")
        return
    rows = run(
        args.preset, args.types.split(","), args.tokens, args.dir, args.wall, args.quantize_head
    )
    print(
        f"{args.preset}, 1 thread, {args.tokens} tokens each, {'wall' if args.wall else 'cpu'} "
        f"clock, load average {load[0]:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print(f"{'type':>8} {'MB':>7} {'median':>8} {'mean':>8} {'p90':>8}  step")
    for r in rows:
        print(
            f"{r['type']:>8} {r['mb']:7.1f} {r['median']:8.2f} {r['mean']:8.2f} {r['p90']:8.2f}"
            f"  {r['step']}"
        )
    by = {r["type"]: r for r in rows}
    if "q4_0" in by and "q8_0" in by:
        a, b = by["q4_0"], by["q8_0"]
        slope = (b["median"] - a["median"]) / (b["mb"] - a["mb"])
        base = a["median"] - slope * a["mb"]
        print(f"line through q4_0 and q8_0 (medians): {base:.2f} ms + {1e3 * slope:.1f} us/MB")
        for r in rows:
            if r["type"] not in ("q4_0", "q8_0"):
                pred = base + slope * r["mb"]
                print(f"{r['type']:>8}: predicted {pred:.2f} ms, measured {r['median']:.2f}")


if __name__ == "__main__":
    main()
