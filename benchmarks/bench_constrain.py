"""The cost of constrained decoding per token, beside a model's own token time.

For each constraint (a JSON schema, any JSON object, a GBNF grammar), runs seeded generations
of a model (by default random weights at v7 0.1B's shapes with the 65536-token World vocabulary,
synthesized once into --work-dir) and times, at every step:

- ``forward``: the model reading one token (``model.forward``);
- ``mask``: the grammar's step (rwkvpy.constrain.GrammarProcessor: llguidance computing the
  allowed tokens, their bits unpacked, the other logits set to -inf, the end option);
- ``accept``: the matcher moving on by the chosen token.

Prints a table (median and mean per step, and mask + accept as a share of forward) or --json.
Example::

    python benchmarks/bench_constrain.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "role": {"enum": ["admin", "user", "guest"]},
        "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "role", "scores", "address"],
}
GBNF = r"""root ::= item ("," " "? item)*
item ::= [a-z]+ ("=" [0-9]+)?
"""


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


def run_case(model, tok, constraint, args) -> dict:
    import torch

    from rwkvpy.sampling import Sampler, SamplingParams

    fwd, mask, acc = [], [], []
    prompt = tok.encode("Here is the record as JSON:")
    logits0, state0 = model.forward(prompt)
    seed = 0
    while len(fwd) < args.steps:
        proc = constraint.processor(tok)
        sampler = Sampler(SamplingParams(seed=seed, temperature=args.temperature))
        seed += 1
        logits, state = logits0, state0
        for _ in range(args.max_tokens):
            x = logits.detach().to("cpu", torch.float32).clone()
            t0 = time.perf_counter()
            x = proc(x)
            t1 = time.perf_counter()
            token = sampler.sample(x)
            if token in proc.stop_tokens:
                break
            t2 = time.perf_counter()
            proc.accept(token)
            t3 = time.perf_counter()
            logits, state = model.forward([token], state)
            t4 = time.perf_counter()
            mask.append(t1 - t0)
            acc.append(t3 - t2)
            fwd.append(t4 - t3)
            if proc.finished() or len(fwd) >= args.steps:
                break
    ms = 1e3
    out = {"steps": len(fwd), "sequences": seed}
    for name, v in (("forward", fwd), ("mask", mask), ("accept", acc)):
        out[f"{name}_median_ms"] = statistics.median(v) * ms
        out[f"{name}_mean_ms"] = statistics.fmean(v) * ms
    out["share_mean"] = (out["mask_mean_ms"] + out["accept_mean_ms"]) / out["forward_mean_ms"]
    return out


def main(argv=None) -> int:
    os.environ.setdefault("RWKVPY_BACKGROUND_COMPILE", "0")  # time the kernels, not a first run
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a model file (default: a synthesized one)")
    ap.add_argument("--synth", default="v7-0.1b", help="rwkvpy.synth preset (v7-0.1b)")
    ap.add_argument("--type", default="q4_0", help="its weight type (q4_0)")
    ap.add_argument("--work-dir", default="/tmp/rwkvload")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=300, help="timed steps per constraint")
    ap.add_argument("--max-tokens", type=int, default=200, help="per sequence")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import rwkvpy
    from rwkvpy.constrain import Constraint, vocabulary

    model = rwkvpy.load(model_path(args), threads=args.threads)
    tok = model.tokenizer()
    t0 = time.perf_counter()
    vocabulary(tok, model.config.vocab_size)
    vocab_s = time.perf_counter() - t0
    cases = {
        "json_schema": Constraint.json_schema(SCHEMA),
        "json_object": Constraint.json_object(),
        "gbnf": Constraint.grammar(GBNF),
    }
    rows = []
    for name, c in cases.items():
        r = run_case(model, tok, c, args)
        r["case"] = name
        rows.append(r)
    info = {
        "model": os.path.basename(model_path(args)),
        "vocab": model.config.vocab_size,
        "tokenizer": tok.name,
        "threads": args.threads,
        "vocabulary_build_s": vocab_s,
        "loadavg": os.getloadavg()[0],
        "rows": rows,
    }
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(
        f"{info['model']}  vocab {info['vocab']} ({info['tokenizer']})  threads {args.threads}  "
        f"llguidance vocabulary built in {vocab_s:.2f} s  load average {info['loadavg']:.2f}"
    )
    print(
        f"{'case':12} {'steps':>6} {'forward ms':>16} {'mask ms':>16} {'accept ms':>16} "
        f"{'share':>6}"
    )
    print(f"{'':12} {'':>6} {'median / mean':>16} {'median / mean':>16} {'median / mean':>16}")
    for r in rows:
        cells = [
            f"{r[k + '_median_ms']:.3f} / {r[k + '_mean_ms']:.3f}"
            for k in ("forward", "mask", "accept")
        ]
        print(
            f"{r['case']:12} {r['steps']:>6} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16} "
            f"{100 * r['share_mean']:5.1f}%"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
