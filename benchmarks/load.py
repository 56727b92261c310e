"""rwkvpy's decode speed beside busy processes, under OpenMP, numba and thread-count settings.

One OpenMP runtime runs the parallel regions of an rwkvpy process: torch's bundled libgomp,
loaded by ``import torch``; numba's 'omp' threading layer links the system libgomp but its
OpenMP calls bind to torch's copy (rwkvpy.runtime). libgomp reads OMP_WAIT_POLICY and
GOMP_SPINCOUNT once, as it is loaded, and its idle threads spin that long before they sleep.
This script measures what the settings, the thread count and rwkvpy's own policy
(rwkvpy.runtime: GOMP_SPINCOUNT=10000, fewer threads while other processes hold the cores)
do when other processes want the same cores.

Each measurement runs in a fresh Python process (so every setting applies from process start),
with the background load already running: ``--loads 0,1,2`` busy processes, each a ``while``
loop spinning on its own, started by this script and killed when the level ends, at exit, on
Ctrl-C or SIGTERM; each also ends itself at the hard time limit (``--time-limit``) or when
this script is gone. In each run: the model is loaded, ``--warmup`` untimed tokens, then
``--tokens`` one-token forward calls are timed (mean, median, p90 ms; the thread count of each;
CPU seconds per wall second), then one ``generate`` call (default sampling, seed 0) of
``--gen-tokens`` tokens gives tokens/s the way ``rwkvpy generate`` reports it. The cases
alternate within each repeat (so each sees the same machine), and each load level is visited
once per repeat. Each run also reports the cores other processes kept busy meanwhile
("others": a shared machine's own load); ``--nice -20`` (as root) runs everything in a session
of its own ahead of the machine's other processes.

Cases are CONFIG@THREADS, THREADS a count (``rwkvpy.load(threads=N)``: fixed) or ``auto``
(``threads=None``: rwkvpy's choice, governed). Configs (``--list`` prints them):

    default       nothing set: rwkvpy as a user runs it, with its own policy
    torch-first   ``import torch`` before ``import rwkvpy``: libgomp's own spin (300000); with
                  a fixed count, rwkvpy as it was before its policy
    libgomp       GOMP_SPINCOUNT=300000 (libgomp's default; a user's setting wins over rwkvpy's)
    passive       OMP_WAIT_POLICY=PASSIVE
    active        OMP_WAIT_POLICY=ACTIVE
    spinN         GOMP_SPINCOUNT=N (spin0, spin300, spin1k, spin10k, ...: any count, k = 1000)
    passive-late  OMP_WAIT_POLICY=PASSIVE set after ``import torch`` (reaches no running runtime)
    passive-torch OMP_WAIT_POLICY=PASSIVE at start, removed after ``import torch``
    workqueue     numba's 'workqueue' threading layer (its own pool; torch's libgomp stays)
    tbb           numba's 'tbb' layer (skipped where numba cannot load it)

Example (the model is synthesized once, random weights at v7 0.1B's shapes, Q4_0):

    python -m benchmarks.load --repeats 3
    python -m benchmarks.load --cases torch-first@2,default@auto,default@1 --loads 0,1 --json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The variables the configs control: removed from the workers' environment unless a config
#: sets them, so an outer shell's setting does not leak into every case.
CONTROLLED = (
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "OMP_NUM_THREADS",
    "NUMBA_THREADING_LAYER",
    "NUMBA_NUM_THREADS",
    "OMP_PROC_BIND",
    "OMP_PLACES",
    "GOMP_CPU_AFFINITY",
)

# name -> env: set at process start; late: set after ``import rwkvpy`` (torch loaded, numba's
# pool not started); unset: removed then; layer: numba's threading layer (None: rwkvpy's
# choice); torch_first: ``import torch`` before ``import rwkvpy`` (an API user's order)
SPIN = "300000"  # libgomp's default spin count (OMP_WAIT_POLICY unset)
CONFIGS = {
    "default": {},
    "torch-first": {"torch_first": True},
    "libgomp": {"env": {"GOMP_SPINCOUNT": SPIN}},
    "passive": {"env": {"OMP_WAIT_POLICY": "PASSIVE"}},
    "active": {"env": {"OMP_WAIT_POLICY": "ACTIVE"}},
    "spin0": {"env": {"GOMP_SPINCOUNT": "0"}},
    "spin1k": {"env": {"GOMP_SPINCOUNT": "1000"}},
    "spin10k": {"env": {"GOMP_SPINCOUNT": "10000"}},
    "spin100k": {"env": {"GOMP_SPINCOUNT": "100000"}},
    "passive-late": {
        "env": {"GOMP_SPINCOUNT": SPIN},
        "unset": ("GOMP_SPINCOUNT",),
        "late": {"OMP_WAIT_POLICY": "PASSIVE"},
    },
    "passive-torch": {"env": {"OMP_WAIT_POLICY": "PASSIVE"}, "unset": ("OMP_WAIT_POLICY",)},
    "workqueue": {"layer": "workqueue"},
    "tbb": {"layer": "tbb"},
}


def config(name: str) -> dict | None:
    """The config of a name: one of CONFIGS, or spinN / spinNk for any spin count N."""
    if name in CONFIGS:
        return CONFIGS[name]
    m = re.fullmatch(r"spin(\d+)(k?)", name)
    if m:
        return {"env": {"GOMP_SPINCOUNT": str(int(m.group(1)) * (1000 if m.group(2) else 1))}}
    return None


DEFAULT_CASES = "torch-first@2,default@auto,default@2,passive@2,default@1"

VOCAB = "rwkv_vocab_v20230424.txt"

BUSY = """
import os, sys, time
end, parent, n = time.monotonic() + float(sys.argv[1]), os.getppid(), 0
while True:
    n += 1
    if n % 1000000 == 0 and (time.monotonic() > end or os.getppid() != parent):
        break
