"""Random-weight models with real shapes, in every format, through `rwkvpy bench`: one table.

    python benchmarks/bench_formats.py --presets v7-0.1b,v4-169m --types f32,f16,q8_0,q5_1,q4_0 \
        --threads 2 --dir /tmp/rwkvpy-bench --out bench.md

Each file is benchmarked in a fresh process (`python -m rwkvpy bench --json`), so load time and
peak RSS belong to that model alone. The memory bandwidth is measured in each of those runs and
the per-token time is reported against the bound it implies (weight bytes read per token /
bandwidth). Presets (rwkvpy.synth.PRESETS): v4-169m, v5-0.4b, v6-1.6b, v7-0.1b, v7-0.4b, v7-1.5b.
Random weights make noise for text but read the same bytes and do the same work per token.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def main() -> int:
    os.environ.setdefault("RWKVPY_BACKGROUND_COMPILE", "0")  # time the kernels, not a first run
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="v7-0.1b,v4-169m")
    p.add_argument("--types", default="f32,f16,q8_0,q5_1,q5_0,q4_1,q4_0")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", default="fast")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--dir", default="/tmp/rwkvpy-bench")
    p.add_argument("--out", default=None, help="write the markdown table here too")
    p.add_argument("--keep", action="store_true", help="keep the converted files")
    args = p.parse_args()

    from rwkvpy.convert import convert
    from rwkvpy.synth import save_random_model

    os.makedirs(args.dir, exist_ok=True)
    rows = []
    for preset in args.presets.split(","):
        src = os.path.join(args.dir, f"{preset}.pth")
        if not os.path.exists(src):
            print(f"making {src}", file=sys.stderr)
            save_random_model(src, preset)
        for typ in args.types.split(","):
            dst = os.path.join(args.dir, f"{preset}-{typ}.gguf")
            if not os.path.exists(dst):
                print(f"converting to {dst}", file=sys.stderr)
                convert(src, dst, type=typ, progress=False)
            r = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "rwkvpy",
                    "bench",
                    dst,
                    "--json",
                    "--threads",
                    str(args.threads),
                    "--mode",
                    args.mode,
                    "--tokens",
                    str(args.tokens),
                    "--prompt",
                    str(args.prompt),
                ],
                capture_output=True,
                text=True,
            )
            if r.returncode:
                print(f"{dst}: {r.stderr.strip()}", file=sys.stderr)
                continue
            res = json.loads(r.stdout)
            res.update(preset=preset, format=typ, file_mb=os.path.getsize(dst) / 1e6)
            rows.append(res)
            print(json.dumps(res), file=sys.stderr)
            if not args.keep:
                os.unlink(dst)
    lines = [
        f"threads {args.threads}, mode {args.mode}, per-token median over {args.tokens} tokens, "
        f"prompt {args.prompt} tokens",
        "",
        "| model | format | file MB | per token ms | bound ms | ratio | prompt tok/s | load s | peak RSS MB | GB/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['format']} | {r['file_mb']:.0f} | {r['per_token_ms']:.1f} | "
            f"{r['bound_ms']:.1f} | {r['bound_ratio']:.2f} | {r['prompt_tokens_per_s']:.0f} | "
            f"{r['load_s']:.2f} | {r['peak_rss_mb']:.0f} | {r['bandwidth_gbs']:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
