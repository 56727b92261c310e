"""``rwkvpy``: the parser of every verb and the one place that runs them (a user error is one
readable line and a non-zero exit)."""

from __future__ import annotations

import argparse
import sys

from ..errors import RwkvpyError
from .batch import add_batch_command
from .evaluate import add_lm_eval_command
from .models import add_model_commands
from .options import take_positionals
from .scoring import add_scoring_commands
from .serve import add_serve_command
from .text import add_text_commands


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rwkvpy", description="Fast RWKV inference in Python.")
    p.add_argument("--version", action="version", version=f"rwkvpy {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_model_commands(sub)
    add_text_commands(sub)
    add_scoring_commands(sub)
    add_lm_eval_command(sub)
    add_serve_command(sub)
    add_batch_command(sub)
    return p


def run_command(args) -> int:
    """Run a parsed command: a user error is one line on stderr and status 1, Ctrl-C 130."""
    from ..compiling import quiet

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
