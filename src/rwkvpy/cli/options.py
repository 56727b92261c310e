"""The options every verb shares: the model argument (``-m MODEL`` or the first positional)
and how a verb runs its model (threads, mode, device, caches, CPU level)."""

from __future__ import annotations

import argparse

from ..errors import RwkvpyError


def add_run_options(p) -> None:
    """--threads, --mode, --device, --gpu-layers: how a command runs its model."""
    p.add_argument("--threads", type=int, default=None, help="threads (default: physical cores)")
    p.add_argument(
        "--mode",
        choices=("fast", "exact", "reference"),
        default="fast",
        help="compute mode (default fast)",
    )
    p.add_argument(
        "--device", default="cpu", metavar="DEVICE", help="cpu (default), cuda or cuda:N"
    )
    p.add_argument(
        "--gpu-layers",
        type=int,
        default=None,
        metavar="N",
        help="with a GPU device: the first N layers there, the rest on the CPU",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="with a GPU device: fuse the decode step with torch.compile (faster "
        "tokens after a compilation at start)",
    )
    p.add_argument(
        "--no-cache",
        dest="cache",
        action="store_false",
        help="do not read or write the repack cache (the CPU's repacked weights, "
        "kept in the user cache folder: rwkvpy cache list)",
    )
    p.add_argument(
        "--cache-beside",
        action="store_true",
        help="keep the repack cache next to the model (MODEL.rwkvpy-cache) instead",
    )
    p.add_argument(
        "--cpu-capability",
        default=None,
        metavar="LEVEL",
        help="CPU kernels: generic, avx2, avx512, avx512_bf16 or amx (default: "
        "$RWKVPY_CPU_CAPABILITY, else this CPU's level)",
    )


MODEL_HELP = (
    "model: a file (.bin, .pth, .gguf, .safetensors), a Hugging Face folder, "
    "hf:OWNER/REPO/FILE, or demo (the demo model shipped with rwkvpy)"
)


class CliUsageError(RwkvpyError):
    """Command-line arguments that do not fit the verb (e.g. the model given twice)."""


def add_model_argument(
    p, *rest, dest: str = "model", required: bool = True, help: str = MODEL_HELP
) -> None:
    """The model of a verb, the same way in every verb: ``-m MODEL`` or the first positional
    argument, followed by the verb's own positionals ``rest`` (their names, e.g. ``"dst"``);
    :func:`take_positionals` sorts them after parsing. ``dest``: the model's attribute;
    ``required=False``: the verb has a default (None when not given)."""
    p.add_argument("-m", "--model", dest=dest, metavar="MODEL", default=None, help=help)
    names = " ".join(n.upper() for n in rest)
    p.add_argument(
        "positionals",
        nargs="*",
        metavar=f"[MODEL] {names}".rstrip(),
        help=f"the model (unless -m is given){', then ' + names if names else ''}",
    )
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
            raise CliUsageError(
                f"the model is given twice ({getattr(args, dest)!r} with -m and "
                f"{pos[0]!r}): usage: {usage}"
            )
        setattr(args, dest, pos.pop(0))
    elif len(pos) != len(rest):
        raise CliUsageError(
            f"expected {len(rest)} or {len(rest) + 1} arguments, got {len(pos)}: usage: {usage}"
        )
    for name, value in zip(rest, pos):
        setattr(args, name, value)
    if getattr(args, dest) is None and args._model_required:
        raise CliUsageError(f"no model given: usage: {usage}")


def run_options(args) -> dict:
    """The keyword arguments of rwkvpy.load for the options of :func:`add_run_options`."""
    return {
        "mode": args.mode,
        "threads": args.threads,
        "device": args.device,
        "gpu_layers": args.gpu_layers,
        "compile": args.compile,
        "cache": "beside" if args.cache and args.cache_beside else args.cache,
        "cpu_capability": args.cpu_capability,
    }


TOKENIZER_HELP = (
    "world, neox or bytes (default: the vocabulary stored in the model file, else "
    "the one rwkvpy ships for the model's vocabulary size)"
)


def add_tokenizer_options(p, help: str = TOKENIZER_HELP) -> None:
    """--tokenizer KIND and --vocab PATH: which tokenizer a verb uses (see
    :func:`rwkvpy.formats.vocabulary.model_tokenizer`)."""
    p.add_argument("--tokenizer", choices=("world", "neox", "bytes"), default=None, help=help)
    p.add_argument(
        "--vocab",
        metavar="PATH",
        default=None,
        help="a World vocabulary file (rwkv_vocab_v20230424.txt format) or a NeoX "
        "tokenizer.json, instead of the model file's or the shipped one",
    )


def int_at_least(lo: int):
    """An argparse ``type`` for an integer option that must be ``lo`` or more (0: a count that
    may be zero, 1: a size); a bad value is argparse's one-line usage error."""

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be {lo} or more, got {v}")
        return v

    return parse
