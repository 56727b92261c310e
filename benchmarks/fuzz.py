"""Fuzz rwkvpy's readers (issue 23, docs/reliability.md): every input must end as a typed
``rwkvpy.errors`` exception or a successful load (and a forward, an encode...), never another
exception, a crash, a hang or memory out of proportion to the input.

    python -m benchmarks.fuzz TARGET --minutes N     # coverage-guided (atheris), one target
    python -m benchmarks.fuzz all --seeded 40        # 40 seeded mutants per target (the CI tier)
    python -m benchmarks.fuzz all --replay           # the corpus and every kept regression

Targets: see benchmarks/fuzz_targets.py (gguf, bin, pth, safetensors, hf-config, state, chat,
lora, world-vocab, tokenizer-json, gguf-vocab). With ``--minutes``, atheris drives the target
when it is installed (rwkvpy's Python modules instrumented for coverage, numba's kernels not:
numba compiles them from their bytecode), its mutations mixed with the target's structure-aware
ones; without atheris, seeded mutants run for that long instead.

Limits in the fuzzing process: the address space (``RLIMIT_AS``) at what the process had after
loading the context plus ``--memory-mb``; each input's peak RSS growth at most 256 MB plus 32
times its size; each input's time at most ``--timeout`` seconds, numba's compile time not
counted (a hard limit of ``--hard-timeout`` writes the input and ends the process). An input
that breaks a rule is a finding: its first input per (exception, place) is written to
``--findings`` (default /tmp/rwkvpy-fuzz-findings/TARGET) and fuzzing goes on. The summary
(inputs, typed, loaded, findings) is printed at the end, as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import sys
import threading
import time
import traceback
from pathlib import Path

from benchmarks import fuzz_targets as ft

NUMBA_MODULES_DIRS = ("kernels", "quant")  # rwkvpy's subpackages of numba kernels
NUMBA_MODULES = ("rwkvpy.tokenizers._world_kernels", "rwkvpy.runtime", "rwkvpy.compiling")


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Finding(Exception):
    """An input that broke a rule other than by raising (too slow, too much memory)."""


class Runner:
    def __init__(self, name: str, args):
        self.name, self.args = name, args
        self.target = ft.TARGETS[name]
        self.counts = {"inputs": 0, "typed": 0, "loaded": 0, "other": 0}
        self.seconds = 0.0
        self.regressions = None  # {"inputs", "other"} of the replayed regressions
        self.findings: dict = {}  # signature -> {"error", "input", "count"}
        self.findings_dir = Path(args.findings or f"/tmp/rwkvpy-fuzz-findings/{name}")
        self.ctx = None
        self.current = b""
        self.started = None  # (monotonic, compile seconds) of the input running

    def setup(self, ctx):
        self.ctx = ctx

    def _signature(self, e: BaseException) -> str:
        tb = traceback.extract_tb(e.__traceback__)
        ours = [f for f in tb if "rwkvpy" in f.filename and "benchmarks" not in f.filename]
        where = ours[-1] if ours else (tb[-1] if tb else None)
        place = f"{os.path.basename(where.filename)}:{where.lineno}" if where else "?"
        return f"{type(e).__name__} at {place}"

    def run_one(self, data: bytes) -> str:
        from rwkvpy import compiling
        from rwkvpy.errors import RwkvpyError

        self.current = data
        self.ctx.n += 1
        self.counts["inputs"] += 1
        rss0 = _rss_peak()
        t0, c0 = time.monotonic(), compiling.thread_seconds()
        self.started = (t0, c0)
        error = None
        try:
            self.target.run(data, self.ctx)
        except RwkvpyError:
            outcome = "typed"
        except BaseException as e:  # noqa: BLE001 - a finding
            if isinstance(e, KeyboardInterrupt):
                raise
            outcome, error = "other", e
        else:
            outcome = "loaded"
        finally:
            self.started = None
        wall = time.monotonic() - t0
        self.seconds += wall
        spent = wall - (compiling.thread_seconds() - c0)
        if error is None and spent > self.args.timeout:
            outcome, error = "other", Finding(f"slow: {spent:.1f} s (limit {self.args.timeout})")
        grew = _rss_peak() - rss0
        if error is None and grew > (256 << 20) + 32 * len(data):
            outcome, error = (
                "other",
                Finding(f"memory: peak RSS grew {grew >> 20} MB for a {len(data)}-byte input"),
            )
        self.counts[outcome] += 1
        if error is not None:
            self._record(error, data)
        return outcome

    def _record(self, e: BaseException, data: bytes):
        sig = self._signature(e) if not isinstance(e, Finding) else str(e).split(":")[0]
        f = self.findings.setdefault(
            sig, {"error": f"{type(e).__name__}: {str(e)[:300]}", "count": 0}
        )
        f["count"] += 1
        if "input" not in f:
            self.findings_dir.mkdir(parents=True, exist_ok=True)
            p = self.findings_dir / f"{hashlib.sha1(data).hexdigest()[:12]}"
            p.write_bytes(data)
            f["input"] = str(p)
            if not self.args.json:
                print(f"[{self.name}] finding: {sig}: {f['error'][:200]} -> {p}", flush=True)

    def summary(self) -> dict:
        return {
            "target": self.name,
            **self.counts,
            "seconds": round(self.seconds, 2),
            "regressions": self.regressions,
            "findings": [{"signature": k, **v} for k, v in self.findings.items()],
        }


DEADLINE = [None]  # (monotonic time, summary printer) at which a timed run ends


def _watchdog(runners, hard):
    """Ends the process when one input runs past ``hard`` seconds: a hang (the input is
    written first); and a timed run at its deadline, whatever the fuzzer is doing."""

    def watch():
        while True:
            time.sleep(1)
            if DEADLINE[0] is not None and time.monotonic() > DEADLINE[0][0]:
                DEADLINE[0][1]()
                os._exit(0)
            for r in runners:
                s = r.started
                if s is not None and time.monotonic() - s[0] > hard:
                    r.findings_dir.mkdir(parents=True, exist_ok=True)
                    p = r.findings_dir / f"hang-{hashlib.sha1(r.current).hexdigest()[:12]}"
                    p.write_bytes(r.current)
                    print(f"[{r.name}] HANG: an input ran over {hard} s -> {p}", flush=True)
                    os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def _limit_memory(mb: int):
    if mb > 0:
        limit = _vm_bytes() + (mb << 20)
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _warm(runners):
    """Each seed run once before limits are set and counting begins (kernels compiled, caches
    filled): a finding in a seed is still reported."""
    for r in runners:
        for p in ft.seeds(r.name):
            r.run_one(p.read_bytes())


def seeded(runners, n: int, seed: int, seconds: float | None = None):
    for r in runners:
        rng = random.Random(f"{seed}:{r.name}")
        pool = [p.read_bytes() for p in ft.seeds(r.name)]
        t0 = time.monotonic()
        i = 0
        while (i < n) if seconds is None else (time.monotonic() - t0 < seconds):
            r.run_one(r.target.mutate(rng.choice(pool), rng))
            i += 1


def replay(runners):
    for r in runners:
        for p in ft.seeds(r.name) + ft.regressions(r.name):
            r.run_one(p.read_bytes())


def coverage_guided(runner, minutes: float, seed: int):
    import atheris

    deadline = time.monotonic() + minutes * 60
    rng = random.Random(seed)

    def mutate(data, max_size, s):
        rng.seed(s)
        if rng.random() < 0.5:
            out = atheris.Mutate(data, max_size)
        else:
            out = runner.target.mutate(data, rng)
        return out[:max_size]

    def finish():
        _print([runner.summary()], runner.args.json)

    DEADLINE[0] = (deadline, finish)

    def test_one(data):
        runner.run_one(bytes(data))
        if time.monotonic() > deadline:
            finish()
            os._exit(0)

    corpus = f"/tmp/rwkvpy-fuzz-corpus/{runner.name}"
    os.makedirs(corpus, exist_ok=True)
    libfuzzer = [
        sys.argv[0],
        corpus,
        str(ft.CORPUS / runner.name),
        f"-seed={seed}",
        "-max_len=262144",
        "-rss_limit_mb=0",
        "-timeout=600",
        f"-max_total_time={int(minutes * 60) + 60}",
        "-print_final_stats=1",
    ]
    atheris.Setup(libfuzzer, test_one, custom_mutator=mutate)
    atheris.Fuzz()


def _instrumented_import():
    """rwkvpy imported with atheris's coverage instrumentation, its numba kernels excluded."""
    import atheris
    import numba  # noqa: F401 - not instrumented
    import torch  # noqa: F401

    src = Path(ft.ROOT / "src" / "rwkvpy")
    exclude = list(NUMBA_MODULES)
    for sub in NUMBA_MODULES_DIRS:
        exclude.append(f"rwkvpy.{sub}")
        exclude += [f"rwkvpy.{sub}.{p.stem}" for p in (src / sub).glob("*.py")]
    with atheris.instrument_imports(include=["rwkvpy", "gguf"], exclude=exclude):
        import rwkvpy  # noqa: F401
        import rwkvpy.chat  # noqa: F401
        import rwkvpy.formats.gguf  # noqa: F401
        import rwkvpy.formats.pth  # noqa: F401
        import rwkvpy.formats.rwkvcpp  # noqa: F401
        import rwkvpy.formats.safetensors_io  # noqa: F401
        import rwkvpy.lora  # noqa: F401
        import rwkvpy.tokenizers.neox  # noqa: F401
        import rwkvpy.tokenizers.world  # noqa: F401


