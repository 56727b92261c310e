"""Compare a model's file formats by measurement: quality (perplexity on a text), speed, size,
memory.

Example::

    from rwkvpy.compare import compare, format_table
    from rwkvpy.tokenizers import ByteTokenizer

    tokens = ByteTokenizer().encode(open("eval.txt", encoding="utf-8").read())
    result = compare("model.pth", tokens, types=["f16", "q8_0", "q5_1"])
    print(format_table(result))

For each type the source model is converted (:func:`rwkvpy.convert.convert`) into a temporary
folder (or ``out_dir``, where ``reuse=True`` measures files already there as they are), then
measured in a fresh Python process of its own, one type at a time, so that the resident memory
is that of one model alone and no measurement runs beside another: load time, per-token latency
(median, mean, p90 and min of ``bench_tokens`` decode steps, after 3 warm-up steps, and the
decode tokens/s of the whole timed run), prompt speed (one call over ``prompt`` tokens, after a
warm-up call of the same length), the machine's load average around those timings and whether
it was busy (as ``rwkvpy bench``: :func:`rwkvpy.bench.busy_reason`), peak resident memory (the
process's high-water mark after those, Python and torch included; ``base_rss_mb`` is the
process before loading), and the perplexity of the text (:func:`rwkvpy.perplexity.perplexity`).
Temporary files are deleted as soon as they are measured, so one converted model at a time is
on disk.

Rows come sorted by perplexity, best first, with the difference from the best one.
"""

from __future__ import annotations

import csv
import datetime
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from .errors import RwkvpyError
from .perplexity import DEFAULT_CHUNK, check_scorable

#: The K-quant mixes are written as llama-quantize writes them (formats/kquant_mix.py): a
#: model whose embedding size is not a multiple of 256 gets their 32-block fallbacks.
DEFAULT_TYPES = ("f16", "q8_0", "q6_k", "q5_k_m", "q5_1", "q5_0", "q4_k_m", "q4_1", "q4_0")

#: Row fields, in the order of the CSV columns.
COLUMNS = (
    "type",
    "perplexity",
    "delta_perplexity",
    "delta_pct",
    "nll",
    "tokens",
    "file_size",
    "per_token_ms",
    "per_token_mean_ms",
    "per_token_p90_ms",
    "per_token_min_ms",
    "tokens_timed",
    "decode_tokens_per_s",
    "prompt_tokens_per_s",
    "eval_tokens_per_s",
    "rss_mb",
    "base_rss_mb",
    "load_s",
    "threads",
    "load_avg_start",
    "load_avg_end",
    "cpus",
    "busy",
    "busy_reason",
    "file",
    "reused",
)


class CompareError(RwkvpyError):
    """A comparison that cannot be done or whose measurement failed."""


@dataclass
class CompareResult:
    model: str
    tokens: int  # tokens of the text used
    scored: int  # tokens scored per type
    ignore_first: int
    threads: int
    mode: str
    date: str
    rows: list = field(default_factory=list)  # dicts with COLUMNS, best perplexity first

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "tokens": self.tokens,
            "scored": self.scored,
            "ignore_first": self.ignore_first,
            "threads": self.threads,
            "mode": self.mode,
            "date": self.date,
            "rows": [dict(r) for r in self.rows],
        }


# -- types and files -----------------------------------------------------------------------------
def parse_types(types) -> list[str]:
    """``"f16,q5_1"`` or a list -> canonical lower-case names, in order, without repeats."""
    from .convert import TYPES

    if isinstance(types, str):
        types = types.split(",")
    aliases = {"fp32": "f32", "float32": "f32", "fp16": "f16", "float16": "f16", "bfloat16": "bf16"}
    out = []
    for t in types:
        name = str(t).strip().lower().replace("-", "_")
        name = aliases.get(name, name)
        if not name:
            continue
        if name not in TYPES:
            raise CompareError(
                f"unknown type {str(t).strip()!r}; expected some of {', '.join(TYPES)}"
            )
        if name not in out:
            out.append(name)
    if not out:
        raise CompareError("no type to compare: give at least one, e.g. f16,q5_1")
    return out


def _output_ext(src: str, format: str | None) -> str:
    if format is None:
        return ".bin" if src.lower().endswith(".bin") else ".gguf"
    ext = {"gguf": ".gguf", "bin": ".bin", "rwkv.cpp": ".bin"}.get(str(format).lower())
    if ext is None:
        raise CompareError(f"unknown output format {format!r}; expected gguf or bin")
    return ext


def type_file_name(src: str, type: str, ext: str) -> str:
    stem = os.path.splitext(os.path.basename(os.fspath(src).rstrip(os.sep)))[0]
    return f"{stem}-{type}{ext}"


