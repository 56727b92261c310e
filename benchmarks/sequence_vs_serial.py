"""How far mode "fast"'s sequence path is from its one-token path on block formats, against how far
each is from the exact path, on random-weight models of real shapes (rwkvpy.synth presets).

In mode "fast" the block formats' products round their activations to int8 (int16 for Q8_0)
blocks. The sequence path and the one-token path compute those activations with other float32
operation orders (torch's batched glue vs the fused one-token kernels), so a value near a
rounding boundary can land one step apart on the two paths, and the step travels through the
recurrent state. This script measures that, for docs/accuracy.md:

    python -m benchmarks.sequence_vs_serial [--presets v7-0.1b v6-1.6b] [--types q4_0 q8_0]
        [--tokens 16] [--json]

Per model and type: max abs difference of the logits after ``--tokens`` tokens between
fast sequence and fast serial, fast serial and exact serial, fast sequence and exact serial,
exact sequence and exact serial; and the model's logit scale (max abs of the exact logits).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch


def serial(model, toks):
    state = None
    for t in toks:
        logits, state = model.forward([t], state)
    return logits


def measure(path, toks, level=None) -> dict:
    import rwkvpy

    exact = rwkvpy.load(path, mode="exact", cache=False)
    fast = rwkvpy.load(path, mode="fast", cache=False, cpu_capability=level)
    es, eq = serial(exact, toks), exact.forward(toks, None)[0]
    fs, fq = serial(fast, toks), fast.forward(toks, None)[0]

    def d(a, b):
        return float((a - b).abs().max())

    return {
        "fast_seq_vs_fast_serial": d(fq, fs),
        "fast_serial_vs_exact": d(fs, es),
        "fast_seq_vs_exact": d(fq, es),
        "exact_seq_vs_exact_serial": d(eq, es),
        "logit_scale": float(es.abs().max()),
        "products": fast.kernels["products"],
    }


def main(argv=None) -> int:
    os.environ.setdefault("RWKVPY_BACKGROUND_COMPILE", "0")  # time the kernels, not a first run
    from rwkvpy.convert import convert
    from rwkvpy.synth import save_random_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["v7-0.1b"])
    p.add_argument("--types", nargs="+", default=["q4_0", "q5_1", "q8_0", "f16"])
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--level", default=None, help="CPU capability level (default: this CPU's)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            pth = save_random_model(os.path.join(tmp, f"{preset}.pth"), preset)
            for typ in args.types:
                dst = os.path.join(tmp, f"{preset}-{typ}.bin")
                convert(pth, dst, type=typ, progress=False)
                toks = [(i * 7919 + 13) % 50000 for i in range(args.tokens)]
                r = {
                    "preset": preset,
                    "type": typ,
                    "tokens": args.tokens,
                    **measure(dst, toks, args.level),
                }
                rows.append(r)
                if not args.json:
                    print(
                        f"{preset:8s} {typ:5s} fast seq-serial {r['fast_seq_vs_fast_serial']:.2e}"
                        f"  fast serial-exact {r['fast_serial_vs_exact']:.2e}"
                        f"  fast seq-exact {r['fast_seq_vs_exact']:.2e}"
                        f"  exact seq-serial {r['exact_seq_vs_exact_serial']:.2e}"
                        f"  (logits up to {r['logit_scale']:.1f})",
                        flush=True,
                    )
                os.remove(dst)
            os.remove(pth)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
