"""``rwkvpy bench``: latency and throughput of a model, against this machine's memory bandwidth
measured in the same run.

A decode run reports what a user waiting for its tokens feels (the mean step and the tokens per
second of the whole timed run) beside what the model costs on a free CPU (the median and the
fastest step), the slow tail (p90), and the state of the machine around it: the load average
when the timing starts and ends and the CPUs this process may use. When these say that other
work shared the CPUs, the report says so (``busy``, ``busy_reason``). No timing includes a first
call: compilations, graph captures and page faults happen in untimed warm-up calls."""

from __future__ import annotations

import math
import os
import resource
import statistics
import time
from typing import Any

import numpy as np
import torch

#: Untimed one-token calls before the timed decode steps (compiles, graph captures, page faults).
WARMUP_STEPS = 3

# When a run counts as measured on a busy machine. Every decode step does the same work (the
# same weights read, the same state updated), so on a free machine the steps take about the
# same time and the mean and the 90th percentile sit near the median; a step that had to wait
# for a CPU taken by another process lands in the tail and pulls the mean up.
#: busy when the mean step is above this multiple of the median: at 1.5 a third of the run's
#: time (or more) went to waiting beyond the typical step, so tokens/s is not the model's.
BUSY_MEAN_RATIO = 1.5
#: busy when the 90th percentile step is above this multiple of the median: one step in ten
#: (or more) took twice the typical step, far outside the step-to-step variation of a free CPU.
BUSY_P90_RATIO = 2.0
#: busy when the 1-minute load average, at the start or at the end of the timing, is above this
#: multiple of the CPUs this process may use: more threads wanted to run than there were CPUs,
#: so the timed threads shared theirs. (The end value includes this run's own threads: with no
#: more threads than CPUs they alone keep it at or below the CPU count.)
BUSY_LOAD_RATIO = 1.0


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average (runnable and waiting threads of the whole system), or None
    where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - Windows
        return None


def percentile(values, q: float) -> float:
    """The nearest-rank ``q``-th percentile: the smallest of ``values`` that at least ``q`` % of
    them do not exceed, ``sorted(values)[ceil(q / 100 * n) - 1]``; always one of the values
    (p90 of [1, 1, 1, 1, 10] is 10: 4 of 5 values, 80 %, are below 10)."""
    v = sorted(values)
    if not v:
        return math.nan
    return v[max(0, math.ceil(q / 100 * len(v)) - 1)]


def step_stats(times) -> dict:
    """Statistics of the seconds of timed decode steps: ``per_token_ms`` (the median),
    ``per_token_mean_ms``, ``per_token_p90_ms`` (:func:`percentile`), ``per_token_min_ms``,
    ``tokens_timed``, ``decode_s`` (the sum of the steps: the timed run without the timer's own
    calls) and ``decode_tokens_per_s`` (``tokens_timed / decode_s``, the rate of the whole run,
    not 1 / median). Unrounded; NaN where no step was timed."""
    n = len(times)
    total = float(sum(times))
    nan = math.nan
    return {
        "per_token_ms": statistics.median(times) * 1e3 if n else nan,
        "per_token_mean_ms": total / n * 1e3 if n else nan,
        "per_token_p90_ms": percentile(times, 90) * 1e3 if n else nan,
        "per_token_min_ms": min(times) * 1e3 if n else nan,
        "tokens_timed": n,
        "decode_s": total,
        "decode_tokens_per_s": n / total if n and total > 0 else nan,
    }


def busy_reason(stats: dict, load_start=None, load_end=None, cpus=None) -> str | None:
    """Why the run looks measured on a busy machine (the thresholds above), or None. ``stats``
    as :func:`step_stats`; a load or CPU count of None is not checked."""
    why = []
    if cpus and any(x is not None and x > BUSY_LOAD_RATIO * cpus for x in (load_start, load_end)):
        loads = " -> ".join(f"{x:.2f}" for x in (load_start, load_end) if x is not None)
        why.append(f"load average {loads} on {cpus} CPU{'' if cpus == 1 else 's'}")
    med = stats.get("per_token_ms", math.nan)
    mean = stats.get("per_token_mean_ms", math.nan)
    p90 = stats.get("per_token_p90_ms", math.nan)
    if med > 0 and mean > BUSY_MEAN_RATIO * med:
        why.append(f"mean {mean:.2f} ms vs median {med:.2f} ms")
    if med > 0 and p90 > BUSY_P90_RATIO * med:
        why.append(f"p90 {p90:.2f} ms vs median {med:.2f} ms")
    return "; ".join(why) or None


def machine_fields(stats: dict, load_start, load_end) -> dict:
    """The machine's fields of a report: ``load_avg_start``, ``load_avg_end`` (1-minute, at
    the start and end of the timing), ``cpus`` (usable), ``cpu_count`` (the system's), and
    ``busy`` / ``busy_reason`` (:func:`busy_reason`; the reason None when not busy)."""
    cpus = usable_cpus()
    why = busy_reason(stats, load_start, load_end, cpus)
    rnd = lambda x: None if x is None else round(x, 2)  # noqa: E731
    return {
        "load_avg_start": rnd(load_start),
        "load_avg_end": rnd(load_end),
        "cpus": cpus,
        "cpu_count": os.cpu_count(),
        "busy": why is not None,
        "busy_reason": why,
    }


