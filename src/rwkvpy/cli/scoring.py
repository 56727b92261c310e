"""The evaluation commands of the ``rwkvpy`` command line: ``perplexity`` and ``compare``.

``add_scoring_commands(subparsers)`` adds them to an argparse subparsers object (:mod:`rwkvpy.cli.main`'s
``build_parser`` calls it); each sets ``func`` to a function taking the parsed arguments and
returning the exit status. User errors are raised as :class:`~rwkvpy.errors.RwkvpyError`
subclasses, for the caller to print as one line.
"""

from __future__ import annotations

import json
import math
import os
import sys

from ..compare import DEFAULT_TYPES
from ..errors import RwkvpyError
from ..perplexity import DEFAULT_CHUNK
from .options import (
    MODEL_HELP,
    add_model_argument,
    add_run_options,
    add_tokenizer_options,
    int_at_least,
    run_options,
)


class EvalCliError(RwkvpyError):
    """A usage error of an evaluation command (a missing file, an empty text, a bad count)."""


# -- the text ------------------------------------------------------------------------------------
def read_text(path: str) -> str:
    """A UTF-8 text file ('-' = stdin); one-line errors for a missing, empty or non-UTF-8 file."""
    try:
        if path == "-":
            raw, name = sys.stdin.buffer.read(), "<stdin>"
        else:
            with open(path, "rb") as f:
                raw, name = f.read(), path
    except FileNotFoundError:
        raise EvalCliError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise EvalCliError(f"{path}: is a directory, expected a text file") from None
    if not raw:
        raise EvalCliError(f"{name}: the file is empty: nothing to evaluate")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EvalCliError(
            f"{name}: not a UTF-8 text file: invalid byte 0x{raw[e.start]:02x} "
            f"at byte offset {e.start} ({e.reason})"
        ) from None


def _tokenizer(kind, vocab_path, info):
    """The tokenizer: --vocab, else the vocabulary the file holds (GGUF), else the one rwkvpy
    ships for --tokenizer, the kind the file names or its vocabulary size."""
    from ..formats.vocabulary import model_tokenizer

    return model_tokenizer(info.path, info.vocab_size, kind, vocab_path)


def _tokens(args, info) -> tuple[list, str]:
    """(token ids of the text, tokenizer name), after --max-tokens, checked for --ignore-first."""
    from ..perplexity import check_scorable

    text = read_text(args.text)
    tok = _tokenizer(args.tokenizer, args.vocab, info)
    ids = tok.encode(text)
    n_all = len(ids)
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    what = (
        args.text
        if args.max_tokens is None or n_all <= args.max_tokens
        else (f"{args.text} cut at --max-tokens {args.max_tokens}")
    )
    check_scorable(len(ids), args.ignore_first, what)
    return ids, tok.name


def _model_path(path: str) -> str:
    """The model reference's file (rwkvpy.hub: demo, hf:, a path)."""
    from ..hub import resolve_model

    path = resolve_model(path)
    if not os.path.exists(path):
        raise EvalCliError(f"{path}: no such model file")
    return path


# -- perplexity ----------------------------------------------------------------------------------
def cmd_perplexity(args) -> int:
    import rwkvpy

    from ..perplexity import perplexity

    path = _model_path(args.model)
    info = rwkvpy.inspect(path)
    ids, tok_name = _tokens(args, info)  # all input checks before the model loads
    model = rwkvpy.load(path, **run_options(args))
    model.forward(ids[:16])  # loads the compiled kernels, so that tokens/s is the steady rate
    r = perplexity(
        model,
        ids,
        chunk=args.chunk,
        ignore_first=args.ignore_first,
        progress=not (args.quiet or args.json),
    )
    out = {
        "model": path,
        "text": args.text,
        "tokenizer": tok_name,
        **r.to_dict(),
        "threads": model_threads(),
        "mode": args.mode,
    }
    if args.json:
        print(json.dumps(out))
        return 0
    n = out["threads"]
    print(
        f"model:       {path} ({info.version.label}, mode {args.mode}, {n} thread"
        f"{'' if n == 1 else 's'})"
    )
    name = "<stdin>" if args.text == "-" else args.text
    print(f"text:        {name} ({r.tokens_total} tokens, {tok_name} tokenizer)")
    why = (
        "all but the first, which has no prediction"
        if r.ignored == 1
        else f"the first {r.ignored} are context only"
    )
    print(f"scored:      {r.tokens} tokens ({why})")
    print(f"nll:         {r.nll:.6f} nats/token ({r.nll / math.log(2):.4f} bits/token)")
    print(f"perplexity:  {r.perplexity:.4f}")
    print(f"speed:       {r.tokens_per_s:.1f} tokens/s ({r.seconds:.2f} s)")
    return 0


