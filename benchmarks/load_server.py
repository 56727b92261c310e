"""Load test of ``rwkvpy serve``: requests/s and generated tokens/s at 1, 4 and 16 concurrent
clients (``--levels``), each client sending streaming completions one after the other; requests
the server refuses (429 beyond ``--max-concurrent``) are counted by status, not failed.

Starts its own server on a free loopback port (``-m MODEL``, killed at the end) or targets a
running one (``--url``, loopback addresses only). Each level runs until ``--requests`` requests
completed or ``--seconds`` elapsed (a request in flight then still finishes). Reported per
level: completed requests, requests/s, generated tokens/s (from the responses' usage), mean,
p50, p95 and p99 request latency, the refused requests by status, mean time to the first token, and the mean size of the server's decode batches.

``--sequential N`` then sends N requests one after the other (one client, each prompt new) and
reports the server's RSS (a started server: read from /proc) and its prefix cache's entries and
bytes (``/v1/stats``) every ``--every`` requests: how memory grows over a long service.

    PYTHONPATH=src python benchmarks/load_server.py -m ../shared/fixtures/rwkv-cpp-tiny/tiny-rwkv-7v0-834K-FP32.bin
    PYTHONPATH=src python benchmarks/load_server.py --url http://127.0.0.1:8000 --api-key KEY
    PYTHONPATH=src python benchmarks/load_server.py -m demo --levels '' --sequential 1000
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlparse

import httpx

PROMPTS = [
    "Once upon a time",
    "The quick brown fox",
    "In the beginning",
    "It was a dark night",
    "The old man and the",
    "Far away, beyond the hills",
]


def start_server(args) -> tuple:
    fd, log_path = tempfile.mkstemp(suffix=".log")
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable,
        "-m",
        "rwkvpy.server",
        "-m",
        args.model,
        "--port",
        "0",
        "--no-access-log",
        "--max-concurrent",
        str(args.max_concurrent or max(args.levels or [1]) * 2),
        "--max-tokens-limit",
        str(max(args.max_tokens, 16)),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.max_batch:
        cmd += ["--max-batch", str(args.max_batch)]
    if args.cache_bytes is not None:
        cmd += ["--cache-bytes", str(args.cache_bytes)]
    proc = subprocess.Popen(cmd, stdout=fd, stderr=subprocess.STDOUT, env=env)
    os.close(fd)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with open(log_path) as f:
            m = re.search(r"listening on (http://\S+)", f.read())
        if m:
            url = m.group(1)
            while time.monotonic() < deadline:
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        return proc, url, log_path
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    with open(log_path) as f:
        sys.exit(f"the server did not start:\n{f.read()}")


class Refused(Exception):
    """A request the server answered with an error status (429 beyond its limits)."""

    def __init__(self, status: int, body: bytes):
        super().__init__(f"HTTP {status}: {body.decode(errors='replace')[:200]}")
        self.status, self.body = status, body


async def one_request(client, body) -> tuple:
    """(latency s, time to first text s or None, completion tokens)."""
    t0 = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise Refused(r.status_code, await r.aread())
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise RuntimeError(ev["error"]["message"])
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
            for c in ev.get("choices", ()):
                if c.get("text") and first is None:
                    first = time.perf_counter() - t0
    return time.perf_counter() - t0, first, tokens


async def run_level(url, headers, clients, args) -> dict:
    stop_at = time.monotonic() + args.seconds
    issued = 0
    results = []
    refused: dict = {}
    messages: list = []  # the first few errors' messages

    async def worker(w, client):
        nonlocal issued
        while issued < args.requests and time.monotonic() < stop_at:
            i = issued
            issued += 1
            body = {
                "prompt": f"{PROMPTS[i % len(PROMPTS)]} ({w}.{i})",
                "stream": True,
                "max_tokens": args.max_tokens,
                "temperature": 1.0,
                "seed": i,
                "stream_options": {"include_usage": True},
            }
            try:
                results.append(await one_request(client, body))
            except Refused as e:
                key = str(e.status)
                if e.status == 429 and json.loads(e.body).get("error", {}).get("type"):
                    key = "429 (JSON error body)"
                refused[key] = refused.get(key, 0) + 1
            except (httpx.HTTPError, RuntimeError) as e:
                refused[type(e).__name__] = refused.get(type(e).__name__, 0) + 1
                if len(messages) < 3 and str(e) not in messages:
                    messages.append(str(e)[:200])

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=300, limits=limits
    ) as client:
        st0 = (await client.get("/v1/stats")).json()["engine"]
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w, client) for w in range(clients)))
        wall = time.perf_counter() - t0
        st = (await client.get("/v1/stats")).json()["engine"]
    steps = st["decode_steps"] - st0["decode_steps"]
    mean_batch = (st["decode_tokens"] - st0["decode_tokens"]) / steps if steps else 0.0
    lat = sorted(r[0] for r in results) or [float("nan")]
    ttft = [r[1] for r in results if r[1] is not None]
    toks = sum(r[2] for r in results)

    def pct(q):
        return lat[min(len(lat) - 1, int(q * len(lat)))]

    return {
        "clients": clients,
        "requests": len(results),
        "seconds": wall,
        "requests_per_s": len(results) / wall,
        "tokens_per_s": toks / wall,
        "completion_tokens": toks,
        "latency_mean_s": statistics.fmean(lat),
        "latency_p50_s": pct(0.5),
        "latency_p95_s": pct(0.95),
        "latency_p99_s": pct(0.99),
        "refused": refused,
        "error_messages": messages,
        "ttft_mean_s": statistics.fmean(ttft) if ttft else None,
        "mean_decode_batch": mean_batch,
    }


def rss_mb(pid) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


async def run_sequential(url, headers, n, every, args, pid) -> list:
    """``n`` streaming completions one after the other, each prompt new; a row every ``every``
    requests: requests done, server RSS (MB, None without a pid), prefix cache entries and
    bytes, mean latency of the block."""
    rows = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as client:

        async def row(done, lat):
            cache = (await client.get("/v1/stats")).json()["engine"].get("prefix_cache") or {}
            rows.append(
                {
                    "requests": done,
                    "rss_mb": rss_mb(pid) if pid else None,
                    "cache_entries": cache.get("entries"),
                    "cache_mb": cache["nbytes"] / 2**20 if "nbytes" in cache else None,
                    "latency_mean_s": statistics.fmean(lat) if lat else None,
                }
            )

        await row(0, [])
        lat: list = []
        for i in range(n):
            body = {
                "prompt": f"{PROMPTS[i % len(PROMPTS)]} [{i}]",
                "stream": True,
                "max_tokens": args.max_tokens,
                "temperature": 1.0,
                "seed": i,
                "stream_options": {"include_usage": True},
            }
            lat.append((await one_request(client, body))[0])
            if (i + 1) % every == 0 or i + 1 == n:
                await row(i + 1, lat)
                lat = []
    return rows


def main(argv=None) -> int:
    os.environ.setdefault("RWKVPY_BACKGROUND_COMPILE", "0")  # time the kernels, not a first run
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("-m", "--model", help="start a server for this model")
    g.add_argument("--url", help="a running server (loopback only), e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None, help="for --url: the server's key")
    p.add_argument("--levels", default="1,4,16", help="concurrent clients (default 1,4,16)")
    p.add_argument("--requests", type=int, default=48, help="most requests per level (48)")
    p.add_argument("--seconds", type=float, default=30, help="most seconds per level (30)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (64)")
    p.add_argument("--threads", type=int, default=None, help="server threads (started server)")
    p.add_argument("--max-batch", type=int, default=None, help="server --max-batch")
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="server --max-concurrent "
        "(started server; default twice the largest level): levels above it get 429s",
    )
    p.add_argument(
        "--sequential", type=int, default=0, help="then N requests one after the other (RSS)"
    )
    p.add_argument("--every", type=int, default=100, help="--sequential: a row every N (100)")
    p.add_argument("--cache-bytes", type=int, default=None, help="server --cache-bytes")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    args.levels = [int(x) for x in args.levels.split(",") if x.strip()]
    proc = log = None
    if args.url:
        host = urlparse(args.url).hostname or ""
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            p.error("--url must be a loopback address (127.0.0.1, ::1, localhost)")
        url = args.url.rstrip("/")
    else:
        proc, url, log = start_server(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        asyncio.run(
            run_level(
                url,
                headers,
                1,
                argparse.Namespace(  # warm-up, not reported
                    requests=2, seconds=30, max_tokens=8
                ),
            )
        )
        rows = [asyncio.run(run_level(url, headers, c, args)) for c in args.levels]
        seq = []
        if args.sequential:
            pid = proc.pid if proc is not None else None
            seq = asyncio.run(run_sequential(url, headers, args.sequential, args.every, args, pid))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            os.unlink(log)
    if args.json:
        out = {"url": url, "max_tokens": args.max_tokens, "levels": rows, "sequential": seq}
        print(json.dumps(out))
        return 0
    print(f"server {url}, {args.max_tokens} tokens per request (streaming completions)")
    print(
        f"{'clients':>7} {'requests':>8} {'req/s':>7} {'tok/s':>8} {'lat p50':>8} "
        f"{'lat p99':>8} {'ttft':>7} {'mean batch':>10}  refused"
    )
    for r in rows:
        ttft = f"{r['ttft_mean_s']:.3f}" if r["ttft_mean_s"] is not None else "-"
        print(
            f"{r['clients']:>7} {r['requests']:>8} {r['requests_per_s']:>7.2f} "
            f"{r['tokens_per_s']:>8.1f} {r['latency_p50_s']:>7.3f}s {r['latency_p99_s']:>7.3f}s "
            f"{ttft:>7} {r['mean_decode_batch']:>10.1f}  {r['refused'] or '-'}"
        )
        for m in r["error_messages"]:
            print(f"{'':>7} error: {m}")
    if seq:
        print(
            f"{'requests':>8} {'RSS MB':>8} {'cache entries':>13} {'cache MB':>8} {'lat mean':>8}"
        )
    for r in seq:
        rss = f"{r['rss_mb']:.1f}" if r["rss_mb"] is not None else "-"
        cmb = f"{r['cache_mb']:.1f}" if r["cache_mb"] is not None else "-"
        lat = f"{r['latency_mean_s']:.3f}s" if r["latency_mean_s"] is not None else "-"
        print(f"{r['requests']:>8} {rss:>8} {r['cache_entries']!s:>13} {cmb:>8} {lat:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
