"""``rwkvpy bench``: latency and throughput of a model, against this machine's memory bandwidth
measured in the same run (the machine is shared and noisy: medians, ratios, thread count)."""

from __future__ import annotations

import resource
import statistics
import time

import numpy as np
import torch


def read_bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 5, device="cpu") -> float:
    """Streaming read bandwidth (GB/s). On a GPU: the median time to sum a 4x larger buffer,
    timed with CUDA events. On the CPU: the faster of the two reads of
    :func:`cpu_read_bandwidths` (each a median), with torch's current thread count."""
    dev = torch.device(device)
    if dev.type == "cuda":
        nbytes *= 4
        buf = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
        buf.sum()  # warm-up
        times = []
        for _ in range(max(repeats, 10)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            buf.sum()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        del buf
        return nbytes / statistics.median(times) / 1e9
    return max(cpu_read_bandwidths(nbytes, repeats).values())


def cpu_read_bandwidths(nbytes: int = 1 << 30, repeats: int = 7) -> dict:
    """GB/s of two reads of an ``nbytes`` float32 buffer, each the median of ``repeats``:
    ``torch.sum`` and a one-vector product through rwkvpy's float row kernel, which reads each
    thread's range as 4 streams at once (kernels/simd.py, _row_dot_streams; without numba, only
    the first). On this project's 2-core machine the second read faster (36-46 GB/s where
    torch.sum read 26-38 in the same runs), so torch.sum alone understated the bandwidth and
    made the bound look looser than it is."""
    from .kernels import linear

    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    reads = {"torch.sum": buf.sum}
    if linear.HAVE_NUMBA:
        lin = linear.FloatLinear(buf.view(-1, 1024))
        x = np.ones((1, 1024), np.float32)
        reads["4 streams"] = lambda: lin.np_mm(x)
    for f in reads.values():
        f()  # warm-up (the kernel compiled or loaded)
    times = {k: [] for k in reads}
    for _ in range(repeats):  # alternating, so that both see the same machine
        for k, f in reads.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    del reads, buf
    return {k: nbytes // 4 * 4 / statistics.median(v) / 1e9 for k, v in times.items()}


def bytes_per_token(model, device=None) -> int:
    """Weight bytes one decode step reads: every projection, the vectors, one embedding row
    (only those on ``device``, if given)."""
    net = model._net
    dev = None if device is None else torch.device(device)
    total = 0
    for name, lin in net.lin.items():
        if dev is None or net.device_of(name) == dev:
            total += lin.nbytes
    for name, t in net.w.items():
        if dev is not None and t.device != dev:
            continue
        if name == "emb.weight":
            total += t.shape[1] * t.element_size()
        else:
            total += t.numel() * t.element_size()
    return int(total)


def random_ids(model, n: int, seed: int = 0) -> list:
    """n random token ids of the model's vocabulary (the same for the same seed)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist()


def time_decode(model, ids, n: int, warmup: int = 3) -> list:
    """Seconds of each of n one-token forward calls (after ``warmup`` untimed ones: compiles,
    graph captures, page faults), the state carried; GPU work waited for in each."""
    state = None
    for tok in ids[:warmup]:
        _, state = model.forward([tok], state)
    times = []
    for tok in ids[warmup:warmup + n]:
        t = time.perf_counter()
        _, state = model.forward([tok], state)
        model.synchronize()
        times.append(time.perf_counter() - t)
    return times


def time_prompt(model, ids) -> float:
    """Seconds of one forward call over ``ids`` from a fresh state, after an untimed one of the
    same length (the sequence path's own warm-up)."""
    model.forward(ids, None)
    model.synchronize()
    t = time.perf_counter()
    model.forward(ids, None)
    model.synchronize()
    return time.perf_counter() - t


def run(path, *, tokens: int = 32, prompt: int = 512, mode: str = "fast", threads=None,
        device="cpu", gpu_layers=None, compile=False, cache=True, progress=None) -> dict:
    """Measure a model file: per-token latency (median), prompt throughput, load time, memory,
    and the memory bandwidth of the device that holds the most weights, in the same run.
    With layers split between a GPU and the CPU, the bound is that of the CPU's share."""
    import rwkvpy

    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    model = rwkvpy.load(path, mode=mode, threads=threads, device=device, gpu_layers=gpu_layers,
                        compile=compile, cache=cache)
    load_s = time.perf_counter() - t0
    ids = random_ids(model, max(tokens, prompt) + 4)
    say(f"decoding {tokens} tokens")
    times = time_decode(model, ids, tokens)
    say(f"processing a {prompt}-token prompt")
    prompt_s = time_prompt(model, ids[:prompt])
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = model.devices[0] if model.devices[0].type == "cuda" else None
    # the bound of the slowest part: the GPU when every layer is there, else the CPU's layers
    where = gpu if gpu is not None and model.gpu_layers == model.config.n_layer else torch.device("cpu")
    say(f"measuring the memory bandwidth of {where}")
    if where.type == "cpu":
        bws = cpu_read_bandwidths()
        bw = max(bws.values())
    else:
        bws = {}
        bw = read_bandwidth_gbs(device=where)
    nbytes = bytes_per_token(model, where if gpu is not None else None)
    bound_ms = nbytes / (bw * 1e9) * 1e3
    per_token_ms = statistics.median(times) * 1e3
    # the format of the layers' projection matrices (emb and head often stay F16/F32)
    first = model._net.lin["blocks.0.att.key.weight"]
    step = model._step
    extra = {}
    if gpu is not None:
        extra = {"gpu": torch.cuda.get_device_name(gpu), "gpu_layers": model.gpu_layers,
                 "weights_dtype": str(first.weight.dtype).removeprefix("torch."),
                 "compiled": compile, "cuda_graphs": bool(getattr(step, "graphs", False)
                                     and 1 not in getattr(step, "graph_errors", {1: ""})),
                 "peak_gpu_mb": round(torch.cuda.max_memory_allocated(gpu) / 2**20, 1)}
    return {
        "model": str(path), "version": model.info.version.value, "type": first.fmt,
        "mode": mode, "device": str(where), "threads": torch.get_num_threads(),
        "repack_cache": model.repack_cache, **extra,
        "per_token_ms": round(per_token_ms, 3), "per_token_min_ms": round(min(times) * 1e3, 3),
        "tokens_timed": len(times),
        "prompt_tokens": prompt, "prompt_tokens_per_s": round(prompt / prompt_s, 1),
        "load_s": round(load_s, 3), "peak_rss_mb": round(peak_rss_mb, 1),
        "bandwidth_gbs": round(bw, 2),
        **({"bandwidth_by_read_gbs": {k: round(v, 2) for k, v in bws.items()}} if bws else {}),
        "bytes_per_token": nbytes, "bound_ms": round(bound_ms, 3),
        "bound_ratio": round(per_token_ms / bound_ms, 2),
    }


def format_report(r: dict) -> str:
    return "\n".join([
        f"model:        {r['model']} (v{r['version']}, {r['type']}, mode {r['mode']}, "
        f"{r['threads']} threads)",
        *([f"gpu:          {r['gpu']}: {r['gpu_layers']} layers, weights {r['weights_dtype']}, "
           f"CUDA graphs {'on' if r['cuda_graphs'] else 'off'}, peak {r['peak_gpu_mb']:.0f} MB"]
          if "gpu" in r else []),
        f"per token:    {r['per_token_ms']:.2f} ms median, {r['per_token_min_ms']:.2f} ms min "
        f"over {r['tokens_timed']} tokens",
        f"bound:        {r['bound_ms']:.2f} ms = {r['bytes_per_token'] / 1e6:.1f} MB per token / "
        f"{r['bandwidth_gbs']:.1f} GB/s read bandwidth of {r['device']} (measured now"
        + "".join(f"; {k} {v:.1f}" for k, v in r.get("bandwidth_by_read_gbs", {}).items())
        + "); "
        f"ratio {r['bound_ratio']:.2f}",
        f"prompt:       {r['prompt_tokens_per_s']:.1f} tokens/s over {r['prompt_tokens']} tokens",
        f"load:         {r['load_s']:.2f} s (repack cache: {r['repack_cache']}), "
        f"peak RSS {r['peak_rss_mb']:.0f} MB",
    ])
