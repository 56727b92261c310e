"""The verbs about model files: ``info``, ``bench``, ``cache``, ``convert``/``quantize``,
``merge-lora``."""

from __future__ import annotations

import json
import sys

from .options import MODEL_HELP, add_model_argument, add_run_options, run_options


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_info(args) -> int:
    import rwkvpy

    if args.kernels:
        model = rwkvpy.load(args.model, **run_options(args))
        s = {**model.info.summary(), "kernels": model.kernels}
    else:
        s = rwkvpy.inspect(args.model).summary()
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"file:        {s['path']} ({_fmt_bytes(s['file_size'])}, {s['format']} format)")
    for k, v in s.get("file", {}).items():
        if k != "tokenizer":  # printed below
            print(f"  {k}: {v}")
    print(f"version:     {s['architecture']}")
    heads = f", {s['n_head']} heads of {s['head_size']}" if s["n_head"] else ""
    print(
        f"dims:        n_embd {s['n_embd']}, n_layer {s['n_layer']}, vocab {s['vocab_size']}, "
        f"ffn {s['n_ffn']}{heads}"
    )
    tok = s.get("file", {}).get("tokenizer")
    if tok is None:
        from ..tokenizers import _BY_SIZE

        guess = _BY_SIZE.get(s["vocab_size"])
        tok = f"{guess} (from the vocabulary size)" if guess else "unknown"
    print(f"tokenizer:   {tok}")
    print(f"parameters:  {s['params']:,}")
    print("tensors:")
    for typ, count in sorted(s["tensor_types"].items()):
        print(f"  {typ:5s} {count:4d} tensors  {_fmt_bytes(s['tensor_bytes'][typ])}")
    if "kernels" in s:
        print(format_kernels(s["kernels"]))
    return 0


def format_kernels(k: dict) -> str:
    """The lines of ``Model.kernels`` in a text report."""
    c = k["cpu_capability"]
    how = "forced" if c["forced"] else "detected"
    emu = f", emulated on a {c['host']} CPU" if c["emulated"] else ""
    prods = ", ".join(f"{t} {name}" for t, name in k["products"].items())
    return (
        f"kernels:     mode {k['mode']}, CPU level {c['level']} ({how}{emu})\n"
        f"  products:  {prods}\n"
        f"  sequences: {k['recurrence']}; one token: {k['step']}"
    )


def cmd_bench(args) -> int:
    from .. import bench

    say = None if (args.quiet or args.json) else (lambda m: print(f"... {m}", file=sys.stderr))
    r = bench.run(
        args.model, tokens=args.tokens, prompt=args.prompt, progress=say, **run_options(args)
    )
    print(json.dumps(r) if args.json else bench.format_report(r))
    return 0


def cmd_cache(args) -> int:
    from ..kernels import cache

    if args.action == "clear":
        removed = cache.clear()
        if not args.quiet:
            print(f"removed {len(removed)} repack cache files from {cache.folder()}")
        return 0
    entries = cache.entries()
    total = sum(e["bytes"] for e in entries)
    if args.json:
        print(
            json.dumps(
                {
                    "folder": cache.folder(),
                    "bytes": total,
                    "limit_bytes": cache.max_bytes(),
                    "entries": entries,
                },
                indent=2,
            )
        )
        return 0
    print(
        f"repack cache: {cache.folder()} ({_fmt_bytes(total)} of "
        f"{_fmt_bytes(cache.max_bytes())}, ${cache.MAX_ENV} sets the limit)"
    )
    for e in entries:
        print(f"  {_fmt_bytes(e['bytes']):>10s}  {e['model'] or '?'}")
    return 0


def cmd_convert(args) -> int:
    from ..convert import convert

    result = convert(
        args.src,
        args.dst,
        type=args.type,
        quantize_head=args.quantize_head,
        force=args.force,
        progress=not args.quiet,
        tokenizer=args.tokenizer,
        vocab=args.vocab,
    )
    if not args.quiet:
        print(result.summary())
    return 0


