"""Bit-identity check of the CPU kernels: record the logits and final states of a fixed set of
models in every mode, CPU capability level and thread count, then check a later run against
the recording byte for byte.

For changes that must not move any number (moving kernels between files, repacking weights
into other containers, renaming): record before the change, check after each step of it.

    python tools/check_logits_identical.py record /tmp/before.npz
    python tools/check_logits_identical.py check /tmp/before.npz

The set:

* every model file in tests/fixtures: rwkv.cpp's tiny v4, v5.1, v5.2, v6, v7 models (FP32,
  FP16, Q5_0, Q5_1) and the BlinkDL .pth references of v4, v5.0, v5.2, v6, v7;
* the demo model shipped in the package;
* random v7 models (rwkvpy.synth, n_embd 512, 2 layers, vocabulary 1000: the FFN matrices are
  above kernels.linear.SERIAL_MAX_ELEMENTS, so the products run on numba's threads with 2
  threads) as GGUFs in each block format (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K,
  llama-quantize's Q4_K_M mix) and F16, BF16;
* random v4, v5.2 and v6 models of the same size as rwkv.cpp files (F16, Q4_0, Q8_0) and as a
  Q5_K GGUF, so that every version's one-token block runs its products threaded.

Each model is run in mode "fast" and "exact", at each CPU capability level this machine can
run (kernels/cpu.py; a level above the host's is emulated with the same kernels), on 1 and 2
threads: a prompt in sequence mode (every position's logits; 70 tokens: tiles of 64 vectors
and a remainder, and a 3-token prompt: just above the numba kernels' own prompt limit), then
12 tokens one at a time (the one-token step), each with its final state (att_x, ffn_x, wkv).
The chosen kernels (Model.kernels) are recorded and compared too. ``--levels generic,avx2``
and ``--only NAME`` narrow a run (levels above avx2 select the avx2 kernels: kernels/cpu.py).
The random models are kept in ``--models DIR`` (default: a folder in the temporary
directory) between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("RWKVPY_FIXTURES", ROOT / "tests" / "fixtures"))
MODES = ("fast", "exact")
THREADS = (1, 2)
V7_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k", "q4_k_m", "f16", "bf16")
OTHER_VERSIONS = ("V4", "V5_2", "V6")
OTHER_TYPES = ("f16.bin", "q4_0.bin", "q8_0.bin", "q5_k.gguf")
PROMPT_LEN, SHORT_LEN, STEPS = 70, 3, 12


def fixture_models() -> list:
    out = []
    for p in sorted((FIXTURES / "rwkv-cpp-tiny").glob("*.bin")):
        if p.name.startswith("tiny-rwkv-"):
            out.append((p.stem, str(p)))
    for p in sorted((FIXTURES / "reference-pth").glob("*.pth")):
        out.append((p.stem, str(p)))
    return out


def synth_models(folder: str) -> list:
    """(name, path) of the random models, written to ``folder`` when missing."""
    from rwkvpy.config import Version
    from rwkvpy.convert import convert
    from rwkvpy.synth import save_random_model

    out = []
    plan = [("V7", t + ".gguf") for t in V7_TYPES]
    plan += [(v, t) for v in OTHER_VERSIONS for t in OTHER_TYPES]
    for v, t in plan:
        pth = os.path.join(folder, f"{v}.pth")
        if not os.path.exists(pth):
            save_random_model(
                pth,
                version=Version[v],
                n_embd=512,
                n_layer=2,
                vocab=1000,
                seed=11,
                dtype=torch.float16,
            )
        dst = os.path.join(folder, f"{v}-{t}")
        if not os.path.exists(dst):
            convert(pth, dst, type=t.split(".")[0], progress=False)
        out.append((f"synth-{v}-{t}", dst))
    return out


def levels() -> list:
    """The capability levels this machine can run (kernels/cpu.py)."""
    from rwkvpy.kernels.cpu import LEVELS, integer_kernels_run

    return [lv for lv in LEVELS if lv == "generic" or integer_kernels_run()]


def tokens(n: int, vocab: int, seed: int) -> list:
    return [int(t) for t in np.random.default_rng(seed).integers(0, vocab, n)]


def state_arrays(state) -> list:
    return [state.att_x.numpy().copy(), state.ffn_x.numpy().copy(), state.wkv.numpy().copy()]


def run(path: str, mode: str, level: str, threads: int) -> tuple:
    """(arrays by name, kernels description) of one model in one configuration."""
    import rwkvpy

    m = rwkvpy.load(path, mode=mode, threads=threads, cache=False, cpu_capability=level)
    vocab = m.config.vocab_size
    out = {}
    for tag, n, seed in (("seq", PROMPT_LEN, 1), ("short", SHORT_LEN, 2)):
        lg, st = m.forward(tokens(n, vocab, seed), None, all_logits=True)
        out[tag] = lg.numpy().copy()
        for i, a in enumerate(state_arrays(st)):
            out[f"{tag}-state{i}"] = a
    st, rows = None, []
    for t in tokens(STEPS, vocab, 3):
        lg, st = m.forward([t], st)
        rows.append(lg.numpy().copy())
    out["serial"] = np.stack(rows)
    for i, a in enumerate(state_arrays(st)):
        out[f"serial-state{i}"] = a
    return out, json.dumps(m.kernels, sort_keys=True)


def collect(folder: str, only: str | None, lvls: list) -> dict:
    models = fixture_models() + [("demo", "demo")] + synth_models(folder)
    if only:
        models = [(n, p) for n, p in models if only in n]
    got = {}
    t0 = time.perf_counter()
    for i, (name, path) in enumerate(models):
        for mode in MODES:
            for level in lvls:
                for threads in THREADS:
                    key = f"{name}|{mode}|{level}|{threads}"
                    arrays, kernels = run(path, mode, level, threads)
                    for k, a in arrays.items():
                        got[f"{key}|{k}"] = a
                    got[f"{key}|kernels"] = np.frombuffer(kernels.encode(), np.uint8)
        print(f"[{time.perf_counter() - t0:6.1f} s] {i + 1}/{len(models)} {name}", flush=True)
    return got


def compare(want, got: dict) -> list:
    """Lines describing every difference between two recordings."""
    bad = []
    for k in sorted(set(want.files) | set(got)):
        if k not in got:
            bad.append(f"MISSING in this run: {k}")
            continue
        if k not in want.files:
            bad.append(f"NOT RECORDED: {k}")
            continue
        a, b = want[k], got[k]
        if a.shape != b.shape or a.dtype != b.dtype:
            bad.append(f"DIFFERENT shape/dtype: {k}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}")
        elif a.tobytes() != b.tobytes():
            if k.endswith("|kernels"):
                bad.append(
                    f"DIFFERENT kernels: {k}: {a.tobytes().decode()} vs {b.tobytes().decode()}"
                )
            else:
                n = int((a.view(np.uint8) != b.view(np.uint8)).sum())
                d = float(np.nanmax(np.abs(a.astype(np.float64) - b.astype(np.float64))))
                bad.append(f"DIFFERENT values: {k}: {n} bytes differ, max |diff| {d:.3g}")
    return bad


def main(argv=None) -> int:
    # each load compiles its own kernels: a first run's second process (rwkvpy.coldstart) would
    # send the first tokens through the sequence path, which differs in the last bits
    os.environ["RWKVPY_BACKGROUND_COMPILE"] = "0"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("record", "check"))
    p.add_argument("file", help=".npz of recorded logits and states")
    p.add_argument(
        "--models",
        default=os.path.join(tempfile.gettempdir(), "rwkvpy-identity-models"),
        help="folder of the random models (kept between runs)",
    )
    p.add_argument(
        "--only",
        default=None,
        help="only the models whose name contains this (check: the rest of the "
        "recording is ignored)",
    )
    p.add_argument(
        "--levels",
        default=None,
        help="comma-separated capability levels (default: every level this machine "
        "can run; check: the rest of the recording is ignored)",
    )
    args = p.parse_args(argv)
    lvls = args.levels.split(",") if args.levels else levels()
    os.makedirs(args.models, exist_ok=True)
    t0 = time.perf_counter()
    got = collect(args.models, args.only, lvls)
    if args.action == "record":
        np.savez_compressed(args.file, **got)
        runs = sum(k.endswith("|kernels") for k in got)
        print(
            f"recorded {runs} runs ({len(got)} arrays) to {args.file} in "
            f"{time.perf_counter() - t0:.0f} s"
        )
        return 0
    want = np.load(args.file)
    if args.only or args.levels:
        keep = {
            k
            for k in want.files
            if (args.only or "") in k.split("|")[0] and k.split("|")[2] in lvls
        }
        want = _Subset(want, keep)
    bad = compare(want, got)
    for line in bad:
        print(line)
    missing = sum(line.startswith("MISSING") for line in bad)
    print(
        f"{len(got) - len(bad) + missing} of {len(got)} arrays of this run bit-identical, "
        f"{missing} recorded arrays not in this run ({time.perf_counter() - t0:.0f} s)"
    )
    return 1 if bad else 0


class _Subset:
    """Part of an npz recording, with the interface compare() uses."""

    def __init__(self, npz, keys):
        self._npz, self.files = npz, sorted(keys)

    def __getitem__(self, k):
        return self._npz[k]


if __name__ == "__main__":
    sys.exit(main())
