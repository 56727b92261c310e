"""The measured figures of rwkvpy in one generated file: ``benchmarks/RESULTS.md``.

    python -m benchmarks.results run [--types q4_0 q8_0 f16] [--threads 1 2] [--models DIR]
    python -m benchmarks.results render

``run`` measures this machine: ``rwkvpy bench --json`` (per-token median, mean and p90, decode
and prompt tokens/s, load time, peak memory, the bandwidth bound measured in the same run and
the kernels that ran) on the shipped demo model and on a random-weight v7 0.1B (768 x 12,
World vocabulary; ``rwkvpy.synth``) in each ``--types`` format, at each ``--threads`` count,
each in a fresh process (``auto``: rwkvpy's default, the thread governor). It writes one JSON file into ``benchmarks/results/``, named by date
and host, with the machine (CPU model, rwkvpy's CPU level, cores, memory), the versions and
the load average around the run: a run on a busy machine says so.

``render`` turns every JSON file there into ``benchmarks/RESULTS.md``, newest first. The docs
point there for figures instead of carrying them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")
RESULTS_MD = os.path.join(HERE, "RESULTS.md")


def machine() -> dict:
    """What ran the benchmarks: CPU model, rwkvpy's CPU level, cores, memory, versions."""
    import numba
    import torch

    import rwkvpy
    from rwkvpy.kernels.cpu import host_level

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "cpu": cpu,
        "cpu_level": host_level(),
        "cpus": os.cpu_count(),
        "memory_gib": round(mem, 1) if mem else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "rwkvpy": getattr(rwkvpy, "__version__", "?"),
        "os": platform.platform(),
    }


def _models(folder: str, types) -> list:
    from rwkvpy.convert import convert
    from rwkvpy.synth import save_random_model

    os.makedirs(folder, exist_ok=True)
    pth = os.path.join(folder, "v7-0.1b.pth")
    out = [("demo", "demo")]
    for t in types:
        dst = os.path.join(folder, f"v7-0.1b-{t}.gguf")
        if not os.path.exists(dst):
            if not os.path.exists(pth):
                import torch

                save_random_model(pth, "v7-0.1b", dtype=torch.float16)
            convert(pth, dst, type=t, progress=False)
        out.append((f"v7 0.1B {t.upper()}", dst))
    return out


def _bench(model: str, threads: str, tokens: int, prompt: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "rwkvpy",
        "bench",
        "-m",
        model,
        "--json",
        "--quiet",
        "--tokens",
        str(tokens),
        "--prompt",
        str(prompt),
    ]
    if threads != "auto":  # auto: rwkvpy's default (the thread governor)
        cmd += ["--threads", threads]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {p.stderr.strip()[-400:]}")
    return json.loads(p.stdout)


def _in_child(call: str) -> object:
    """``call`` (an expression over this module) evaluated in a fresh interpreter: the process
    that runs the benchmarks stays small, since a child's peak memory starts from its parent's."""
    code = (
        f"import json, sys; sys.path.insert(0, {os.path.dirname(HERE)!r}); "
        f"import benchmarks.results as r; print(json.dumps({call}))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{call} failed: {p.stderr.strip()[-400:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run(args) -> str:
    folder = args.models or os.path.join(tempfile.gettempdir(), "rwkvpy-results-models")
    models = _in_child(f"r._models({folder!r}, {list(args.types)!r})")
    start = os.getloadavg()[0]
    rows = []
    for name, path in models:
        for threads in args.threads:
            r = _bench(path, threads, args.tokens, args.prompt)
            r["name"] = name
            r["threads_asked"] = threads
            rows.append(r)
            if not args.quiet:
                print(
                    f"{name} @ {threads} threads: {r['per_token_ms']:.2f} ms/token median, "
                    f"{r['per_token_mean_ms']:.2f} mean",
                    file=sys.stderr,
                )
    now = datetime.datetime.now(datetime.timezone.utc)
    doc = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "host": socket.gethostname(),
        "machine": _in_child("r.machine()"),
        "load_avg_start": start,
        "load_avg_end": os.getloadavg()[0],
        "note": args.note,
        "bench": rows,
    }
    os.makedirs(RESULTS_DIR, exist_ok=True)
    out = os.path.join(RESULTS_DIR, f"{now:%Y%m%d-%H%M}-{doc['host']}.json")
    tmp = out + ".partial"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, out)
    return out