def _add_convert_options(p) -> None:
    p.add_argument(
        "--quantize-head",
        action="store_true",
        help="quantize head.weight too (kept F16 by default, as rwkv.cpp does)",
    )
    p.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    p.add_argument(
        "--tokenizer",
        metavar="KIND",
        default=None,
        help="world, neox or bytes: stored in a GGUF (default: from the source, or "
        "guessed from the vocabulary size)",
    )
    p.add_argument(
        "--vocab",
        metavar="PATH",
        default=None,
        help="vocabulary file to store in a GGUF: rwkv_vocab_v20230424.txt format or "
        "a tokenizer.json (default: the source's, else the one rwkvpy ships)",
    )


def cmd_merge_lora(args) -> int:
    import warnings

    from ..lora import merge_lora

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = merge_lora(
            args.base,
            args.lora,
            args.dst,
            args.alpha,
            type=args.type,
            force=args.force,
            progress=not args.quiet,
        )
    for w in caught:
        print(f"rwkvpy: warning: {w.message}", file=sys.stderr)
    if not args.quiet:
        print(
            f"merged LoRA into {len(report['merged'])} matrices, replaced "
            f"{len(report['replaced'])} tensors: {args.dst}"
        )
    return 0


def add_model_commands(sub) -> None:
    """Add info, cache, bench, merge-lora, convert and quantize to an argparse subparsers object."""
    info = sub.add_parser("info", help="show what a model file holds")
    add_model_argument(info)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.add_argument(
        "--kernels",
        action="store_true",
        help="load the model (with the run options below) and show which kernels run",
    )
    add_run_options(info)
    info.set_defaults(func=cmd_info)

    ca = sub.add_parser("cache", help="list or clear the repack cache (the user cache folder)")
    ca.add_argument("action", choices=("list", "clear"))
    ca.add_argument("--json", action="store_true", help="list: print one JSON object")
    ca.add_argument("--quiet", action="store_true", help="clear: print nothing")
    ca.set_defaults(func=cmd_cache)

    b = sub.add_parser("bench", help="measure per-token latency, prompt speed, load time, memory")
    add_model_argument(b)
    b.add_argument("--tokens", type=int, default=32, help="decode steps timed (default 32)")
    b.add_argument("--prompt", type=int, default=512, help="prompt length (default 512)")
    add_run_options(b)
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--quiet", action="store_true", help="no progress messages")
    b.set_defaults(func=cmd_bench)

    ml = sub.add_parser(
        "merge-lora", help="merge a LoRA checkpoint (Blealtan's RWKV-LM-LoRA) into a model"
    )
    add_model_argument(
        ml,
        "lora",
        "dst",
        dest="base",
        help="base model (float: F32, F16 or BF16); then LORA: the LoRA "
        "checkpoint (.pth), DST: the output (.gguf, .bin or .pth)",
    )
    ml.add_argument("--alpha", type=float, required=True, help="lora_alpha used in training")
    ml.add_argument("--type", default="f16", help="type of the output's matrices (default f16)")
    ml.add_argument("--force", action="store_true", help="overwrite DST")
    ml.add_argument("--quiet", action="store_true", help="no progress bar")
    ml.set_defaults(func=cmd_merge_lora)

    types = "f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k, q4_k_m, q5_k_m"
    conv = sub.add_parser(
        "convert",
        help="convert a model to GGUF (.gguf) or rwkv.cpp (.bin), optionally quantized",
        description="Convert SRC (.pth, .bin, .gguf, .safetensors or a Hugging Face folder) to "
        "DST; the extension of DST picks the format: .gguf or .bin (rwkv.cpp).",
    )
    add_model_argument(
        conv,
        "dst",
        dest="src",
        help=f"source {MODEL_HELP}; then DST: the output file, .gguf or .bin",
    )
    conv.add_argument(
        "--type", default="f16", metavar="TYPE", help=f"type of the matrices: {types} (default f16)"
    )
    _add_convert_options(conv)
    conv.set_defaults(func=cmd_convert)

    quant = sub.add_parser(
        "quantize",
        help="short form of convert: rwkvpy quantize SRC DST TYPE",
        description="Same as 'rwkvpy convert SRC DST --type TYPE'.",
    )
    add_model_argument(
        quant,
        "dst",
        "type",
        dest="src",
        help=f"source {MODEL_HELP}; then DST: the output file, .gguf or .bin, and TYPE: {types}",
    )
    _add_convert_options(quant)
    quant.set_defaults(func=cmd_convert)