def _check_reused(path: str, type: str, src_info) -> None:
    """A file found in out_dir must be this model in this type."""
    import rwkvpy

    info = rwkvpy.inspect(path)
    want = (src_info.version, src_info.n_embd, src_info.n_layer, src_info.vocab_size)
    got = (info.version, info.n_embd, info.n_layer, info.vocab_size)
    if got != want:
        raise CompareError(
            f"{path}: is not a conversion of {src_info.path} ({got[0].label} "
            f"{got[1]}x{got[2]}, vocab {got[3]}; the source is {want[0].label} "
            f"{want[1]}x{want[2]}, vocab {want[3]}); remove it or use another "
            "--out-dir"
        )
    if type.upper() not in info.tensor_types:
        raise CompareError(
            f"{path}: holds no {type.upper()} tensor (types "
            f"{', '.join(sorted(info.tensor_types))}); remove it or drop --reuse"
        )


# -- measuring one file in a process of its own ----------------------------------------------
def _vm_kb(field_name: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return float(line.split()[1])
    except OSError:  # pragma: no cover - not Linux
        pass
    return None


def _peak_rss_mb() -> float:
    """This process's resident high-water mark. /proc's VmHWM belongs to the process's own
    memory map (ru_maxrss can carry the parent's peak over fork + exec)."""
    kb = _vm_kb("VmHWM")
    if kb is None:  # pragma: no cover - not Linux
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.platform == "darwin":
            kb /= 1024
    return kb / 1024


def measure(
    path,
    tokens,
    *,
    ignore_first: int = 0,
    chunk: int = DEFAULT_CHUNK,
    threads=None,
    mode: str = "fast",
    device="cpu",
    gpu_layers=None,
    compile=False,
    cache=True,
    cpu_capability=None,
    bench_tokens: int = 32,
    prompt: int = 512,
    progress=False,
) -> dict:
    """Measure one model file in this process (see the module docstring). Use it in a fresh
    process for a meaningful ``rss_mb``; :func:`compare` does."""

    import torch

    from .bench import WARMUP_STEPS, load_timed, random_ids, time_run
    from .perplexity import perplexity

    base_rss = (_vm_kb("VmRSS") or 0) / 1024
    model, load_s = load_timed(
        path, mode, threads, device, gpu_layers, compile, cache, cpu_capability
    )
    ids = random_ids(model, max(bench_tokens + WARMUP_STEPS, prompt, 16))
    m = time_run(model, ids, bench_tokens, prompt)
    rss = _peak_rss_mb()
    r = perplexity(model, tokens, chunk=chunk, ignore_first=ignore_first, progress=progress)
    return {
        "perplexity": r.perplexity,
        "nll": r.nll,
        "tokens": r.tokens,
        "file_size": os.path.getsize(path),
        **{
            k: m[k]
            for k in (
                "per_token_ms",
                "per_token_mean_ms",
                "per_token_p90_ms",
                "per_token_min_ms",
                "tokens_timed",
                "decode_tokens_per_s",
            )
        },
        "prompt_tokens_per_s": prompt / m["prompt_s"],
        "eval_tokens_per_s": r.tokens_per_s,
        "rss_mb": rss,
        "base_rss_mb": base_rss,
        "load_s": load_s,
        "threads": torch.get_num_threads(),
        **{k: m[k] for k in ("load_avg_start", "load_avg_end", "cpus", "busy", "busy_reason")},
    }


def _worker(spec_path: str) -> int:
    """Entry point of the measuring process: ``python -m rwkvpy.compare SPEC.json``. Writes the
    result (or the error) as JSON to the spec's ``result`` path."""
    import numpy as np

    with open(spec_path) as f:
        spec = json.load(f)
    try:
        tokens = np.load(spec["tokens"])
        out = measure(
            spec["path"],
            tokens,
            ignore_first=spec["ignore_first"],
            chunk=spec["chunk"],
            threads=spec["threads"],
            mode=spec["mode"],
            device=spec["device"],
            gpu_layers=spec["gpu_layers"],
            compile=spec["compile"],
            cache=spec["cache"],
            cpu_capability=spec.get("cpu_capability"),
            bench_tokens=spec["bench_tokens"],
            prompt=spec["prompt"],
            progress=spec["progress"],
        )
    except (RwkvpyError, OSError, MemoryError) as e:
        out = {"error": str(e)}
    with open(spec["result"], "w") as f:
        json.dump(out, f)
    return 0


def _measure_in_subprocess(path, tmp, spec: dict, progress: bool) -> dict:
    spec = dict(spec, path=path, result=os.path.join(tmp, "result.json"), progress=progress)
    spec_path = os.path.join(tmp, "spec.json")
    if os.path.exists(spec["result"]):
        os.remove(spec["result"])
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    p = subprocess.run(
        [sys.executable, "-m", "rwkvpy.compare", spec_path],
        check=False,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=None if progress else subprocess.PIPE,
    )
    try:
        with open(spec["result"]) as f:
            out = json.load(f)
    except (OSError, ValueError):
        tail = ""
        if p.stderr:
            lines = p.stderr.decode("utf-8", "replace").strip().splitlines()
            tail = f": {lines[-1]}" if lines else ""
        why = " (killed: out of memory?)" if p.returncode in (-9, 137) else ""
        raise CompareError(
            f"{path}: the measuring process ended with status {p.returncode}{why}{tail}"
        ) from None
    if "error" in out:
        raise CompareError(out["error"])
    return out


# -- the comparison ------------------------------------------------------------------------------
def compare(
    model,
    tokens,
    types=DEFAULT_TYPES,
    *,
    out_dir=None,
    reuse: bool = False,
    ignore_first: int = 0,
    chunk: int = DEFAULT_CHUNK,
    threads=None,
    mode: str = "fast",
    device="cpu",
    gpu_layers=None,
    compile=False,
    cache=True,
    cpu_capability=None,
    bench_tokens: int = 32,
    prompt: int = 512,
    quantize_head: bool = False,
    format: str | None = None,
    progress=True,
) -> CompareResult:
    """Convert ``model`` (a file path) into each of ``types`` and measure each file.

    Args:
        tokens: the evaluation text's token ids (the model's tokenizer).
        types: names (or one comma-separated string) of :data:`rwkvpy.convert.TYPES`.
        out_dir: keep the converted files there (default: a temporary folder, emptied as it
            goes). A file already there is an error unless ``reuse`` (then it is measured as
            it is, after checking that it is this model in that type).
        format: "gguf" or "bin" (default: ``.bin`` for an rwkv.cpp source, else GGUF).
        threads, mode, device, gpu_layers, compile, cache, cpu_capability: as
            :func:`rwkvpy.load` (``cpu_capability`` passed on only when given);
            bench_tokens, prompt: as ``rwkvpy bench``.
        progress: True prints a line per step and the perplexity bar on stderr; a callable gets
            each message instead.

    Raises:
        CompareError, PerplexityError, ConversionError and the readers' errors.
    """
    import numpy as np

    import rwkvpy

    from .convert import convert

    src = os.fspath(model)
    if not os.path.exists(src):
        raise CompareError(f"{src}: no such model file")
    type_list = parse_types(types)
    ext = _output_ext(src, format)
    if ext == ".bin" and "bf16" in type_list:
        raise CompareError("rwkv.cpp .bin files cannot hold bf16: drop it or use --format gguf")
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    scored = check_scorable(int(tokens.size), ignore_first)
    if chunk < 1 or bench_tokens < 1 or prompt < 1:
        raise CompareError("chunk, bench_tokens and prompt must be positive")
    src_info = rwkvpy.inspect(src)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= src_info.vocab_size):
        bad = int(tokens[(tokens < 0) | (tokens >= src_info.vocab_size)][0])
        raise CompareError(
            f"token id {bad} is outside the model's vocabulary (0..{src_info.vocab_size - 1})"
        )
    say = (
        progress
        if callable(progress)
        else ((lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None))
    )
    show_bar = progress is True

    if out_dir is not None:
        out_dir = os.fspath(out_dir)
        if not os.path.isdir(out_dir):
            raise CompareError(f"{out_dir}: no such folder (--out-dir)")
        for typ in type_list:
            p = os.path.join(out_dir, type_file_name(src, typ, ext))
            if os.path.exists(p) and not reuse:
                raise CompareError(
                    f"{p}: already exists; pass --reuse to measure it as it is, or remove it"
                )
    main_type = max(src_info.tensor_types, key=lambda k: src_info.tensor_bytes[k])
    if main_type.startswith("Q"):
        say(
            f"note: the source is {main_type}: every type is made from its already quantized "
            "weights (start from the f32/f16/bf16 model to compare the formats themselves)"
        )

    rows = []
    n = len(type_list)
    with tempfile.TemporaryDirectory(prefix="rwkvpy-compare-") as tmp:
        tok_path = os.path.join(tmp, "tokens.npy")
        np.save(tok_path, tokens)
        spec = {
            "tokens": tok_path,
            "ignore_first": ignore_first,
            "chunk": chunk,
            "threads": threads,
            "mode": mode,
            "device": device,
            "gpu_layers": gpu_layers,
            "compile": compile,
            "cache": cache,
            "cpu_capability": cpu_capability,
            "bench_tokens": bench_tokens,
            "prompt": prompt,
        }
        for i, typ in enumerate(type_list, 1):
            folder = out_dir if out_dir is not None else tmp
            path = os.path.join(folder, type_file_name(src, typ, ext))
            reused = os.path.exists(path)
            if reused:
                _check_reused(path, typ, src_info)
                say(f"[{i}/{n}] {typ}: reusing {path}")
            else:
                say(f"[{i}/{n}] {typ}: converting to {path}")
                convert(
                    src, path, type=typ, quantize_head=quantize_head, force=False, progress=show_bar
                )
            say(f"[{i}/{n}] {typ}: measuring (speed, memory, perplexity of {scored} tokens)")
            try:
                m = _measure_in_subprocess(path, tmp, spec, show_bar)
            finally:
                if out_dir is None and os.path.exists(path):
                    os.remove(path)
            rows.append(
                {"type": typ, **m, "file": path if out_dir is not None else None, "reused": reused}
            )
    _rank(rows)
    return CompareResult(
        model=src,
        tokens=int(tokens.size),
        scored=scored,
        ignore_first=ignore_first,
        threads=rows[0]["threads"] if rows else 0,
        mode=mode,
        date=datetime.date.today().isoformat(),
        rows=rows,
    )