def _section(doc: dict) -> list:
    m = doc["machine"]
    lines = [
        f"## {doc['date']}: {m['cpu']}, {m['cpus']} CPUs",
        "",
        f"CPU level `{m['cpu_level']}`, {m['memory_gib']} GiB; Python {m['python']}, "
        f"torch {m['torch']}, numba {m['numba']}, rwkvpy {m['rwkvpy']}. Load average "
        f"{doc['load_avg_start']:.1f} at the start, {doc['load_avg_end']:.1f} at the end "
        f"(on {m['cpus']} CPUs).",
        "",
    ]
    if doc.get("note"):
        lines += [doc["note"], ""]
    lines += [
        "| model | threads | ms/token median | mean | p90 | decode tok/s | prompt tok/s "
        "| bound ms | load s | peak MB | kernels |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["bench"]:
        k = r.get("kernels", {})
        kern = ", ".join(f"{t} {v}" for t, v in sorted(k.get("products", {}).items()))
        lines.append(
            f"| {r['name']} | {r.get('threads_asked', r['threads'])} | {r['per_token_ms']:.2f} | "
            f"{r['per_token_mean_ms']:.2f} | {r['per_token_p90_ms']:.2f} | "
            f"{r['decode_tokens_per_s']:.0f} | {r['prompt_tokens_per_s']:.0f} | "
            f"{r.get('bound_ms', float('nan')):.2f} | {r['load_s']:.2f} | "
            f"{r['peak_rss_mb']:.0f} | {kern}; {k.get('step', '')} |"
        )
    return lines + [""]


def render() -> str:
    docs = []
    for name in sorted(os.listdir(RESULTS_DIR)) if os.path.isdir(RESULTS_DIR) else []:
        if name.endswith(".json"):
            with open(os.path.join(RESULTS_DIR, name)) as f:
                docs.append(json.load(f))
    docs.sort(key=lambda d: d["date"], reverse=True)
    lines = [
        "# Results",
        "",
        "Generated by `python -m benchmarks.results render` from the JSON files in "
        "`benchmarks/results/` (written by `python -m benchmarks.results run`); do not edit "
        "by hand. Each section is one run on one machine: the date, the machine, the load "
        "around it. `rwkvpy bench`: per-token decode time (median, mean, p90 over the "
        "timed tokens), tokens/s over the whole decode and for a prompt, the bandwidth "
        "bound (the model's bytes per token over the memory bandwidth measured in the same "
        "run), load time and peak memory.",
        "",
    ]
    for d in docs:
        lines += _section(d)
    tmp = RESULTS_MD + ".partial"
    with open(tmp, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    os.replace(tmp, RESULTS_MD)
    return RESULTS_MD


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="measure this machine into benchmarks/results/")
    r.add_argument("--types", nargs="*", default=["q4_0", "q5_1", "q8_0", "q4_k_m", "f16"])
    r.add_argument(
        "--threads",
        nargs="*",
        default=["auto", "1", "2"],
        help="thread counts; auto: rwkvpy's default (default: auto 1 2)",
    )
    r.add_argument("--tokens", type=int, default=64)
    r.add_argument("--prompt", type=int, default=256)
    r.add_argument("--models", default=None, help="folder of the random v7 0.1B files (kept)")
    r.add_argument("--note", default="", help="a line to print with the run (e.g. the load)")
    r.add_argument("--quiet", action="store_true")
    sub.add_parser("render", help="write benchmarks/RESULTS.md from benchmarks/results/")
    args = p.parse_args(argv)
    if args.cmd == "run":
        print(run(args))
    print(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
