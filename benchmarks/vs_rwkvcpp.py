"""rwkvpy against rwkv.cpp on the same model files, in one run: one markdown table.

    python benchmarks/vs_rwkvcpp.py --lib /path/to/librwkv.so --threads 2 MODEL.bin [...]

rwkv.cpp is not part of rwkvpy: build its shared library yourself (its README) and pass its
path. Each engine runs each file in a fresh process, one after the other: rwkv.cpp through its
C API (``rwkv_init_from_file``, ``rwkv_eval`` per token, ``rwkv_eval_sequence_in_chunks`` for the
prompt, chunks of 16 as its docs recommend; one untimed call of each first), rwkvpy through
``rwkvpy bench --json``. Per-token: median over ``--tokens`` tokens after 4 untimed ones; prompt:
``--prompt`` random tokens. Files must be rwkv.cpp ``.bin`` files (``rwkvpy convert X.pth Y.bin
--type q4_0`` writes them byte-identical to rwkv.cpp's own converter and quantizer).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

# Runs in a child process: times one file with rwkv.cpp's C API and prints one JSON line.
_CHILD = r"""
import ctypes, json, statistics, sys, time
import numpy as np
lib_path, path, threads, n_tokens, prompt = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
lib = ctypes.CDLL(lib_path)
F = ctypes.POINTER(ctypes.c_float)
lib.rwkv_init_from_file.argtypes = [ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32]
lib.rwkv_init_from_file.restype = ctypes.c_void_p
lib.rwkv_eval.argtypes = [ctypes.c_void_p, ctypes.c_int32, F, F, F]
lib.rwkv_eval.restype = ctypes.c_bool
lib.rwkv_eval_sequence_in_chunks.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int32),
                                             ctypes.c_size_t, ctypes.c_size_t, F, F, F]
lib.rwkv_eval_sequence_in_chunks.restype = ctypes.c_bool
for name in ("rwkv_get_state_len", "rwkv_get_logits_len"):
    getattr(lib, name).argtypes = [ctypes.c_void_p]
    getattr(lib, name).restype = ctypes.c_size_t
t0 = time.perf_counter()
ctx = lib.rwkv_init_from_file(path.encode(), threads, 0)
load_s = time.perf_counter() - t0
if not ctx:
    sys.exit(f"rwkv.cpp could not load {path}")
s_in = np.zeros(lib.rwkv_get_state_len(ctx), np.float32)
s_out = s_in.copy()
logits = np.zeros(lib.rwkv_get_logits_len(ctx), np.float32)
ptr = lambda a: a.ctypes.data_as(F)
ids = np.random.default_rng(0).integers(0, logits.size, max(prompt, n_tokens + 4)).tolist()
lib.rwkv_eval(ctx, ids[0], None, ptr(s_in), ptr(logits))
times = []
for i, tok in enumerate(ids[:n_tokens + 4]):
    t = time.perf_counter()
    assert lib.rwkv_eval(ctx, tok, ptr(s_in), ptr(s_out), ptr(logits))
    if i >= 4:
        times.append(time.perf_counter() - t)
    s_in, s_out = s_out, s_in
seq = (ctypes.c_int32 * prompt)(*ids[:prompt])
assert lib.rwkv_eval_sequence_in_chunks(ctx, seq, prompt, 16, None, ptr(s_out), ptr(logits))
t = time.perf_counter()
assert lib.rwkv_eval_sequence_in_chunks(ctx, seq, prompt, 16, None, ptr(s_out), ptr(logits))
prompt_s = time.perf_counter() - t
print(json.dumps({"per_token_ms": 1e3 * statistics.median(times), "load_s": load_s,
                  "prompt_tokens_per_s": prompt / prompt_s}))
"""


def run_json(cmd) -> dict:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])} ... failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="rwkv.cpp .bin model files")
    p.add_argument("--lib", required=True, help="path of rwkv.cpp's shared library")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--mode", default="fast")
    args = p.parse_args()
    lines = [
        "| file | type | rwkvpy ms/token | rwkv.cpp ms/token | ratio | rwkvpy prompt tok/s "
        "| rwkv.cpp prompt tok/s | ratio | rwkvpy load s | rwkv.cpp load s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for f in args.files:
        c = run_json(
            [
                sys.executable,
                "-c",
                _CHILD,
                args.lib,
                f,
                str(args.threads),
                str(args.tokens),
                str(args.prompt),
            ]
        )
        r = run_json(
            [
                sys.executable,
                "-m",
                "rwkvpy",
                "bench",
                f,
                "--json",
                "--quiet",
                "--threads",
                str(args.threads),
                "--tokens",
                str(args.tokens),
                "--prompt",
                str(args.prompt),
                "--mode",
                args.mode,
            ]
        )
        line = (
            f"| {f.rsplit('/', 1)[-1]} | {r['type']} | {r['per_token_ms']:.1f} | "
            f"{c['per_token_ms']:.1f} | {r['per_token_ms'] / c['per_token_ms']:.2f} | "
            f"{r['prompt_tokens_per_s']:.0f} | {c['prompt_tokens_per_s']:.0f} | "
            f"{r['prompt_tokens_per_s'] / c['prompt_tokens_per_s']:.1f} | "
            f"{r['load_s']:.2f} | {c['load_s']:.2f} |"
        )
        lines.append(line)
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
