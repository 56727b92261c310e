"""The ``rwkvpy`` command line. Every user error is one readable line and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import RwkvpyError


def add_run_options(p) -> None:
    """--threads, --mode, --device, --gpu-layers: how a command runs its model."""
    p.add_argument("--threads", type=int, default=None, help="threads (default: physical cores)")
    p.add_argument("--mode", choices=("fast", "exact", "reference"), default="fast",
                   help="compute mode (default fast)")
    p.add_argument("--device", default="cpu", metavar="DEVICE",
                   help="cpu (default), cuda or cuda:N")
    p.add_argument("--gpu-layers", type=int, default=None, metavar="N",
                   help="with a GPU device: the first N layers there, the rest on the CPU")
    p.add_argument("--compile", action="store_true",
                   help="with a GPU device: fuse the decode step with torch.compile (faster "
                        "tokens after a compilation at start)")
    p.add_argument("--no-cache", dest="cache", action="store_false",
                   help="do not read or write the repack cache (the CPU's repacked weights, "
                        "kept in the user cache folder: rwkvpy cache list)")
    p.add_argument("--cache-beside", action="store_true",
                   help="keep the repack cache next to the model (MODEL.rwkvpy-cache) instead")
    p.add_argument("--cpu-capability", default=None, metavar="LEVEL",
                   help="CPU kernels: generic, avx2, avx512, avx512_bf16 or amx (default: "
                        "$RWKVPY_CPU_CAPABILITY, else this CPU's level)")


MODEL_HELP = ("model: a file (.bin, .pth, .gguf, .safetensors), a Hugging Face folder, "
              "hf:OWNER/REPO/FILE, or demo (the demo model shipped with rwkvpy)")


class CliUsageError(RwkvpyError):
    """Command-line arguments that do not fit the verb (e.g. the model given twice)."""


def add_model_argument(p, *rest, dest: str = "model", required: bool = True,
                       help: str = MODEL_HELP) -> None:
    """The model of a verb, the same way in every verb: ``-m MODEL`` or the first positional
    argument, followed by the verb's own positionals ``rest`` (their names, e.g. ``"dst"``);
    :func:`take_positionals` sorts them after parsing. ``dest``: the model's attribute;
    ``required=False``: the verb has a default (None when not given)."""
    p.add_argument("-m", "--model", dest=dest, metavar="MODEL", default=None, help=help)
    names = " ".join(n.upper() for n in rest)
    p.add_argument("positionals", nargs="*", metavar=f"[MODEL] {names}".rstrip(),
                   help=f"the model (unless -m is given){', then ' + names if names else ''}")
    p.set_defaults(_rest=rest, _model_dest=dest, _model_required=required)


def take_positionals(args) -> None:
    """Assign the positionals of a verb made with :func:`add_model_argument`."""
    rest = getattr(args, "_rest", None)
    if rest is None:
        return
    dest, pos = args._model_dest, list(args.positionals)
    verb = getattr(args, "command", None) or "this command"
    usage = f"rwkvpy {verb} [MODEL | -m MODEL] {' '.join(n.upper() for n in rest)}".rstrip()
    if len(pos) == len(rest) + 1:
        if getattr(args, dest) is not None:
            raise CliUsageError(f"the model is given twice ({getattr(args, dest)!r} with -m and "
                                f"{pos[0]!r}): usage: {usage}")
        setattr(args, dest, pos.pop(0))
    elif len(pos) != len(rest):
        raise CliUsageError(f"expected {len(rest)} or {len(rest) + 1} arguments, got "
                            f"{len(pos)}: usage: {usage}")
    for name, value in zip(rest, pos):
        setattr(args, name, value)
    if getattr(args, dest) is None and args._model_required:
        raise CliUsageError(f"no model given: usage: {usage}")


def run_options(args) -> dict:
    """The keyword arguments of rwkvpy.load for the options of :func:`add_run_options`."""
    return {"mode": args.mode, "threads": args.threads, "device": args.device,
            "gpu_layers": args.gpu_layers, "compile": args.compile,
            "cache": "beside" if args.cache and args.cache_beside else args.cache,
            "cpu_capability": args.cpu_capability}


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
    print(f"dims:        n_embd {s['n_embd']}, n_layer {s['n_layer']}, vocab {s['vocab_size']}, "
          f"ffn {s['n_ffn']}{heads}")
    tok = s.get("file", {}).get("tokenizer")
    if tok is None:
        from .tokenizers import _BY_SIZE

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
    return (f"kernels:     mode {k['mode']}, CPU level {c['level']} ({how}{emu})\n"
            f"  products:  {prods}\n"
            f"  sequences: {k['recurrence']}; one token: {k['step']}")


def cmd_bench(args) -> int:
    from . import bench

    say = None if (args.quiet or args.json) else (lambda m: print(f"... {m}", file=sys.stderr))
    r = bench.run(args.model, tokens=args.tokens, prompt=args.prompt, progress=say,
                  **run_options(args))
    print(json.dumps(r) if args.json else bench.format_report(r))
    return 0


def cmd_cache(args) -> int:
    from .kernels import cache

    if args.action == "clear":
        removed = cache.clear()
        if not args.quiet:
            print(f"removed {len(removed)} repack cache files from {cache.folder()}")
        return 0
    entries = cache.entries()
    total = sum(e["bytes"] for e in entries)
    if args.json:
        print(json.dumps({"folder": cache.folder(), "bytes": total,
                          "limit_bytes": cache.max_bytes(), "entries": entries}, indent=2))
        return 0
    print(f"repack cache: {cache.folder()} ({_fmt_bytes(total)} of "
          f"{_fmt_bytes(cache.max_bytes())}, ${cache.MAX_ENV} sets the limit)")
    for e in entries:
        print(f"  {_fmt_bytes(e['bytes']):>10s}  {e['model'] or '?'}")
    return 0


def cmd_convert(args) -> int:
    from .convert import convert

    result = convert(args.src, args.dst, type=args.type, quantize_head=args.quantize_head,
                     force=args.force, progress=not args.quiet, tokenizer=args.tokenizer,
                     vocab=args.vocab)
    if not args.quiet:
        print(result.summary())
    return 0


def _add_convert_options(p) -> None:
    p.add_argument("--quantize-head", action="store_true",
                   help="quantize head.weight too (kept F16 by default, as rwkv.cpp does)")
    p.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    p.add_argument("--tokenizer", metavar="KIND", default=None,
                   help="world, neox or bytes: stored in a GGUF (default: from the source, or "
                        "guessed from the vocabulary size)")
    p.add_argument("--vocab", metavar="PATH", default=None,
                   help="vocabulary file to store in a GGUF: rwkv_vocab_v20230424.txt format or "
                        "a tokenizer.json (default: the source's, else the one rwkvpy ships)")


def cmd_merge_lora(args) -> int:
    import warnings

    from .lora import merge_lora

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = merge_lora(args.base, args.lora, args.dst, args.alpha, type=args.type,
                            force=args.force, progress=not args.quiet)
    for w in caught:
        print(f"rwkvpy: warning: {w.message}", file=sys.stderr)
    if not args.quiet:
        print(f"merged LoRA into {len(report['merged'])} matrices, replaced "
              f"{len(report['replaced'])} tensors: {args.dst}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rwkvpy", description="Fast RWKV inference in Python.")
    p.add_argument("--version", action="version", version=f"rwkvpy {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    info = sub.add_parser("info", help="show what a model file holds")
    add_model_argument(info)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.add_argument("--kernels", action="store_true",
                      help="load the model (with the run options below) and show which "
                           "kernels run")
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

    ml = sub.add_parser("merge-lora", help="merge a LoRA checkpoint (Blealtan's RWKV-LM-LoRA) "
                        "into a model")
    add_model_argument(ml, "lora", "dst", dest="base",
                       help="base model (float: F32, F16 or BF16); then LORA: the LoRA "
                            "checkpoint (.pth), DST: the output (.gguf, .bin or .pth)")
    ml.add_argument("--alpha", type=float, required=True, help="lora_alpha used in training")
    ml.add_argument("--type", default="f16", help="type of the output's matrices (default f16)")
    ml.add_argument("--force", action="store_true", help="overwrite DST")
    ml.add_argument("--quiet", action="store_true", help="no progress bar")
    ml.set_defaults(func=cmd_merge_lora)

    types = "f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k, q4_k_m, q5_k_m"
    conv = sub.add_parser(
        "convert", help="convert a model to GGUF (.gguf) or rwkv.cpp (.bin), optionally quantized",
        description="Convert SRC (.pth, .bin, .gguf, .safetensors or a Hugging Face folder) to "
                    "DST; the extension of DST picks the format: .gguf or .bin (rwkv.cpp).")
    add_model_argument(conv, "dst", dest="src",
                       help=f"source {MODEL_HELP}; then DST: the output file, .gguf or .bin")
    conv.add_argument("--type", default="f16", metavar="TYPE",
                      help=f"type of the matrices: {types} (default f16)")
    _add_convert_options(conv)
    conv.set_defaults(func=cmd_convert)

    quant = sub.add_parser("quantize", help="short form of convert: rwkvpy quantize SRC DST TYPE",
                           description="Same as 'rwkvpy convert SRC DST --type TYPE'.")
    add_model_argument(quant, "dst", "type", dest="src",
                       help=f"source {MODEL_HELP}; then DST: the output file, .gguf or .bin, "
                            f"and TYPE: {types}")
    _add_convert_options(quant)
    quant.set_defaults(func=cmd_convert)
    from .cli_eval import add_eval_commands
    from .cli_lm_eval import add_lm_eval_command
    from .cli_text import add_text_commands
    from .server.cli import add_serve_command

    add_text_commands(sub)
    add_eval_commands(sub)
    add_lm_eval_command(sub)
    add_serve_command(sub)
    from .batch import add_batch_command

    add_batch_command(sub)
    return p


def run_command(args) -> int:
    """Run a parsed command: a user error is one line on stderr and status 1, Ctrl-C 130."""
    from .compiling import quiet

    try:
        take_positionals(args)
        # no first-run compile notice on stderr with --quiet or --json (rwkvpy.compiling)
        with quiet(bool(getattr(args, "quiet", False) or getattr(args, "json", False))):
            return args.func(args)
    except (RwkvpyError, OSError, MemoryError) as e:
        print(f"rwkvpy: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rwkvpy: interrupted", file=sys.stderr)
        return 130


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rwkvpy")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree
        return "unknown"


def main(argv=None) -> int:
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