def busy_warning(why: str, what: str = "these numbers are not this model's speed") -> str:
    """The one-line warning of a busy run."""
    return f"warning: the machine was busy ({why}): {what}"


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
    thread's range as 4 streams at once (kernels/ir/rows.py, _row_dot_streams; without numba, only
    the first). Where the second reads faster (docs/performance.md has measured pairs),
    torch.sum alone would understate the bandwidth and make the bound look looser than it is."""
    from .kernels import linear

    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    reads: dict[str, Any] = {"torch.sum": buf.sum}
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


def time_decode(
    model, ids, n: int, warmup: int = WARMUP_STEPS, before=None, settle_s: float | None = None
) -> list:
    """Seconds of each of n one-token forward calls (after ``warmup`` untimed ones: compiles,
    graph captures, page faults), the state carried; GPU work waited for in each. The untimed
    calls go on (over ids[:warmup] again) for at least ``settle_s`` seconds (default:
    runtime.settle_seconds(), so that a thread count the governor lowered while a first run's
    second process compiled the kernels is back before the timing). ``before``, if given, is
    called after the warm-up, just before the first timed call."""
    from . import runtime

    model.wait_for_kernels()  # a first run: the one-token step, not the sequence path
    end = time.perf_counter() + (runtime.settle_seconds() if settle_s is None else settle_s)
    state, i = None, 0
    while i < warmup or (i and time.perf_counter() < end):
        _, state = model.forward([ids[i % warmup]], state)
        i += 1
    model.synchronize()  # the warm-up's GPU work is not the first timed step's
    if before is not None:
        before()
    times = []
    for tok in ids[warmup : warmup + n]:
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


def time_run(model, ids, tokens: int, prompt: int) -> dict:
    """Time ``tokens`` decode steps (:func:`time_decode`) then a ``prompt``-token call
    (:func:`time_prompt`), with the load average just before the first timed step and just
    after the prompt: :func:`step_stats` (unrounded), ``prompt_s`` and :func:`machine_fields`."""
    load = {}
    times = time_decode(model, ids, tokens, before=lambda: load.setdefault("start", load_average()))
    prompt_s = time_prompt(model, ids[:prompt])
    load_end = load_average()
    stats = step_stats(times)
    return {**stats, "prompt_s": prompt_s, **machine_fields(stats, load.get("start"), load_end)}


def load_timed(path, mode, threads, device, gpu_layers, compile, cache, cpu_capability=None):
    """(the model, the seconds ``rwkvpy.load`` took): the load of ``run`` and of
    ``rwkvpy compare``'s rows; ``cpu_capability`` goes to the load only when given."""
    import rwkvpy

    more = {} if cpu_capability is None else {"cpu_capability": cpu_capability}
    t0 = time.perf_counter()
    model = rwkvpy.load(
        path,
        mode=mode,
        threads=threads,
        device=device,
        gpu_layers=gpu_layers,
        compile=compile,
        cache=cache,
        **more,
    )
    return model, time.perf_counter() - t0