def _print(summaries, as_json):
    if as_json:
        print(json.dumps(summaries), flush=True)
        return
    print(
        f"{'target':<15} {'inputs':>7} {'typed':>7} {'loaded':>7} {'other':>6} {'seconds':>8}"
        "  findings"
    )
    for s in summaries:
        print(
            f"{s['target']:<15} {s['inputs']:>7} {s['typed']:>7} {s['loaded']:>7} "
            f"{s['other']:>6} {s['seconds']:>8.1f}  {len(s['findings'])}"
        )
        for f in s["findings"]:
            print(f"    {f['signature']} (x{f['count']}): {f['error'][:160]}  {f.get('input', '')}")
    sys.stdout.flush()


def main(argv=None):
    os.environ.setdefault("RWKVPY_BACKGROUND_COMPILE", "0")  # time the kernels, not a first run
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.fuzz", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("target", help="a target name or 'all': " + ", ".join(ft.TARGETS))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--minutes", type=float, help="fuzz this long (coverage-guided with atheris)")
    g.add_argument("--seeded", type=int, metavar="N", help="N seeded mutants per target")
    g.add_argument("--replay", action="store_true", help="the corpus and the regressions only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-atheris", action="store_true", help="seeded mutants even if atheris is installed"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds an input may take, compiling aside (default 10)",
    )
    p.add_argument(
        "--hard-timeout",
        type=float,
        default=300.0,
        help="seconds after which an input is a hang and the process ends (default 300)",
    )
    p.add_argument(
        "--memory-mb",
        type=int,
        default=2048,
        help="address space allowed beyond "
        "the warmed-up process (RLIMIT_AS; 0: no limit; default 2048)",
    )
    p.add_argument(
        "--findings", help="folder for failing inputs (default /tmp/rwkvpy-fuzz-findings/TARGET)"
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    names = list(ft.TARGETS) if args.target == "all" else [args.target]
    for n in names:
        if n not in ft.TARGETS:
            p.error(f"unknown target {n!r}: expected one of {', '.join(ft.TARGETS)} or all")
    os.environ.setdefault("RWKVPY_CACHE_DIR", "/tmp/rwkvpy-fuzz-cache")
    use_atheris = args.minutes is not None and not args.no_atheris
    if use_atheris:
        if len(names) != 1:
            p.error("coverage-guided fuzzing runs one target at a time")
        try:
            _instrumented_import()
        except ImportError:
            print("atheris is not installed: seeded mutants instead", file=sys.stderr)
            use_atheris = False
    import warnings

    warnings.simplefilter("ignore")  # readers' warnings about odd but loadable files
    from rwkvpy.compiling import set_quiet

    set_quiet(True)
    runners = [Runner(n, args) for n in names]
    ctx = ft.Context()
    for r in runners:
        r.setup(ctx)
    _watchdog(runners, args.hard_timeout)
    _warm(runners)
    for r in runners:  # the warm-up is not part of the record
        r.counts = dict.fromkeys(r.counts, 0)
        r.seconds = 0.0
    _limit_memory(args.memory_mb)
    if use_atheris:
        coverage_guided(runners[0], args.minutes, args.seed)
    elif args.replay:
        replay(runners)
    elif args.minutes is not None:
        seeded(runners, 0, args.seed, seconds=args.minutes * 60 / len(runners))
    else:
        seeded(runners, args.seeded if args.seeded is not None else 40, args.seed)
        for r in runners:  # and every kept regression, under the same limits
            before = dict(r.counts)
            for p in ft.regressions(r.name):
                r.run_one(p.read_bytes())
            r.regressions = {k: r.counts[k] - before[k] for k in ("inputs", "other")}
            r.counts = before
    summaries = [r.summary() for r in runners]
    _print(summaries, args.json)
    return 1 if any(s["other"] or (s["regressions"] or {}).get("other") for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
