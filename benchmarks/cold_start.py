"""Cold start: how long a first run takes with an empty numba cache, and where the time goes.

Each measurement is a fresh process with its own empty cache folders (``XDG_CACHE_HOME`` and
``NUMBA_CACHE_DIR`` in a temporary folder), run twice: cold (compiling), then warm (the same
command again, kernels from the cache).

    python benchmarks/cold_start.py [--models DIR] [--types q5_1 q4_0 f16] [--python PY]
        [--kernels] [--json]

Rows: ``python -c "import rwkvpy"``; ``rwkvpy generate -m demo "Hello" --max-tokens 8``; and
``rwkvpy generate`` on a random-weight v7 0.1B (768 x 12, vocab 65536: rwkvpy.synth's
preset) in rwkv.cpp's format per ``--types``, written to ``--models`` (kept) or a temporary
folder. Per row: wall seconds to the first generated token (the first byte on stdout) and to
the end, the child's CPU seconds, and the kernels compiled. ``--kernels`` adds, per model, the
kernels numba compiled in an in-process run (numba's compile events): seconds each, exclusive of
the kernels compiled inside it (CPU seconds of the compiling thread, which a busy machine
changes less than wall time), and how many versions (signatures). ``--python``: the
interpreter to measure (e.g. a fresh venv's). The 1-minute load average is printed before and
after: on a busy machine wall times are long and CPU seconds are the better measure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

PROMPT = "Hello"
#: rwkvpy.coldstart's switch (0: no second process)
BACKGROUND = "RWKVPY_BACKGROUND_COMPILE"

# an in-process run that lists numba's compiles (for --kernels)
PROBE = textwrap.dedent("""
    import json, sys, time
    from numba.core import event
    stack, rows = [], []
    class L(event.Listener):
        def on_start(self, e):
            f = e.data["dispatcher"].py_func
            stack.append([f.__module__ + "." + f.__qualname__, time.thread_time(), 0.0])
        def on_end(self, e):
            name, t, inner = stack.pop()
            d = time.thread_time() - t
            if stack:
                stack[-1][2] += d
            rows.append((name, d - inner, not stack))
    event.register("numba:compile", L())
    import rwkvpy
    t0 = time.perf_counter()
    m = rwkvpy.load(sys.argv[1], threads=2)
    t1 = time.perf_counter()
    logits, state = m.forward([m.config.vocab_size // 2, 1, 2, 3])
    t2 = time.perf_counter()
    logits, state = m.forward([4], state)
    t3 = time.perf_counter()
    print(json.dumps({"load": t1 - t0, "prompt": t2 - t1, "first_step": t3 - t2, "rows": rows}))
""")


def _env(cache: str, background: bool = True) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RWKVPY_CACHE_DIR", BACKGROUND)}
    env["XDG_CACHE_HOME"] = cache
    env["NUMBA_CACHE_DIR"] = os.path.join(cache, "rwkvpy", "numba")
    if not background:
        env[BACKGROUND] = "0"
    return env


def _wait_background(cache: str, t0: float, limit: float = 600.0) -> dict | None:
    """Wait for the second process of a first run (rwkvpy.coldstart) to end, as a model found
    it running would; its record (rwkvpy.warm: kernels, seconds, CPU seconds) and when it ended
    (seconds after ``t0``), or None if none ran."""
    from rwkvpy.coldstart import RUNNING, Background

    folder = os.path.join(cache, "rwkvpy", "numba", "warm")
    locks = sorted(
        n for n in (os.listdir(folder) if os.path.isdir(folder) else []) if n.endswith(".lock")
    )
    for name in (n for n in locks if n != RUNNING):
        done = os.path.join(folder, name[: -len(".lock")] + ".done")
        if not Background(done, os.path.join(folder, name), None).wait(limit):
            raise RuntimeError("the second process did not end")
        if os.path.exists(done):
            with open(done) as f:
                record = json.load(f)
            record["ended_s"] = os.path.getmtime(done) - t0
            return record
        return {"failed": True}
    return None


def _timed(cmd: list, env: dict) -> dict:
    """Wall seconds to the first stdout byte and to the end, and the child's CPU seconds."""
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = None
    out = b""
    while True:
        b = p.stdout.read(1)
        if not b:
            break
        if first is None:
            first = time.perf_counter() - t0
        out += b
    err = p.stderr.read()
    p.wait()
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode:
        raise RuntimeError(f"{cmd} failed: {err.decode(errors='replace')}")
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {
        "first_token_s": first,
        "wall_s": wall,
        "cpu_s": cpu,
        "notice": b"compiling kernels" in err,
    }


def _kernels(cache: str) -> int:
    folder = os.path.join(cache, "rwkvpy", "numba")
    return sum(name.endswith(".nbc") for _, _, names in os.walk(folder) for name in names)


def measure(name: str, cmd: list, one_process: bool = False) -> dict:
    """Cold (empty caches; the second process of a first run waited for), then warm. With
    ``one_process``, also cold with no second process (``RWKVPY_BACKGROUND_COMPILE=0``: every
    kernel compiled before the first token)."""
    row: dict = {"name": name}
    if one_process:
        cache = tempfile.mkdtemp(prefix="rwkvpy-cold-")
        try:
            row["cold_one_process"] = _timed(cmd, _env(cache, background=False))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    cache = tempfile.mkdtemp(prefix="rwkvpy-cold-")
    try:
        env = _env(cache)
        t0 = time.time()
        row["cold"] = _timed(cmd, env)
        row["background"] = _wait_background(cache, t0)
        row["kernels"] = _kernels(cache)
        row["warm"] = _timed(cmd, env)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return row


def probe(py: str, path: str) -> dict:
    cache = tempfile.mkdtemp(prefix="rwkvpy-cold-")
    try:
        p = subprocess.run(
            [py, "-c", PROBE, path],
            env=_env(cache, background=False),
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def models(folder: str, types) -> list:
    from rwkvpy.convert import convert
    from rwkvpy.synth import save_random_model

    pth = os.path.join(folder, "v7-0.1b.pth")
    out = []
    for t in types:
        dst = os.path.join(folder, f"v7-0.1b-{t}.bin")
        if not os.path.exists(dst):
            if not os.path.exists(pth):
                import torch

                save_random_model(pth, "v7-0.1b", dtype=torch.float16)
            convert(pth, dst, type=t, progress=False)
        out.append((t, dst))
    return out


def _gen(py: str, model: str, threads: str = "auto") -> list:
    return [
        py,
        "-m",
        "rwkvpy",
        "generate",
        "-m",
        model,
        PROMPT,
        "--max-tokens",
        "8",
        "--seed",
        "1",
    ] + ([] if threads == "auto" else ["--threads", threads])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help="folder of the random v7 0.1B files (kept)")
    p.add_argument("--types", nargs="*", default=["q5_1", "q4_0", "f16"])
    p.add_argument("--python", default=sys.executable, help="interpreter to measure")
    p.add_argument("--kernels", action="store_true", help="list the compiled kernels per model")
    p.add_argument("--threads", default="auto", help="generate's --threads (default: its own)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    py = args.python
    load0 = os.getloadavg()[0]
    rows = [
        measure("import rwkvpy", [py, "-c", "import rwkvpy"]),
        measure("generate demo", _gen(py, "demo", args.threads), True),
    ]
    tmp = None if args.models else tempfile.mkdtemp(prefix="rwkvpy-models-")
    try:
        for t, path in models(args.models or tmp, args.types):
            row = measure(f"generate v7-0.1b {t}", _gen(py, path, args.threads), True)
            if args.kernels:
                row["probe"] = probe(py, path)
            rows.append(row)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    load1 = os.getloadavg()[0]
    if args.json:
        print(json.dumps({"load_before": load0, "load_after": load1, "rows": rows}))
        return 0
    print(f"load average (1 min): {load0:.2f} before, {load1:.2f} after; {os.cpu_count()} CPUs")
    print(
        "seconds (wall to the first token / to the end, CPU); 'one process': no second process\n"
        f"{'':24s} {'one process':>16s} {'cold':>16s} {'cpu':>6s} {'2nd process: end':>17s} "
        f"{'cpu':>6s} {'kernels':>8s} {'warm':>12s} {'cpu':>6s}"
    )

    def ft(d):
        if not d:
            return "-"
        first = "-" if d["first_token_s"] is None else f"{d['first_token_s']:.1f}"
        return f"{first} / {d['wall_s']:.1f}"

    for r in rows:
        c, w, b = r["cold"], r["warm"], r.get("background") or {}
        bg = "failed" if b.get("failed") else (f"{b['ended_s']:.1f}" if b else "-")
        print(
            f"{r['name']:24s} {ft(r.get('cold_one_process')):>16s} {ft(c):>16s} "
            f"{c['cpu_s']:6.1f} {bg:>17s} {b.get('cpu_seconds', 0.0):6.1f} {r['kernels']:8d} "
            f"{ft(w):>12s} {w['cpu_s']:6.1f}"
        )
    for r in rows:
        if "probe" not in r:
            continue
        pr = r["probe"]
        print(
            f"\n{r['name']}: load {pr['load']:.1f} s, prompt {pr['prompt']:.1f} s, first step "
            f"{pr['first_step']:.1f} s (wall); compiled (CPU seconds exclusive of inner "
            "compiles):"
        )
        agg: dict = {}
        for name, ex, _top in pr["rows"]:
            a = agg.setdefault(name, [0, 0.0])
            a[0] += 1
            a[1] += ex
        for name, (n, ex) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
            if ex >= 0.1:
                print(f"  {ex:6.2f} s  x{n}  {name}")
        print(f"  total {sum(a[1] for a in agg.values()):.1f} s over {len(pr['rows'])} compiles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
