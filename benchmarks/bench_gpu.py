"""GPU benchmark: rwkvpy on CUDA against the memory-bandwidth bound measured in the same run,
and against BlinkDL's ``rwkv`` package on the same GPU (when it is importable).

    python benchmarks/bench_gpu.py --out results.json [--presets v7-1.5b,v7-0.1b]

Per preset (random weights, FP16, BlinkDL .pth written to --workdir): per-token latency with CUDA
graphs and eagerly (median), batched decode throughput, prompt throughput, gpu_layers split,
and the v7 chunked recurrence's speed per chunk length. Every section prints one JSON line as it
finishes, so that a run cut short still reports what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import rwkvpy
from rwkvpy.bench import bytes_per_token, random_ids, read_bandwidth_gbs, time_decode, time_prompt
from rwkvpy.kernels.gpu import TorchStep
from rwkvpy.synth import save_random_model

RESULTS: list = []


def report(**kw):
    RESULTS.append(kw)
    print(json.dumps(kw), flush=True)


def per_token_ms(model, n):
    times = time_decode(model, list(range(100, 100 + n + 3)), n)
    return statistics.median(times) * 1e3, min(times) * 1e3


def prompt_tps(model, T, reps=3):
    ids = random_ids(model, T)
    return T / statistics.median([time_prompt(model, ids) for _ in range(reps)])


def batch_tps(model, B, n=10):
    states = [None] * B
    toks = [[7]] * B
    _, states = model.forward_batch(toks, states)
    model.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        _, states = model.forward_batch(toks, states)
    model.synchronize()
    return B * n / (time.perf_counter() - t)


def section(name, fn):
    t = time.perf_counter()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - report and go on with the next section
        report(section=name, error=f"{type(e).__name__}: {e}")
    print(f"# {name}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)


def bench_preset(preset, workdir, blinkdl, split, compare_separate=True):
    path = os.path.join(workdir, f"{preset}.pth")
    if not os.path.exists(path):
        t = time.perf_counter()
        save_random_model(path, preset, dtype=torch.float16)
        report(
            section="make",
            preset=preset,
            seconds=round(time.perf_counter() - t, 1),
            file_gb=round(os.path.getsize(path) / 1e9, 2),
        )
    t = time.perf_counter()
    model = rwkvpy.load(path, device="cuda")
    load_s = time.perf_counter() - t
    bw = read_bandwidth_gbs(device="cuda")
    nbytes = bytes_per_token(model, model.device)
    bound = nbytes / bw / 1e6
    graph_ms, graph_min = per_token_ms(model, 50)
    step = model._step
    graphs_ok = not step.graph_errors
    # A/B in the same run: the products one by one (no groups; the views stay valid)
    groups = dict(model._net.groups)
    model._net.groups.clear()
    model._step = TorchStep(model._net, model.state_device, graphs=True)
    separate_ms, _ = per_token_ms(model, 50)
    model._net.groups.update(groups)
    model._step = TorchStep(model._net, model.state_device, graphs=False)
    eager_ms, _ = per_token_ms(model, 10)
    model._step = step
    report(
        section="decode",
        preset=preset,
        gpu=torch.cuda.get_device_name(),
        load_s=round(load_s, 1),
        bandwidth_gbs=round(bw, 1),
        bytes_per_token=nbytes,
        bound_ms=round(bound, 3),
        graph_ms=round(graph_ms, 3),
        graph_min_ms=round(graph_min, 3),
        graph_ratio=round(graph_ms / bound, 2),
        graphs_ok=graphs_ok,
        graph_errors=step.graph_errors,
        groups=len(groups),
        graph_separate_products_ms=round(separate_ms, 3),
        eager_ms=round(eager_ms, 3),
        peak_gpu_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2),
    )
    section(
        "batch",
        lambda: report(
            section="batch",
            preset=preset,
            **{f"b{B}_tok_s": round(batch_tps(model, B), 1) for B in (4, 16, 64)},
        ),
    )
    section(
        "prompt",
        lambda: report(
            section="prompt",
            preset=preset,
            **{f"t{T}_tok_s": round(prompt_tps(model, T), 1) for T in (512, 4096)},
        ),
    )
    model = None  # frees the GPU memory before the next load
    torch.cuda.empty_cache()

    def do_compiled():
        m = rwkvpy.load(path, device="cuda", compile=True)
        t = time.perf_counter()
        m.forward([1], None)
        m.synchronize()
        first_s = time.perf_counter() - t
        ms, mn = per_token_ms(m, 50)
        report(
            section="compiled",
            preset=preset,
            first_token_s=round(first_s, 1),
            per_token_ms=round(ms, 3),
            min_ms=round(mn, 3),
            ratio=round(ms / bound, 2),
            graph_errors=m._step.graph_errors,
            compile_error=m._step.compile_error,
        )
        section("anatomy", lambda: anatomy(m, preset))
        return m

    compiled = []
    section("compiled", lambda: compiled.append(do_compiled()))
    torch.cuda.empty_cache()
    if split:

        def do_split():
            m = rwkvpy.load(path, device="cuda", gpu_layers=split)
            ms, _ = per_token_ms(m, 5)
            report(
                section="split",
                preset=preset,
                gpu_layers=split,
                per_token_ms=round(ms, 1),
                threads=torch.get_num_threads(),
            )

        section("split", do_split)
    if blinkdl:
        section("blinkdl", lambda: run_blinkdl(path, preset))
    if compiled and compare_separate:

        def do_separate():
            m = compiled[0]
            n = len(m._net.groups)
            m._net.groups.clear()
            m._step = TorchStep(m._net, m.state_device, graphs=True, compile=True)
            ms, mn = per_token_ms(m, 50)
            report(
                section="compiled_separate_products",
                preset=preset,
                groups_removed=n,
                per_token_ms=round(ms, 3),
                min_ms=round(mn, 3),
                ratio=round(ms / bound, 2),
            )

        section("compiled_separate", do_separate)


def anatomy(model, preset):
    """Where a decode step's time goes: the graph replay alone (CUDA events), the kernels in it
    (profiler), against the whole forward call."""
    graph = model._step._graphs[1][0][0]
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    kernels = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(e.name[:60], [0, 0.0])
            k[0] += 1
            k[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:10]
    report(
        section="anatomy",
        preset=preset,
        replay_ms=round(statistics.median(times), 3),
        kernels=sum(v[0] for v in kernels.values()),
        distinct=len(kernels),
        top=[(n, c, round(t / 1e3, 3)) for n, (c, t) in top],
    )


BLINKDL = r"""
import os, sys, time, statistics, json
os.environ.setdefault("RWKV_V7_ON", "1"); os.environ.setdefault("RWKV_JIT_ON", "1")
os.environ.setdefault("RWKV_CUDA_ON", "0")
import torch
from rwkv.model import RWKV
m = RWKV(model=sys.argv[1][:-4], strategy="cuda fp16")
state = None
for t in range(3):
    out, state = m.forward([100 + t], state)
