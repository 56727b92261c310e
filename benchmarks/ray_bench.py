#!/usr/bin/env python
"""rwkvpy on Ray against one process, on this machine (the demo model unless --model).

Measured, in one run:

- serving: requests/s and generated tokens/s of ``--clients`` concurrent clients sending
  ``--requests`` completions of ``--max-tokens`` tokens each, to ``rwkvpy serve --ray`` with 1
  replica (all CPUs' threads) and with 2 replicas (half each), each in ``--rounds`` rounds
  that alternate with rounds on the single-process server (``rwkvpy serve``, all CPUs'
  threads), which stays up meanwhile: the median round of each;
- the Ray hop: p50/p99 latency of a short completion (``--latency-tokens`` tokens, one
  client, ``--latency-requests`` requests after a warm-up), single process and 1 replica
  alternating request by request;
- batch: rows/s of ``rwkvpy batch generate`` over ``--rows`` requests, in one process vs on
  Ray Data with 2 actors (one CPU each), over the whole job; and the time to the first rows
  (in one process: loading the model; on Ray: mostly the actors starting and loading it).

With ``--sessions``, only the prefix cache's hit rate on 2 replicas instead: ``--sessions``
chat sessions at once, each of ``--turns`` turns (one request after another, the reply added to
the conversation), all opening with the same long system prompt; once with ``X-Session-Id``
(each session on its replica: the session affinity of rwkvpy.server.ray_router) and once
without (Ray Serve's default choice), on fresh replicas each time. Reported: the prompt tokens
read from the prefix cache (the responses' ``cached_tokens``) over all prompt tokens, the
cache's lookup hits and misses (``/v1/stats``), and the time of the whole workload.

With ``--autoscale MIN:MAX``, only autoscaling instead: the deployment autoscales from MIN
replicas (1 thread each, ``--max-concurrent`` 8 so that one replica is meant for 4 requests in
flight), ``--clients`` clients send completions without pause until MAX replicas run or
``--autoscale-timeout`` seconds pass; reported: when each replica count was first seen
(Ray Serve's status) and the completions finished in each interval between.

Ray runs as a local instance with the machine's CPUs (127.0.0.1, no dashboard); everything is
shut down at the end. Usage::

    python benchmarks/ray_bench.py [--json results.json]
    python benchmarks/ray_bench.py --sessions 8 --turns 4
    python benchmarks/ray_bench.py --autoscale 1:2 --clients 16
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

PROMPTS = [
    "Once upon a time",
    "The sea is",
    "Hello there",
    "RWKV is",
    "A cat sat on the",
    "Dear sir,",
    "In the morning",
    "The end of the",
]


def _load_avg() -> float:
    return os.getloadavg()[0]


def drive(url: str, n: int, clients: int, max_tokens: int) -> dict:
    """``n`` completions from ``clients`` threads: requests/s, tokens/s."""

    def one(i):
        r = httpx.post(
            url + "/v1/completions",
            timeout=600,
            json={
                "model": "bench",
                "prompt": PROMPTS[i % len(PROMPTS)],
                "max_tokens": max_tokens,
                "seed": i,
                "temperature": 1.0,
                "stop": [],
            },
        )
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients)))  # warm-up: every replica's kernels and buffers
        t0 = time.perf_counter()
        tokens = sum(pool.map(one, range(n)))
        wall = time.perf_counter() - t0
    return {
        "requests": n,
        "clients": clients,
        "seconds": wall,
        "requests_per_s": n / wall,
        "tokens_per_s": tokens / wall,
    }


def latency(urls: dict, n: int, max_tokens: int) -> dict:
    """p50/p99 of a short completion for each of ``urls`` ({name: url}), one request to each
    in turn, so that they share whatever else the machine does."""
    times = {k: [] for k in urls}
    with httpx.Client(timeout=60) as c:
        for i in range(n + 5):
            for k, url in urls.items():
                t0 = time.perf_counter()
                r = c.post(
                    url + "/v1/completions",
                    json={"model": "bench", "prompt": "Hello", "max_tokens": max_tokens, "seed": i},
                )
                r.raise_for_status()
                if i >= 5:  # the first ones warm up
                    times[k].append((time.perf_counter() - t0) * 1000)
    out = {}
    for k, t in times.items():
        t.sort()
        out[k] = {
            "n": n,
            "max_tokens": max_tokens,
            "p50_ms": statistics.median(t),
            "p99_ms": t[min(len(t) - 1, round(0.99 * (len(t) - 1)))],
            "mean_ms": statistics.fmean(t),
        }
    return out


def rounds(urls: dict, k: int, n: int, clients: int, max_tokens: int) -> dict:
    """``k`` rounds of :func:`drive` on each of ``urls`` in turn; the median round of each."""
    got = {name: [] for name in urls}
    for _ in range(k):
        for name, url in urls.items():
            got[name].append(drive(url, n, clients, max_tokens))
    out = {}
    for name, rs in got.items():
        rs.sort(key=lambda r: r["requests_per_s"])
        out[name] = {
            **rs[len(rs) // 2],
            "rounds": k,
            "requests_per_s_all": [round(r["requests_per_s"], 2) for r in rs],
        }
    return out


SYSTEM = (
    "You are the ship's log of the schooner Wanderer. Answer in the voice of an old "
    "sailor who has crossed every ocean twice; mention the weather, the wind and the "
    "state of the rigging in every answer, and never use more than three sentences. "
) * 4


NEWS = (
    "We sighted two whales off the port bow this morning, the cook burned the bread again, "
    "and the mate swears the barometer is falling. What do you make of it, and what should "
    "we do about the foresail before nightfall?"
)


def chat_sessions(url: str, sessions: int, turns: int, max_tokens: int, affinity: bool) -> dict:
    """``sessions`` conversations at once, ``turns`` turns each: prompt tokens, cached ones."""

    def session(i):
        msgs, got = [{"role": "system", "content": SYSTEM}], []
        headers = {"X-Session-Id": f"session-{i}"} if affinity else {}
        with httpx.Client(timeout=600) as c:
            for t in range(turns):
                msgs.append({"role": "user", "content": f"Day {t} of voyage {i}. " + NEWS})
                r = c.post(
                    url + "/v1/chat/completions",
                    headers=headers,
                    json={
                        "model": "bench",
                        "messages": msgs,
                        "max_tokens": max_tokens,
                        "seed": 100 * i + t,
                        "temperature": 1.0,
                    },
                )
                r.raise_for_status()
                u = r.json()["usage"]
                got.append(
                    (
                        u["prompt_tokens"],
                        u["prompt_tokens_details"]["cached_tokens"],
                        r.headers.get("x-rwkvpy-replica"),
                    )
                )
                msgs.append(r.json()["choices"][0]["message"])
        return got

    t0 = time.perf_counter()
    with ThreadPoolExecutor(sessions) as pool:
        done = list(pool.map(session, range(sessions)))
    wall = time.perf_counter() - t0
    prompt = sum(p for s in done for p, _, _ in s)
    cached = sum(c for s in done for _, c, _ in s)
    return {
        "sessions": sessions,
        "turns": turns,
        "seconds": wall,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "cached_fraction": cached / prompt,
        "prefilled_tokens": prompt - cached,
        "replicas_per_session": statistics.fmean(len({r for *_, r in s}) for s in done),
    }


def sessions_mode(a, cpus: int) -> dict:
    import ray

    from rwkvpy.server import ray_serve

    out = {}
    ray.init(
        num_cpus=max(cpus, 2),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    try:
        for affinity in (True, False):
            name = "session_affinity" if affinity else "default_routing"
            print(
                f"... {a.sessions} chat sessions on 2 replicas, {name}", file=sys.stderr, flush=True
            )
            url = ray_serve.deploy(ray_spec(a.model, max(1, cpus // 2)), replicas=2, port=0)
            try:
                load = _load_avg()
                r = chat_sessions(url, a.sessions, a.turns, a.max_tokens, affinity)
                time.sleep(2 * ray_serve.STATS_EVERY)  # the replicas' last counters published
                cache = httpx.get(url + "/v1/stats").json()["engine"]["prefix_cache"]
                lookups = cache["hits"] + cache["misses"]
                out[name] = {
                    "load_avg": load,
                    **r,
                    "cache_hits": cache["hits"],
                    "cache_misses": cache["misses"],
                    "lookup_hit_rate": cache["hits"] / lookups if lookups else None,
                }
            finally:
                ray_serve.shutdown()
    finally:
        ray.shutdown()
    return out


def autoscale_mode(a, cpus: int) -> dict:
    import threading

    import ray
    from ray import serve

    from rwkvpy.cli.serve_ray import parse_autoscale
    from rwkvpy.server import ray_serve

    lo, hi = parse_autoscale(a.autoscale)
    ray.init(
        num_cpus=max(cpus, hi),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    stop, done, rejected, lock = threading.Event(), [], [], threading.Lock()

    def client(i):
        with httpx.Client(timeout=600) as c:
            while not stop.is_set():
                r = c.post(
                    url + "/v1/completions",
                    json={
                        "model": "bench",
                        "prompt": PROMPTS[i % len(PROMPTS)],
                        "max_tokens": a.max_tokens,
                        "seed": i,
                        "stop": [],
                    },
                )
                if r.status_code == 429:  # the replica's slots are full: counted, tried again
                    rejected.append(time.perf_counter())
                    time.sleep(0.1)
                    continue
                r.raise_for_status()
                with lock:
                    done.append(time.perf_counter())

    timeline = []
    try:
        url = ray_serve.deploy(
            ray_spec(a.model, 1, "--max-concurrent", "8"), autoscale=(lo, hi), port=0
        )
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
        for t in threads:
            t.start()
        last = None
        while time.perf_counter() - t0 < a.autoscale_timeout:
            st = serve.status().applications[ray_serve.APP_NAME].deployments["rwkvpy"]
            running = dict(st.replica_states).get("RUNNING", 0)
            if running != last:
                now = time.perf_counter()
                with lock:
                    n = len(done)
                timeline.append(
                    {
                        "seconds": round(now - t0, 1),
                        "running": running,
                        "completions_so_far": n,
                        "load_avg": _load_avg(),
                    }
                )
                print(
                    f"... {now - t0:.1f} s: {running} replica(s) running, {n} completions",
                    file=sys.stderr,
                    flush=True,
                )
                last = running
            if running >= hi:
                break
            time.sleep(0.5)
        time.sleep(10)  # the rate with MAX replicas
        stop.set()
        for t in threads:
            t.join()
        end = time.perf_counter()
    finally:
        stop.set()
        ray_serve.shutdown()
        ray.shutdown()
    out = {
        "autoscale": [lo, hi],
        "clients": a.clients,
        "max_tokens": a.max_tokens,
        "timeline": timeline,
        "seconds": end - t0,
        "completions": len(done),
        "rejected_429": len(rejected),
    }
    if len(timeline) > 1:  # completions/s before the last scale-up and in the 10 s after it
        up = t0 + timeline[-1]["seconds"]
        before = [t for t in done if t < up]
        after = [t for t in done if up <= t < up + 10]
        out["completions_per_s_before"] = len(before) / (up - t0)
        out["completions_per_s_after"] = len(after) / 10
    return out


def single_process_server(model: str, threads: int):
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rwkvpy.server",
            model,
            "--port",
            "0",
            "--threads",
            str(threads),
            "--model-name",
            "bench",
            "--no-access-log",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300
    while True:
        with open(log.name) as f:
            m = re.search(r"listening on (http://[0-9.]+:\d+)", f.read())
        if m:
            return proc, m.group(1)
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            with open(log.name) as f:
                raise SystemExit(f"the server did not start:\n{f.read()}")
        time.sleep(0.2)


def ray_spec(model: str, threads: int, *extra: str) -> dict:
    from rwkvpy.cli.options import take_positionals
    from rwkvpy.cli.serve import add_serve_arguments
    from rwkvpy.cli.serve_ray import replica_spec

    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    args = p.parse_args(
        [model, "--threads", str(threads), "--model-name", "bench", "--no-access-log", *extra]
    )
    take_positionals(args)
    return replica_spec(args, None, [])


def batch_rows(model: str, rows: int, max_tokens: int, ray_on: bool, cpus: int, tmp: str):
    from rwkvpy import batch

    src = os.path.join(tmp, "in.jsonl")
    with open(src, "w") as f:
        for i in range(rows):
            f.write(
                json.dumps(
                    {
                        "id": i,
                        "prompt": PROMPTS[i % len(PROMPTS)],
                        "max_tokens": max_tokens,
                        "seed": i,
                    }
                )
                + "\n"
            )
    first = []  # (time, rows) of the first group to come back

    def seen(rows, _pid):
        if not first:
            first.append((time.perf_counter(), len(rows)))

    t0 = time.perf_counter()
    kw = (
        {"ray": True, "concurrency": cpus, "load_kw": {"threads": 1}}
        if ray_on
        else {"load_kw": {"threads": cpus}}
    )
    batch.run(
        "generate",
        model,
        src,
        os.path.join(tmp, f"out{int(ray_on)}.jsonl"),
        force=True,
        on_rows=seen,
        **kw,
    )
    wall = time.perf_counter() - t0
    start = first[0][0] - t0
    # groups come back in input order: the first one's time is mostly the start (Ray's actors
    # starting and loading the model), not a rate
    return {
        "rows": rows,
        "max_tokens": max_tokens,
        "seconds": wall,
        "rows_per_s": rows / wall,
        "first_rows_s": start,
    }


def main() -> int:
    os.environ.setdefault("RWKVPY_BACKGROUND_COMPILE", "0")  # time the kernels, not a first run
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--requests", type=int, default=32, help="requests per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--latency-requests", type=int, default=100)
    ap.add_argument("--latency-tokens", type=int, default=1)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument(
        "--sessions",
        type=int,
        default=0,
        help="measure only the prefix cache's hit rate with this many chat sessions",
    )
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument(
        "--autoscale", metavar="MIN:MAX", default=None, help="measure only the scale-up under load"
    )
    ap.add_argument("--autoscale-timeout", type=float, default=180.0)
    ap.add_argument("--json", metavar="PATH", default=None)
    a = ap.parse_args()
    import ray

    from rwkvpy.model import physical_cores
    from rwkvpy.server import ray_serve

    cpus = physical_cores()
    out = {"cpus": cpus, "cpu": _cpu_name(), "model": a.model, "load_avg_start": _load_avg()}
    say = lambda m: print(f"... {m}", file=sys.stderr, flush=True)  # noqa: E731
    if a.sessions:
        out.update(sessions_mode(a, cpus))
        return _report(out, a.json)
    if a.autoscale:
        out.update(autoscale_mode(a, cpus))
        return _report(out, a.json)

    say("single-process server")
    proc, single = single_process_server(a.model, cpus)
    ray.init(
        num_cpus=cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    try:
        # the single-process server stays up: each Ray configuration is measured in rounds
        # that alternate with it, so that both see the same machine
        for replicas in (1, 2):
            say(f"Ray Serve, {replicas} replica(s), against the single process")
            url = ray_serve.deploy(
                ray_spec(a.model, max(1, cpus // replicas)), replicas=replicas, port=0
            )
            try:
                out[f"serve_{replicas}_replica"] = {
                    "load_avg": _load_avg(),
                    **rounds(
                        {"single": single, "ray": url},
                        a.rounds,
                        a.requests,
                        a.clients,
                        a.max_tokens,
                    ),
                }
                if replicas == 1:
                    out["latency"] = latency(
                        {"single": single, "ray": url}, a.latency_requests, a.latency_tokens
                    )
            finally:
                ray_serve.shutdown()
        proc.terminate()
        proc.wait(30)
        with tempfile.TemporaryDirectory() as tmp:
            say("batch, one process")
            out["batch_local"] = {
                "load_avg": _load_avg(),
                **batch_rows(a.model, a.rows, a.max_tokens, False, cpus, tmp),
            }
            say("batch, Ray Data")
            out["batch_ray"] = {
                "load_avg": _load_avg(),
                **batch_rows(a.model, a.rows, a.max_tokens, True, cpus, tmp),
            }
    finally:
        if proc.poll() is None:
            proc.kill()
        ray.shutdown()
    return _report(out, a.json)


def _report(out: dict, path: str | None) -> int:
    out["load_avg_end"] = _load_avg()
    print(json.dumps(out, indent=2))
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