"""


def have_tbb() -> bool:
    """Whether numba's tbb layer can load here (its pool module imports libtbb)."""
    code = "import numba.np.ufunc.tbbpool"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


# -- the worker: one measurement in this fresh process --------------------------------------
def worker(spec: dict) -> dict:
    cfg = config(spec["config"])
    t0 = time.perf_counter()
    if cfg.get("torch_first"):
        import torch  # noqa: F401
    import torch

    import rwkvpy  # imports torch (whose libgomp reads the environment as it loads)

    for k in cfg.get("unset", ()):
        os.environ.pop(k, None)
    os.environ.update(cfg.get("late", {}))
    from rwkvpy import bench
    from rwkvpy.generate import generate
    from rwkvpy.kernels.linear import threads as linear  # imports numba, sets its layer
    from rwkvpy.sampling import SamplingParams
    from rwkvpy.tokenizers import tokenizer_for

    if cfg.get("layer"):
        linear.numba.config.THREADING_LAYER = cfg["layer"]
    model = rwkvpy.load(spec["model"], threads=spec["threads"])  # None: rwkvpy's choice
    load_s = time.perf_counter() - t0
    try:
        used = linear.numba.threading_layer()
    except ValueError:  # no parallel launch yet (one thread)
        used = None
    ids = bench.random_ids(model, spec["warmup"] + spec["tokens"], seed=1)
    c0 = time.process_time()
    w0 = time.perf_counter()
    state, times, counts = None, [], []
    for i, tok in enumerate(ids):  # as bench.time_decode, noting the thread count of each step
        t = time.perf_counter()
        _, state = model.forward([tok], state)
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t)
            counts.append(torch.get_num_threads())
    cpu = time.process_time() - c0
    wall = time.perf_counter() - w0
    world = model.config.vocab_size == 65536
    tok = tokenizer_for(model.config.vocab_size, path=spec.get("vocab") if world else None)
    r = generate(
        model, tok, "The quick brown fox", SamplingParams(max_tokens=spec["gen_tokens"], seed=0)
    )
    ms = sorted(t * 1e3 for t in times)
    return {
        "mean_ms": statistics.fmean(ms),
        "median_ms": statistics.median(ms),
        "p90_ms": ms[min(len(ms) - 1, int(0.9 * len(ms)))],
        "max_ms": ms[-1],
        "cpu_per_wall": cpu / wall,
        "gen_tok_s": r.timings.tokens_per_second,
        "gen_tokens": r.completion_tokens,
        "load_s": load_s,
        "layer": used,
        "threads": statistics.fmean(counts),
        "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
    }


# -- the background load --------------------------------------------------------------------
def _session_priority(nice: int) -> None:
    """In a child just made the leader of a new session (so a new autogroup: Linux schedules
    sessions' groups against each other, a process's own nice only counts inside its group):
    give that group the priority ``nice``, or where that fails the process itself."""
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:
        os.setpriority(os.PRIO_PROCESS, 0, nice)