def run(
    path,
    *,
    tokens: int = 32,
    prompt: int = 512,
    mode: str = "fast",
    threads=None,
    device="cpu",
    gpu_layers=None,
    compile=False,
    cache=True,
    cpu_capability=None,
    progress=None,
) -> dict:
    """Measure a model file: per-token latency (median, mean, p90, min) and decode tokens/s,
    prompt throughput, load time, memory, the machine's load (and whether it was busy: see
    :func:`busy_reason`), and the memory bandwidth of the device that holds the most weights, in
    the same run. With layers split between a GPU and the CPU, the bound is that of the CPU's
    share. ``cpu_capability`` goes to :func:`rwkvpy.load` when given."""

    say = progress or (lambda msg: None)
    model, load_s = load_timed(
        path, mode, threads, device, gpu_layers, compile, cache, cpu_capability
    )
    ids = random_ids(model, max(tokens + WARMUP_STEPS, prompt) + 1)
    say(
        f"decoding {tokens} tokens (after {WARMUP_STEPS} untimed), then a {prompt}-token prompt "
        "(after an untimed one)"
    )
    m = time_run(model, ids, tokens, prompt)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = model.devices[0] if model.devices[0].type == "cuda" else None
    # the bound of the slowest part: the GPU when every layer is there, else the CPU's layers
    where = (
        gpu if gpu is not None and model.gpu_layers == model.config.n_layer else torch.device("cpu")
    )
    say(f"measuring the memory bandwidth of {where}")
    if where.type == "cpu":
        bws = cpu_read_bandwidths()
        bw = max(bws.values())
    else:
        bws = {}
        bw = read_bandwidth_gbs(device=where)
    nbytes = bytes_per_token(model, where if gpu is not None else None)
    bound_ms = nbytes / (bw * 1e9) * 1e3
    per_token_ms = m["per_token_ms"]
    # the format of the layers' projection matrices (emb and head often stay F16/F32)
    first = model._net.lin["blocks.0.att.key.weight"]
    step = model._step
    kernels = getattr(model, "kernels", None)  # which kernels ran (where the model says)
    extra = {}
    if gpu is not None:
        extra = {
            "gpu": torch.cuda.get_device_name(gpu),
            "gpu_layers": model.gpu_layers,
            "weights_dtype": str(first.weight.dtype).removeprefix("torch."),
            "compiled": compile,
            "cuda_graphs": bool(
                getattr(step, "graphs", False) and 1 not in getattr(step, "graph_errors", {1: ""})
            ),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated(gpu) / 2**20, 1),
        }
    return {
        "model": str(path),
        "version": model.info.version.value,
        "type": first.fmt,
        "mode": mode,
        "device": str(where),
        "threads": torch.get_num_threads(),
        "repack_cache": model.repack_cache,
        **extra,
        **{
            k: round(m[k], 3)
            for k in ("per_token_ms", "per_token_mean_ms", "per_token_p90_ms", "per_token_min_ms")
        },
        "tokens_timed": m["tokens_timed"],
        "decode_s": round(m["decode_s"], 6),
        "decode_tokens_per_s": round(m["decode_tokens_per_s"], 1),
        "prompt_tokens": prompt,
        "prompt_tokens_per_s": round(prompt / m["prompt_s"], 1),
        **{
            k: m[k]
            for k in ("load_avg_start", "load_avg_end", "cpus", "cpu_count", "busy", "busy_reason")
        },
        "load_s": round(load_s, 3),
        "peak_rss_mb": round(peak_rss_mb, 1),
        "bandwidth_gbs": round(bw, 2),
        **({"bandwidth_by_read_gbs": {k: round(v, 2) for k, v in bws.items()}} if bws else {}),
        "bytes_per_token": nbytes,
        "bound_ms": round(bound_ms, 3),
        "bound_ratio": round(per_token_ms / bound_ms, 2),
        **({"kernels": kernels} if kernels is not None else {}),
    }


def format_kernels(k) -> str:
    """``Model.kernels`` on one line: each entry as "name value", a dict's items joined by
    commas, the CPU capability by its level."""
    if not isinstance(k, dict):
        return str(k)
    parts = []
    for key, v in k.items():
        name = str(key).replace("_", " ")
        if isinstance(v, dict) and "level" in v:
            parts.append(f"CPU level {v['level']}")
        elif isinstance(v, dict):
            parts.append(f"{name} " + ", ".join(f"{a} {b}" for a, b in v.items()))
        else:
            parts.append(f"{name} {v}")
    return "; ".join(parts)


def _load_avg(x) -> str:
    return "?" if x is None else f"{x:.2f}"


def format_report(r: dict) -> str:
    return "\n".join(
        [
            f"model:        {r['model']} (v{r['version']}, {r['type']}, mode {r['mode']}, "
            f"{r['threads']} threads)",
            *(
                [
                    f"gpu:          {r['gpu']}: {r['gpu_layers']} layers, weights {r['weights_dtype']}, "
                    f"CUDA graphs {'on' if r['cuda_graphs'] else 'off'}, peak {r['peak_gpu_mb']:.0f} MB"
                ]
                if "gpu" in r
                else []
            ),
            *([f"kernels:      {format_kernels(r['kernels'])}"] if "kernels" in r else []),
            f"per token:    {r['per_token_ms']:.2f} ms median, {r['per_token_mean_ms']:.2f} ms mean, "
            f"{r['per_token_p90_ms']:.2f} ms p90, {r['per_token_min_ms']:.2f} ms min over "
            f"{r['tokens_timed']} tokens (after {WARMUP_STEPS} untimed)",
            f"decode:       {r['decode_tokens_per_s']:.1f} tokens/s over the timed run "
            f"({r['tokens_timed']} tokens in {r['decode_s']:.3f} s)",
            f"bound:        {r['bound_ms']:.2f} ms = {r['bytes_per_token'] / 1e6:.1f} MB per token / "
            f"{r['bandwidth_gbs']:.1f} GB/s read bandwidth of {r['device']} (measured now"
            + "".join(f"; {k} {v:.1f}" for k, v in r.get("bandwidth_by_read_gbs", {}).items())
            + "); "
            f"ratio {r['bound_ratio']:.2f}",
            f"prompt:       {r['prompt_tokens_per_s']:.1f} tokens/s over {r['prompt_tokens']} tokens "
            "(after an untimed call)",
            f"load:         {r['load_s']:.2f} s (repack cache: {r['repack_cache']}), "
            f"peak RSS {r['peak_rss_mb']:.0f} MB",
            f"machine:      load average {_load_avg(r['load_avg_start'])} -> "
            f"{_load_avg(r['load_avg_end'])} (1 min, start -> end of the timing), {r['cpus']} "
            f"CPUs usable of {r['cpu_count']}",
            *([busy_warning(r["busy_reason"])] if r.get("busy") else []),
        ]
    )
