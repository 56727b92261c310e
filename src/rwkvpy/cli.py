"""The ``rwkvpy`` command line. Every user error is one readable line and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import sys


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_info(args) -> int:
    import rwkvpy

    s = rwkvpy.inspect(args.model).summary()
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"file:        {s['path']} ({_fmt_bytes(s['file_size'])}, {s['format']} format)")
    for k, v in s.get("file", {}).items():
        print(f"  {k}: {v}")
    print(f"version:     {s['architecture']}")
    heads = f", {s['n_head']} heads of {s['head_size']}" if s["n_head"] else ""
    print(f"dims:        n_embd {s['n_embd']}, n_layer {s['n_layer']}, vocab {s['vocab_size']}, "
          f"ffn {s['n_ffn']}{heads}")
    print(f"parameters:  {s['params']:,}")
    print("tensors:")
    for typ, count in sorted(s["tensor_types"].items()):
        print(f"  {typ:5s} {count:4d} tensors  {_fmt_bytes(s['tensor_bytes'][typ])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rwkvpy", description="Fast RWKV inference in Python.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    info = sub.add_parser("info", help="show what a model file holds")
    info.add_argument("model", help="model file (.bin or .pth)")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=cmd_info)
    return p


def main(argv=None) -> int:
    from .errors import RwkvpyError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RwkvpyError as e:
        print(f"rwkvpy: error: {e}", file=sys.stderr)
        return 1
    except (OSError, MemoryError) as e:
        print(f"rwkvpy: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rwkvpy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
