"""``rwkvpy batch generate|perplexity``: many requests from JSONL or a folder, in one process or
on Ray (:mod:`rwkvpy.batch`)."""

from __future__ import annotations

import json
import sys

from ..batch import DEFAULT_BATCH_SIZE, run
from .options import add_model_argument, add_run_options, add_tokenizer_options, run_options


def add_batch_command(subparsers) -> None:
    """``rwkvpy batch generate|perplexity``."""
    p = subparsers.add_parser(
        "batch",
        help="generate from or score many requests (JSONL or a folder of .txt), in "
        "one process or on a Ray cluster",
        description="Run many requests: INPUT is JSONL (one request a line: id, prompt, "
        "sampling fields) or a folder of .txt files; OUTPUT is JSONL or Parquet "
        "(by extension), one row per request.",
    )
    sub = p.add_subparsers(dest="task", metavar="TASK")
    sub.required = True
    for task, helptext in (
        ("generate", "generate a completion for each request"),
        ("perplexity", "score each text: tokens, nll, perplexity"),
    ):
        t = sub.add_parser(task, help=helptext)
        add_model_argument(t, "input", "output")
        t.add_argument(
            "--ray",
            nargs="?",
            const="",
            default=None,
            metavar="ADDR",
            help="run on Ray (Ray Data, an actor pool): ADDR joins a cluster "
            "('auto' for the local one of 'ray start'); without ADDR a local "
            "Ray instance",
        )
        t.add_argument(
            "--concurrency",
            type=int,
            default=1,
            metavar="N",
            help="with --ray: actors (one model each) (default 1)",
        )
        t.add_argument(
            "--cpus-per-actor",
            type=float,
            default=1,
            metavar="N",
            help="with --ray: CPUs each actor reserves, and its threads unless "
            "--threads says (default 1)",
        )
        t.add_argument(
            "--batch-size",
            type=int,
            default=DEFAULT_BATCH_SIZE,
            metavar="N",
            help=f"requests per group, decoded together (default {DEFAULT_BATCH_SIZE})",
        )
        t.add_argument(
            "--resume",
            action="store_true",
            help="skip the requests whose ids are already in OUTPUT",
        )
        t.add_argument("--force", action="store_true", help="overwrite OUTPUT")
        add_tokenizer_options(t)
        if task == "generate":
            t.add_argument(
                "--max-tokens",
                type=int,
                default=None,
                metavar="N",
                help="max_tokens of requests that do not say (default 256)",
            )
            t.add_argument(
                "--seed",
                type=int,
                default=None,
                metavar="N",
                help="requests without a seed get N + their row index (default: "
                "a fresh seed each, written in OUTPUT)",
            )
        else:
            t.add_argument(
                "--chunk", type=int, default=None, metavar="N", help="tokens per model call"
            )
            t.add_argument(
                "--ignore-first",
                type=int,
                default=0,
                metavar="N",
                help="do not score the first N tokens of each text",
            )
        t.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
        t.add_argument("--json", action="store_true", help="print the summary as JSON")
        add_run_options(t)
        t.set_defaults(func=cmd_batch, command=f"batch {task}")


def cmd_batch(args) -> int:
    load_kw = run_options(args)
    if args.ray is not None and args.threads is None:
        load_kw.pop("threads")  # each actor: its --cpus-per-actor
    r = run(
        args.task,
        args.model,
        args.input,
        args.output,
        ray=args.ray is not None,
        address=args.ray or None,
        concurrency=args.concurrency,
        cpus_per_actor=args.cpus_per_actor,
        batch_size=args.batch_size,
        resume=args.resume,
        force=args.force,
        max_tokens=getattr(args, "max_tokens", None),
        seed=getattr(args, "seed", None),
        load_kw=load_kw,
        tokenizer=args.tokenizer,
        vocab=args.vocab,
        chunk=getattr(args, "chunk", None),
        ignore_first=getattr(args, "ignore_first", 0),
        progress=not (args.quiet or args.json),
    )
    if args.json:
        print(json.dumps(r))
    elif not args.quiet:
        print(
            f"{r['written']} rows written to {r['output']} ({r['skipped']} already there, "
            f"{r['errors']} failed) in {r['seconds']:.1f} s, {r['rows_per_s']:.2f} rows/s"
            f"{' on Ray' if r['ray'] else ''}",
            file=sys.stderr,
        )
    return 0