torch.cuda.synchronize()
times = []
for t in range(20):
    s = time.perf_counter(); out, state = m.forward([200 + t], state); torch.cuda.synchronize()
    times.append(time.perf_counter() - s)
ids = list(range(1000, 1512))
m.forward(ids, None); torch.cuda.synchronize()
s = time.perf_counter(); m.forward(ids, None); torch.cuda.synchronize()
print(json.dumps({"per_token_ms": statistics.median(times) * 1e3,
                  "prompt_512_tok_s": 512 / (time.perf_counter() - s)}))
"""


def run_blinkdl(path, preset):
    import importlib.metadata

    version = importlib.metadata.version("rwkv")
    r = subprocess.run(
        [sys.executable, "-c", BLINKDL, path], capture_output=True, text=True, timeout=240
    )
    if r.returncode != 0:
        report(section="blinkdl", preset=preset, error=r.stderr.strip().splitlines()[-1:])
        return
    report(
        section="blinkdl",
        preset=preset,
        rwkv=version,
        strategy="cuda fp16",
        **json.loads(r.stdout.strip().splitlines()[-1]),
    )


def bench_chunks():
    from rwkvpy.kernels.wkv import wkv7_chunked

    g = torch.Generator(device="cuda").manual_seed(0)
    T, H, N = 4096, 32, 64
    r, k, v = (torch.randn(T, H, N, device="cuda", generator=g) for _ in range(3))
    kk = torch.nn.functional.normalize(torch.randn(T, H, N, device="cuda", generator=g), dim=-1)
    a = torch.rand(T, H, N, device="cuda", generator=g)
    w = torch.exp(-0.6 * torch.rand(T, H, N, device="cuda", generator=g))
    S = torch.zeros(H, N, N, device="cuda")
    out = {}
    for L in (32, 64, 128):
        for scan in (False, True):
            wkv7_chunked(r, w, k, v, kk, a, S, chunk=L, scan=scan)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(3):
                wkv7_chunked(r, w, k, v, kk, a, S, chunk=L, scan=scan)
            torch.cuda.synchronize()
            out[f"L{L}_{'scan' if scan else 'loop'}_ms"] = round(
                (time.perf_counter() - t) / 3 * 1e3, 2
            )
    report(section="wkv7_chunks", T=T, H=H, N=N, **out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", default="/tmp/rwkvpy-bench")
    ap.add_argument("--presets", default="v7-1.5b,v7-0.1b")
    ap.add_argument("--split", type=int, default=12, help="gpu_layers for the split run (0: none)")
    ap.add_argument("--no-blinkdl", action="store_true")
    ap.add_argument("--no-chunks", action="store_true", help="skip the chunk-length table")
    ap.add_argument(
        "--no-separate",
        action="store_true",
        help="skip the compiled step with separate products (the A/B's baseline)",
    )
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    report(
        section="env",
        torch=torch.__version__,
        gpu=torch.cuda.get_device_name(),
        cpu_threads=torch.get_num_threads(),
        date=time.strftime("%Y-%m-%d"),
    )
    if not args.no_chunks:
        section("chunks", bench_chunks)
    for i, preset in enumerate(args.presets.split(",")):
        section(
            preset,
            lambda: bench_preset(
                preset,
                args.workdir,
                not args.no_blinkdl,
                args.split if i == 0 else 0,
                i == 0 and not args.no_separate,
            ),
        )
        with open(args.out, "w") as f:
            json.dump(RESULTS, f, indent=1)
    with open(args.out, "w") as f:
        json.dump(RESULTS, f, indent=1)


if __name__ == "__main__":
    main()