def _rank(rows: list) -> None:
    rows.sort(key=lambda r: (math.isnan(r["perplexity"]), r["perplexity"]))
    best = rows[0]["perplexity"] if rows else math.nan
    for r in rows:
        r["delta_perplexity"] = r["perplexity"] - best
        r["delta_pct"] = 100.0 * (r["perplexity"] / best - 1.0) if best > 0 else math.nan
        for k in COLUMNS:
            r.setdefault(k, None)


# -- output ------------------------------------------------------------------------------------
def _threads(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def _ms(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_table(result: CompareResult) -> str:
    """The rows as a table (decode ms per token: median, mean, p90), then one warning line per
    row measured on a busy machine."""
    from .bench import busy_warning

    head = (
        "type",
        "perplexity",
        "vs best",
        "nll/token",
        "size MiB",
        "median ms",
        "mean ms",
        "p90 ms",
        "prompt tok/s",
        "RSS MiB",
    )
    body = []
    for i, r in enumerate(result.rows):
        body.append(
            (
                r["type"],
                f"{r['perplexity']:.4f}",
                "best" if i == 0 else f"+{r['delta_perplexity']:.4f} ({r['delta_pct']:+.2f}%)",
                f"{r['nll']:.5f}",
                f"{r['file_size'] / 2**20:.2f}",
                _ms(r["per_token_ms"]),
                _ms(r.get("per_token_mean_ms")),
                _ms(r.get("per_token_p90_ms")),
                f"{r['prompt_tokens_per_s']:.0f}",
                f"{r['rss_mb']:.0f}",
            )
        )
    widths = [max(len(str(x[c])) for x in [head, *body]) for c in range(len(head))]
    lines = [
        (
            f"model: {result.model} ({result.scored} tokens scored of {result.tokens}, "
            f"{_threads(result.threads)}, mode {result.mode}, {result.date})"
        )
    ]
    for j, row in enumerate([head, *body]):
        cells = [
            str(v).ljust(w) if c == 0 else str(v).rjust(w)
            for c, (v, w) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    for r in result.rows:
        if r.get("busy"):
            lines.append(
                busy_warning(
                    f"{r['type']}: {r['busy_reason']}",
                    "its speed figures are not this type's speed",
                )
            )
    return "\n".join(lines)


def write_json(result: CompareResult, path) -> None:
    text = json.dumps(result.to_dict(), indent=2)
    if os.fspath(path) == "-":
        print(text)
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def write_csv(result: CompareResult, path) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in result.rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in COLUMNS})


def check_plot_available() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise CompareError(
            "--plot needs matplotlib, which is not installed: "
            "pip install 'rwkvpy[plot]' (or pip install matplotlib)"
        )


def plot(result: CompareResult, path) -> None:
    """Perplexity against per-token latency and against file size, one point per type."""
    check_plot_available()
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(10, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    rows = result.rows
    ys = [r["perplexity"] for r in rows]
    for ax, key, label, scale in (
        (axes[0], "per_token_ms", "latency per token (ms, median)", 1.0),
        (axes[1], "file_size", "file size (MiB)", 1 / 2**20),
    ):
        xs = [r[key] * scale for r in rows]
        ax.scatter(xs, ys)
        for x, y, r in zip(xs, ys, rows):
            ax.annotate(r["type"], (x, y), textcoords="offset points", xytext=(5, 4))
        ax.set_xlabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("perplexity (lower is better)")
    fig.suptitle(
        f"{os.path.basename(result.model)}: {result.scored} tokens, "
        f"{_threads(result.threads)}, {result.date}"
    )
    try:
        fig.savefig(path, dpi=120)
    except ValueError as e:  # an unknown image extension
        raise CompareError(f"{path}: {e}") from None


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
