"""``rwkvpy bench``: latency and throughput of a model, against this machine's memory bandwidth
measured in the same run (the machine is shared and noisy: medians, ratios, thread count)."""

from __future__ import annotations

import resource
import statistics
import time

import torch


def read_bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Streaming read bandwidth (GB/s) with torch's current thread count: sum of a large buffer."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    best = []
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        best.append(time.perf_counter() - t)
    del buf
    return nbytes / statistics.median(best) / 1e9


def bytes_per_token(model) -> int:
    """Weight bytes one decode step reads: every projection, the vectors, one embedding row."""
    net = model._net
    total = sum(lin.nbytes for lin in net.lin.values())
    for name, t in net.w.items():
        if name == "emb.weight":
            total += t.shape[1] * t.element_size()
        else:
            total += t.numel() * t.element_size()
    return int(total)


def run(path, *, tokens: int = 32, prompt: int = 512, mode: str = "fast", threads=None,
        progress=None) -> dict:
    import rwkvpy

    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    model = rwkvpy.load(path, mode=mode, threads=threads)
    load_s = time.perf_counter() - t0
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (max(tokens, prompt) + 4,), generator=g).tolist()

    say(f"decoding {tokens} tokens")
    state = None
    for tok in ids[:3]:  # warm-up: compiles, page faults
        _, state = model.forward([tok], state)
    times = []
    for tok in ids[3:3 + tokens]:
        t = time.perf_counter()
        _, state = model.forward([tok], state)
        times.append(time.perf_counter() - t)
    say(f"processing a {prompt}-token prompt")
    model.forward(ids[:16], None)  # warm-up of the sequence path
    t = time.perf_counter()
    model.forward(ids[:prompt], None)
    prompt_s = time.perf_counter() - t
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    say("measuring memory bandwidth")
    bw = read_bandwidth_gbs()
    nbytes = bytes_per_token(model)
    bound_ms = nbytes / (bw * 1e9) * 1e3
    per_token_ms = statistics.median(times) * 1e3
    # the format of the layers' projection matrices (emb and head often stay F16/F32)
    main_type = model._net.lin["blocks.0.att.key.weight"].fmt
    return {
        "model": str(path), "version": model.info.version.value, "type": main_type,
        "mode": mode, "threads": torch.get_num_threads(),
        "per_token_ms": round(per_token_ms, 3), "per_token_min_ms": round(min(times) * 1e3, 3),
        "tokens_timed": len(times),
        "prompt_tokens": prompt, "prompt_tokens_per_s": round(prompt / prompt_s, 1),
        "load_s": round(load_s, 3), "peak_rss_mb": round(peak_rss_mb, 1),
        "bandwidth_gbs": round(bw, 2), "bytes_per_token": nbytes, "bound_ms": round(bound_ms, 3),
        "bound_ratio": round(per_token_ms / bound_ms, 2),
    }


def format_report(r: dict) -> str:
    return "\n".join([
        f"model:        {r['model']} (v{r['version']}, {r['type']}, mode {r['mode']}, "
        f"{r['threads']} threads)",
        f"per token:    {r['per_token_ms']:.2f} ms median, {r['per_token_min_ms']:.2f} ms min "
        f"over {r['tokens_timed']} tokens",
        f"bound:        {r['bound_ms']:.2f} ms = {r['bytes_per_token'] / 1e6:.1f} MB per token / "
        f"{r['bandwidth_gbs']:.1f} GB/s read bandwidth (measured now); ratio {r['bound_ratio']:.2f}",
        f"prompt:       {r['prompt_tokens_per_s']:.1f} tokens/s over {r['prompt_tokens']} tokens",
        f"load:         {r['load_s']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB",
    ])