def priority() -> str:
    """This process's scheduling group and nice, as /proc/self/autogroup says."""
    try:
        with open("/proc/self/autogroup") as f:
            return f.read().strip()
    except OSError:
        return f"nice {os.getpriority(os.PRIO_PROCESS, 0)}"


def run_in_own_session(argv: list, nice: int) -> int:
    """Run this script again (with ``argv``) in a session of its own at priority ``nice``, and
    wait for it; Ctrl-C here stops it (SIGTERM: its busy processes and run end with it)."""
    cmd = [sys.executable, "-m", "benchmarks.load", *argv, "--in-session"]
    child = subprocess.Popen(
        cmd, cwd=ROOT, start_new_session=True, preexec_fn=lambda: _session_priority(nice)
    )
    try:
        return child.wait()
    except KeyboardInterrupt:
        child.terminate()
        return child.wait()


class Load:
    """n busy processes; each ends itself after ``limit_s`` or when this process is gone."""

    def __init__(self, n: int, limit_s: float):
        self.procs = [
            subprocess.Popen([sys.executable, "-c", BUSY, f"{max(1.0, limit_s):.0f}"])
            for _ in range(n)
        ]

    def cpu_s(self) -> float:
        """CPU seconds the busy processes have used so far."""
        total = 0.0
        for p in self.procs:
            try:
                with open(f"/proc/{p.pid}/stat") as f:
                    v = f.read().rsplit(")", 1)[1].split()
                total += (int(v[11]) + int(v[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, IndexError, ValueError):  # ended, or not Linux
                pass
        return total

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []


def run_case(model: str, case: str, args, timeout: float, load: Load | None = None) -> dict:
    name, threads = case.split("@")
    env = {k: v for k, v in os.environ.items() if k not in CONTROLLED}
    env.update(config(name).get("env", {}))
    env["PYTHONPATH"] = os.path.join(ROOT, "src") + os.pathsep + env.get("PYTHONPATH", "")
    spec = {
        "config": name,
        "threads": None if threads == "auto" else int(threads),
        "model": model,
        "tokens": args.tokens,
        "warmup": args.warmup,
        "gen_tokens": args.gen_tokens,
        "vocab": args.vocab,
    }
    cmd = [sys.executable, "-m", "benchmarks.load", "--worker", json.dumps(spec)]
    ru0, busy0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), cpu_busy_s(), time.monotonic()
    load0 = load.cpu_s() if load else 0.0
    p = subprocess.run(
        cmd,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=min(300.0, max(10.0, timeout)),
    )
    wall, busy = time.monotonic() - t0, cpu_busy_s() - busy0
    ours = load.cpu_s() - load0 if load else 0.0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise RuntimeError(f"{case}: worker failed:\n{p.stderr[-2000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    own = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
    # cores kept busy by anything but this worker and our busy processes: other users' work
    r["others"] = (busy - own - ours) / wall
    return r


def world_vocab() -> str | None:
    """A World vocabulary file for a 65536-token model's generate run: rwkvpy's, else the
    project's shared copy, else BlinkDL's ``rwkv`` package's (None: rwkvpy's default)."""
    from importlib.util import find_spec

    rwkv = find_spec("rwkv")
    for path in (
        os.path.join(ROOT, "src", "rwkvpy", "tokenizers", "data", VOCAB),
        os.path.join(ROOT, "..", "shared", "vocab", VOCAB),
        rwkv and rwkv.origin and os.path.join(os.path.dirname(rwkv.origin), VOCAB),
    ):
        if path and os.path.exists(path):
            return os.path.abspath(path)
    return None


def cpu_busy_s() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat; nan where absent)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:  # pragma: no cover - not Linux
        return float("nan")
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_quiet(load: Load | None, max_wait: float, threshold: float = 0.25) -> float:
    """Wait (at most ``max_wait`` s) until other processes than ours keep less than
    ``threshold`` cores busy over one second; return the last such measurement."""
    end = time.monotonic() + max_wait
    while True:
        b0, l0, t0 = cpu_busy_s(), load.cpu_s() if load else 0.0, time.monotonic()
        time.sleep(1.0)
        others = (cpu_busy_s() - b0 - ((load.cpu_s() - l0) if load else 0.0)) / (
            time.monotonic() - t0
        )
        if others < threshold or time.monotonic() > end:
            return others
        time.sleep(2.0)


def loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover
        return float("nan")


def model_path(args) -> str:
    if args.model:
        return args.model
    from rwkvpy.convert import convert
    from rwkvpy.synth import save_random_model

    os.makedirs(args.work_dir, exist_ok=True)
    dst = os.path.join(args.work_dir, f"{args.synth}-{args.type}.gguf")
    if not os.path.exists(dst):
        pth = os.path.join(args.work_dir, f"{args.synth}.pth")
        print(f"... synthesizing {args.synth} (random weights) into {dst}", file=sys.stderr)
        save_random_model(pth, args.synth)
        convert(pth, dst, type=args.type, progress=False, tokenizer="world")
        os.remove(pth)
    return dst


def summarize(runs: list, cases: list, loads: list) -> list:
    rows = []
    for case in cases:
        idle = None
        for n in loads:
            rs = [r for r in runs if r["case"] == case and r["load"] == n]
            if not rs:
                continue
            row = {
                "case": case,
                "load": n,
                "runs": len(rs),
                "loadavg": statistics.fmean(r["loadavg"] for r in rs),
                "others": statistics.fmean(r["others"] for r in rs),
            }
            for k in ("mean_ms", "median_ms", "p90_ms", "gen_tok_s", "cpu_per_wall", "threads"):
                v = [r[k] for r in rs]
                row[k] = statistics.median(v)
                row[k + "_range"] = (min(v), max(v))
            if n == 0:
                idle = row
            if idle is not None:
                row["mean_x_idle"] = row["mean_ms"] / idle["mean_ms"]
                row["gen_x_idle"] = idle["gen_tok_s"] / row["gen_tok_s"]
            rows.append(row)
    return rows


def format_table(rows: list) -> str:
    cols = (
        "case",
        "busy",
        "n",
        "mean ms",
        "(range)",
        "median",
        "p90",
        "x idle",
        "gen tok/s",
        "(range)",
        "x idle",
        "thr",
        "cpu",
        "others",
    )
    lines = []
    for r in rows:
        lo, hi = r["mean_ms_range"]
        glo, ghi = r["gen_tok_s_range"]
        lines.append(
            (
                r["case"],
                str(r["load"]),
                str(r["runs"]),
                f"{r['mean_ms']:.1f}",
                f"{lo:.1f}-{hi:.1f}",
                f"{r['median_ms']:.1f}",
                f"{r['p90_ms']:.1f}",
                f"{r.get('mean_x_idle', float('nan')):.2f}",
                f"{r['gen_tok_s']:.0f}",
                f"{glo:.0f}-{ghi:.0f}",
                f"{r.get('gen_x_idle', float('nan')):.2f}",
                f"{r['threads']:.2f}",
                f"{r['cpu_per_wall']:.2f}",
                f"{r['others']:.2f}",
            )
        )
    width = [
        max(len(c), *(len(x[i]) for x in lines)) if lines else len(c) for i, c in enumerate(cols)
    ]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(width))
    out = [fmt.format(*cols), "-" * (sum(width) + 2 * (len(width) - 1))]
    out += [fmt.format(*x) for x in lines]
    out.append(
        "ms per decode token (median over runs; the mean's range); x idle: against the "
        "same case with no busy process (mean ms; generate: idle tok/s / tok/s); thr: "
        "torch's thread count over the timed steps (mean); cpu: "
        "CPU seconds per wall second while decoding; others: cores kept busy by other "
        "processes than the run and its busy ones (mean over the runs; above ~0.2 the "
        "machine was shared)"
    )
    return "\n".join(out)


