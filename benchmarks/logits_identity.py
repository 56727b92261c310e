"""Bit-identity check of the logits: run a fixed set of models and record every logit, then
compare a later run's logits with the recorded ones byte for byte.

For changes that must not move any number (compile options, cache placement, how kernels are
specialized): record before the change, compare after it.

    python benchmarks/logits_identity.py record before.npz
    python benchmarks/logits_identity.py compare before.npz

The set: the demo model, and random-weight v4, v5.2, v6 and v7 models (n_embd 512, 2 layers:
their FFN matrices are above kernels.linear.SERIAL_MAX_ELEMENTS, so products run on numba's
threads with 2 threads) converted to rwkv.cpp files in F16, Q4_0, Q5_1 and Q8_0; each in mode
fast and exact, on 1 and 2 threads. Per run: the logits of a 7-token prompt (sequence mode,
every position) and of 5 tokens fed one at a time after it (the one-token step). The models
are written to a temporary folder (or ``--models DIR``, kept for later runs).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

VERSIONS = ("V4", "V5_2", "V6", "V7")
TYPES = ("f16", "q4_0", "q5_1", "q8_0")
PROMPT = [3, 141, 59, 265, 358, 97, 932]
STEPS = [38, 462, 643, 383, 279]


def models(folder: str) -> list:
    """(name, path) of every model of the set, written to ``folder`` when missing."""
    from rwkvpy.config import Version
    from rwkvpy.convert import convert
    from rwkvpy.demo import demo_model_path
    from rwkvpy.synth import save_random_model

    out = [("demo", demo_model_path())]
    for v in VERSIONS:
        pth = os.path.join(folder, f"{v}.pth")
        if not os.path.exists(pth):
            save_random_model(
                pth,
                version=Version[v],
                n_embd=512,
                n_layer=2,
                vocab=1000,
                seed=7,
                dtype=torch.float16,
            )
        for t in TYPES:
            dst = os.path.join(folder, f"{v}-{t}.bin")
            if not os.path.exists(dst):
                convert(pth, dst, type=t, progress=False)
            out.append((f"{v}-{t}", dst))
    return out


def run(path: str, mode: str, threads: int) -> np.ndarray:
    """The prompt's logits at every position, then each one-token step's, stacked."""
    import rwkvpy

    m = rwkvpy.load(path, mode=mode, threads=threads, cache=False)
    vocab = m.config.vocab_size
    toks = [t % vocab for t in PROMPT]
    logits, state = m.forward(toks, None, all_logits=True)
    rows = [logits.float()]
    for t in STEPS:
        lg, state = m.forward([t % vocab], state)
        rows.append(lg.float().unsqueeze(0))
    return torch.cat(rows).numpy()


def collect(folder: str) -> dict:
    out = {}
    for name, path in models(folder):
        for mode in ("fast", "exact"):
            for threads in (1, 2):
                out[f"{name}/{mode}/{threads}"] = run(path, mode, threads)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("record", "compare"))
    p.add_argument("file", help=".npz of recorded logits")
    p.add_argument("--models", default=None, help="folder of the random models (kept)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        got = collect(args.models or tmp)
    if args.action == "record":
        np.savez(args.file, **got)
        print(f"recorded {len(got)} runs to {args.file}")
        return 0
    want = np.load(args.file)
    bad = [
        k
        for k in sorted(set(want.files) | set(got))
        if k not in got
        or k not in want.files
        or want[k].tobytes() != got[k].tobytes()
        or want[k].shape != got[k].shape
    ]
    for k in bad:
        print(f"DIFFERENT: {k}")
    print(f"{len(got) - len(bad)} of {len(got)} runs bit-identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