def model_threads() -> int:
    import torch

    return torch.get_num_threads()


# -- compare ---------------------------------------------------------------------------------------
def cmd_compare(args) -> int:
    import rwkvpy

    from .. import compare as cmp

    path = _model_path(args.model)
    types = cmp.parse_types(args.types)
    if args.plot:
        cmp.check_plot_available()
    if args.reuse and args.out_dir is None:
        raise EvalCliError("--reuse needs --out-dir (the folder of the files to reuse)")
    info = rwkvpy.inspect(path)
    ids, _ = _tokens(args, info)
    result = cmp.compare(
        path,
        ids,
        types,
        out_dir=args.out_dir,
        reuse=args.reuse,
        ignore_first=args.ignore_first,
        chunk=args.chunk,
        bench_tokens=args.bench_tokens,
        **run_options(args),
        prompt=args.prompt,
        quantize_head=args.quantize_head,
        format=args.format,
        progress=not args.quiet,
    )
    if args.json == "-":
        cmp.write_json(result, "-")
    else:
        print(cmp.format_table(result))
        if args.json:
            cmp.write_json(result, args.json)
    if args.csv:
        cmp.write_csv(result, args.csv)
    if args.plot:
        cmp.plot(result, args.plot)
    return 0


# -- the parser ------------------------------------------------------------------------------------
def _add_common(p) -> None:
    add_model_argument(
        p, "text", help=MODEL_HELP + "; then FILE.TXT: the UTF-8 text to evaluate ('-' = stdin)"
    )
    add_tokenizer_options(p)
    p.add_argument(
        "--ignore-first",
        type=int_at_least(0),
        default=0,
        metavar="N",
        help="the first N tokens are context only: their predictions are not scored",
    )
    p.add_argument(
        "--max-tokens",
        type=int_at_least(1),
        default=None,
        metavar="N",
        help="use only the first N tokens of the text",
    )
    p.add_argument(
        "--chunk",
        type=int_at_least(1),
        default=DEFAULT_CHUNK,
        metavar="N",
        help=f"tokens per model call, the state carried between calls (default {DEFAULT_CHUNK})",
    )
    add_run_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress output")


def add_scoring_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "perplexity",
        help="perplexity of a model on a text file",
        description="Average negative log likelihood (nats per token) and perplexity of MODEL "
        "on FILE.txt: every token after the first (and after --ignore-first) is "
        "scored by the prediction made before it.",
    )
    _add_common(p)
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (nll, perplexity, tokens, tokens_per_s, ...)",
    )
    p.set_defaults(func=cmd_perplexity)

    c = subparsers.add_parser(
        "compare",
        help="quantize a model into several types and measure each",
        description="Convert MODEL into each type and measure perplexity on FILE.txt, latency "
        "per token, prompt speed, file size and resident memory (each type in a "
        "process of its own); prints one table sorted by perplexity.",
    )
    _add_common(c)
    c.add_argument(
        "--types",
        default=",".join(DEFAULT_TYPES),
        help=f"comma-separated types (default {','.join(DEFAULT_TYPES)}; also f32, bf16)",
    )
    c.add_argument(
        "--out-dir",
        metavar="DIR",
        default=None,
        help="keep the converted files in DIR (default: a temporary folder)",
    )
    c.add_argument(
        "--reuse",
        action="store_true",
        help="measure files already in --out-dir as they are instead of converting",
    )
    c.add_argument(
        "--format",
        choices=("gguf", "bin"),
        default=None,
        help="file format of the conversions (default: bin for a .bin model, else gguf)",
    )
    c.add_argument(
        "--quantize-head",
        action="store_true",
        help="quantize head.weight too (kept F16 by default, as rwkv.cpp does)",
    )
    c.add_argument(
        "--bench-tokens",
        type=int_at_least(1),
        default=32,
        metavar="N",
        help="decode steps timed per type (default 32)",
    )
    c.add_argument(
        "--prompt",
        type=int_at_least(1),
        default=512,
        metavar="N",
        help="prompt length timed per type (default 512)",
    )
    c.add_argument(
        "--json",
        metavar="FILE",
        default=None,
        help="write the results as JSON ('-': print JSON instead of the table)",
    )
    c.add_argument("--csv", metavar="FILE", default=None, help="write the results as CSV")
    c.add_argument(
        "--plot",
        metavar="FILE.png",
        default=None,
        help="plot perplexity against latency and file size (needs matplotlib)",
    )
    c.set_defaults(func=cmd_compare)