def main(argv=None) -> int:
    os.environ.setdefault("RWKVPY_BACKGROUND_COMPILE", "0")  # time the kernels, not a first run
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.load",
        description=__doc__.split("\n\n")[0],
        epilog="See the module docstring for the configs.",
    )
    p.add_argument(
        "--model", default=None, help="model file or 'demo' (default: a synthesized --synth model)"
    )
    p.add_argument("--synth", default="v7-0.1b", help="rwkvpy.synth preset (default v7-0.1b)")
    p.add_argument("--type", default="q4_0", help="its matrices' type (default q4_0)")
    p.add_argument(
        "--work-dir",
        default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "rwkvpy-load-bench"),
        help="where the synthesized model is kept",
    )
    p.add_argument(
        "--vocab",
        default=None,
        help="World vocabulary file for the generate runs (default: found here)",
    )
    p.add_argument(
        "--cases", default=DEFAULT_CASES, help=f"CONFIG@THREADS,... (default {DEFAULT_CASES})"
    )
    p.add_argument("--loads", default="0,1,2", help="busy processes per level (default 0,1,2)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each case per level")
    p.add_argument("--tokens", type=int, default=60, help="timed decode tokens (default 60)")
    p.add_argument("--warmup", type=int, default=10, help="untimed tokens first (default 10)")
    p.add_argument("--gen-tokens", type=int, default=60, help="generated tokens (default 60)")
    p.add_argument(
        "--time-limit",
        type=float,
        default=900,
        help="hard limit in seconds: no run starts after it, busy processes end at "
        "it (default 900)",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="S",
        help="before each run wait up to S seconds for other processes to leave "
        "the cores (below 0.25 cores busy over a second; default 0: no wait)",
    )
    p.add_argument(
        "--nice",
        type=int,
        default=None,
        help="run this script, its runs and its busy processes in a session of its "
        "own at this priority (e.g. -20, as root: on a machine others use, "
        "their processes then hardly take the cores from the measured ones; "
        "they wait meanwhile, so keep such runs short)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (every run)")
    p.add_argument("--list", action="store_true", help="list the configs and exit")
    p.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    p.add_argument("--in-session", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.list:
        for name, cfg in CONFIGS.items():
            print(f"{name:14s} {cfg}")
        return 0

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in cases:
        name, _, t = c.partition("@")
        if config(name) is None or not (t.isdigit() or t == "auto"):
            p.error(
                f"bad case {c!r}: CONFIG@THREADS (a count or 'auto') with CONFIG one of "
                f"{', '.join(CONFIGS)}"
            )
    if any(c.startswith("tbb@") for c in cases) and not have_tbb():
        print("... numba's tbb layer cannot load here: tbb cases skipped", file=sys.stderr)
        cases = [c for c in cases if not c.startswith("tbb@")]
    loads = [int(x) for x in args.loads.split(",")]
    deadline = time.monotonic() + args.time_limit

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)

    if args.nice is not None and not args.in_session:
        return run_in_own_session(sys.argv[1:] if argv is None else list(argv), args.nice)
    prio = priority()
    model = model_path(args)
    if args.vocab is None:
        args.vocab = world_vocab()
    print(f"... warm-up run (numba and repack caches) on {model}", file=sys.stderr)
    run_case(model, cases[0], args, deadline - time.monotonic())
    runs, load = [], None
    try:
        for rep in range(args.repeats):
            for n in loads:
                if time.monotonic() > deadline:
                    raise TimeoutError
                load = Load(n, deadline - time.monotonic() + 5)
                time.sleep(0.5 if n else 0)
                order = cases[rep % len(cases) :] + cases[: rep % len(cases)]
                for case in order:
                    if time.monotonic() > deadline:
                        raise TimeoutError
                    if args.wait_quiet > 0:
                        wait_quiet(load, min(args.wait_quiet, deadline - time.monotonic()))
                    la = loadavg()
                    r = run_case(model, case, args, deadline - time.monotonic(), load)
                    r.update(case=case, load=n, repeat=rep, loadavg=la)
                    runs.append(r)
                    print(
                        f"... rep {rep} busy {n} {case:16s} mean {r['mean_ms']:7.2f} ms "
                        f"p90 {r['p90_ms']:7.2f} gen {r['gen_tok_s']:7.1f} tok/s "
                        f"others {r['others']:.2f} load1 {la:.2f}",
                        file=sys.stderr,
                    )
                load.stop()
    except (TimeoutError, subprocess.TimeoutExpired):
        print("... time limit reached: partial results", file=sys.stderr)
    except KeyboardInterrupt:
        print("... interrupted: partial results", file=sys.stderr)
    finally:
        if load is not None:
            load.stop()
    rows = summarize(runs, cases, loads)
    meta = {
        "model": model,
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "priority": prio,
        "tokens": args.tokens,
        "gen_tokens": args.gen_tokens,
        "repeats": args.repeats,
    }
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows, "runs": runs}))
    else:
        print(
            f"model {model}, {meta['cpus']} CPUs, {meta['date']}, {args.tokens} tokens "
            f"timed, {args.gen_tokens} generated, priority: {prio}"
        )
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
