"""``python -m rwkvpy.server -m MODEL [options]``: the same as ``rwkvpy serve``."""

from __future__ import annotations

import argparse
import sys

from ..cli.serve import add_serve_arguments, cmd_serve


def main(argv=None) -> int:
    from ..cli.options import take_positionals
    from ..errors import RwkvpyError

    p = argparse.ArgumentParser(
        prog="python -m rwkvpy.server",
        description="Serve an RWKV model over an OpenAI-compatible API.",
    )
    add_serve_arguments(p)
    args = p.parse_args(argv)
    try:
        take_positionals(args)
        return cmd_serve(args)
    except (RwkvpyError, OSError) as e:
        print(f"rwkvpy: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
