"""A storm of streams against ``rwkvpy serve`` (issue 23, docs/reliability.md): N concurrent
streaming completions, half of whose clients hang up after a few events of an endless request
while the other half read to the end. Reports how long until every slot is free again, whether
the server answers afterwards, and its RSS before and after.

    python -m benchmarks.disconnect_storm --clients 64
    python -m benchmarks.disconnect_storm --clients 64 --rounds 3 --json

Starts its own server (``-m MODEL``, default the demo model; killed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx


def rss_mb(pid) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def storm(url: str, clients: int, hang_up_after: int = 3, full_tokens: int = 16) -> dict:
    """``clients`` concurrent streaming completions: the even ones hang up after
    ``hang_up_after`` events of an endless request, the odd ones read ``full_tokens`` tokens to
    the end. Returns {"done": [(client, events, last data line)], "errors": [...]}."""
    done, errors = [], []

    def run(i):
        try:
            with httpx.Client(base_url=url, timeout=300) as http:
                body = {
                    "prompt": f"Client {i} says",
                    "stream": True,
                    "seed": i,
                    "max_tokens": 100000 if i % 2 == 0 else full_tokens,
                }
                with http.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        errors.append((i, r.status_code, r.read()))
                        return
                    n, last = 0, None
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            n, last = n + 1, line
                            if i % 2 == 0 and n >= hang_up_after:
                                return  # the with blocks close the connection mid-stream
                    done.append((i, n, last))
        except Exception as e:  # noqa: BLE001 - reported
            errors.append((i, type(e).__name__, str(e)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return {"done": done, "errors": errors}


def wait_free(http, timeout=60.0) -> float:
    """Seconds until the server reports no slot in use."""
    t0 = time.monotonic()
    while http.get("/v1/stats").json()["slots_used"]:
        if time.monotonic() - t0 > timeout:
            break
        time.sleep(0.02)
    return time.monotonic() - t0


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.disconnect_storm", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("-m", "--model", default="demo")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    fd, log = tempfile.mkstemp(suffix=".log")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rwkvpy.server",
            "-m",
            a.model,
            "--port",
            "0",
            "--no-access-log",
            "--max-concurrent",
            str(2 * a.clients),
            "--max-tokens-limit",
            "100000",
        ],
        stdout=fd,
        stderr=subprocess.STDOUT,
    )
    os.close(fd)
    rows = []
    try:
        url, deadline = None, time.monotonic() + 120
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            m = re.search(r"listening on (http://[0-9.]+:\d+)", open(log).read())
            url = m.group(1) if m else None
            time.sleep(0.1)
        if url is None:
            sys.exit(f"the server did not start:\n{open(log).read()}")
        with httpx.Client(base_url=url, timeout=120) as http:
            while True:
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            for _ in range(3):
                http.post("/v1/completions", json={"prompt": "Warm up", "max_tokens": 16})
            base = rss_mb(proc.pid)
            for r in range(a.rounds):
                t0 = time.monotonic()
                out = storm(url, a.clients)
                storm_s = time.monotonic() - t0
                free_s = wait_free(http)
                after = http.post(
                    "/v1/completions", json={"prompt": "Still there?", "max_tokens": 4}
                )
                rows.append(
                    {
                        "round": r + 1,
                        "clients": a.clients,
                        "finished": len(out["done"]),
                        "ended_with_done": sum(
                            last == "data: [DONE]" for _, _, last in out["done"]
                        ),
                        "errors": len(out["errors"]),
                        "storm_s": round(storm_s, 2),
                        "slots_free_after_s": round(free_s, 2),
                        "answers_after": after.status_code == 200,
                        "rss_before_mb": round(base, 1),
                        "rss_after_mb": round(rss_mb(proc.pid), 1),
                    }
                )
                if not a.json:
                    print(rows[-1], flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        os.unlink(log)
    if a.json:
        print(json.dumps(rows))
    return 0 if all(r["errors"] == 0 and r["answers_after"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
