"""``rwkvpy eval``: lm-evaluation-harness tasks on an rwkvpy model, in this process.

``add_lm_eval_command(subparsers)`` adds the verb; :func:`run_tasks` is what it runs (also
usable from Python). lm-eval is an optional extra (``pip install 'rwkvpy[eval]'``), imported only
when the verb runs. The model is :class:`rwkvpy.lm_eval_model.RwkvpyLM`.

Tasks are named as lm-eval names them (``lambada_openai``, ``hellaswag``, ``arc_easy``, a group
such as ``mmlu``), or defined in YAML files in the folders of ``--include-path``. lm-eval's own
index of its ~14,000 tasks takes seconds to build: when every task named is found in
``--include-path``, only those folders are indexed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time

from ..errors import RwkvpyError


class EvalError(RwkvpyError):
    """``rwkvpy eval`` cannot run: lm-eval missing, an unknown task, a task lm-eval fails on."""


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as e:
        raise EvalError(
            f"rwkvpy eval needs EleutherAI's lm-evaluation-harness ({e}): "
            "pip install 'rwkvpy[eval]'"
        ) from None


def _notice(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"rwkvpy: {msg}", file=sys.stderr, flush=True)


def task_manager(tasks, include_path=None, quiet=False):
    """An lm-eval TaskManager that knows every task in ``tasks`` (names, or paths of task YAML
    files): the ``include_path`` folders alone when they hold them all, else with lm-eval's own
    tasks; EvalError naming any task still unknown, with the nearest names."""
    from lm_eval.tasks import TaskManager

    paths = list(include_path or [])
    for p in paths:
        if not os.path.isdir(p):
            raise EvalError(f"--include-path {p}: no such folder")
    names = [t for t in tasks if not os.path.isfile(t)]  # a task's YAML file is taken as is
    if paths or not names:
        tm = TaskManager(include_path=paths or None, include_defaults=False)
        if all(t in tm.all_tasks for t in names):
            return tm
    _notice(quiet, "indexing lm-eval's tasks (a few seconds)")
    tm = TaskManager(include_path=paths or None)
    unknown = [t for t in names if t not in tm.all_tasks]
    if unknown:
        import difflib

        near = difflib.get_close_matches(unknown[0], tm.all_tasks, n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise EvalError(
            f"unknown task {unknown[0]!r} (lm-eval knows {len(tm.all_tasks)} tasks "
            f"and groups; tasks of your own: --include-path DIR){hint}"
        )
    return tm


def _clean(v):
    """JSON-safe: non-finite floats become None, containers recursively."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


@contextlib.contextmanager
def _quieted(quiet: bool):
    """lm-eval prints some notices to stdout: for the block, what it prints goes to stderr,
    so that stdout holds only rwkvpy's table or JSON. With ``quiet``: lm-eval's and datasets'
    logging off and whatever they print (their progress bars included) dropped."""
    import io
    import logging

    if not quiet:
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def run_tasks(
    model,
    tasks,
    include_path=None,
    limit=None,
    num_fewshot=None,
    batch_size=16,
    quiet=False,
    tasks_index=None,
    bootstrap_iters=100000,
) -> dict:
    """Run lm-eval ``tasks`` on ``model`` (an rwkvpy.Model, a model reference, or an
    RwkvpyLM); lm-eval's results dict (``results``, ``groups``, ``n-shot``, ``versions``,
    ``configs``, ...). ``tasks_index``: a TaskManager from :func:`task_manager` to reuse;
    ``bootstrap_iters``: resamples for the standard errors of metrics that need them (lm-eval's
    default; 0 leaves those out)."""
    _import_lm_eval()
    tasks = list(tasks)
    if not tasks:
        raise EvalError("no task given: usage: rwkvpy eval -m MODEL TASK...")
    with _quieted(quiet):
        import lm_eval

        from ..lm_eval_model import RwkvpyLM

        tm = tasks_index or task_manager(tasks, include_path, quiet)
        lm = (
            model
            if isinstance(model, RwkvpyLM)
            else RwkvpyLM(model, batch_size=batch_size, progress=not quiet)
        )
        try:
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                task_manager=tm,
                num_fewshot=num_fewshot,
                limit=limit,
                bootstrap_iters=bootstrap_iters,
                log_samples=False,
            )
        except RwkvpyError:
            raise
        except Exception as e:  # noqa: BLE001 - lm-eval's and datasets' errors: one line
            line = next((s.strip() for s in str(e).splitlines() if s.strip()), "")
            hint = ""
            if any(w in line.lower() for w in ("connect", "offline", "reach", "internet")):
                hint = (
                    " (the task's data set is downloaded from the Hugging Face hub: "
                    "this needs network access, or a local copy in its cache)"
                )
            raise EvalError(
                f"lm-eval failed on {', '.join(tasks)}: {type(e).__name__}: {line}{hint}"
            ) from None
    if out is None:  # pragma: no cover - only on non-zero ranks of distributed runs
        raise EvalError("lm-eval returned no results")
    return dict(out)


def summary(out: dict, model: str, seconds: float) -> dict:
    """The JSON of ``rwkvpy eval``: the metrics per task and group, and how they were made."""
    import lm_eval

    keep = (
        "results",
        "groups",
        "group_subtasks",
        "n-shot",
        "n-samples",
        "versions",
        "higher_is_better",
    )
    res = {k: out[k] for k in keep if k in out}
    res.update(model=model, lm_eval_version=lm_eval.__version__, seconds=round(seconds, 3))
    return _clean(res)


def cmd_eval(args) -> int:
    from .options import run_options

    _import_lm_eval()
    if args.model is None:
        raise EvalError("no model given: usage: rwkvpy eval -m MODEL TASK...")
    import rwkvpy

    from ..lm_eval_model import RwkvpyLM

    t0 = time.perf_counter()
    opts = run_options(args)
    if not args.tasks:
        raise EvalError("no task given: usage: rwkvpy eval -m MODEL TASK...")
    quiet = args.quiet or args.json
    with _quieted(quiet):  # every task found before the model loads
        tm = task_manager(args.tasks, args.include_path, quiet)
    model = rwkvpy.load(args.model, **opts)
    lm = RwkvpyLM(
        model, batch_size=args.batch_size, prefix_token=args.prefix_token, progress=not quiet
    )
    out = run_tasks(
        lm,
        args.tasks,
        args.include_path,
        args.limit,
        args.num_fewshot,
        quiet=quiet,
        tasks_index=tm,
        bootstrap_iters=args.bootstrap_iters,
    )
    result = summary(out, args.model, time.perf_counter() - t0)
    if args.output:
        from ..formats.atomic import atomic_write

        with atomic_write(args.output, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
        return 0
    from lm_eval.utils import make_table

    print(make_table(out))
    if out.get("groups"):
        print(make_table(out, "groups"))
    if not args.quiet:
        print(f"model {args.model}, {result['seconds']:.1f} s, lm-eval {result['lm_eval_version']}")
    return 0


def add_lm_eval_command(subparsers) -> None:
    from .options import MODEL_HELP, add_run_options, int_at_least

    p = subparsers.add_parser(
        "eval",
        help="run lm-evaluation-harness tasks (accuracy, perplexity) on a model",
        description="Run EleutherAI's lm-evaluation-harness TASKs (lambada_openai, hellaswag, "
        "arc_easy, ..., or tasks of your own with --include-path) on MODEL in this "
        "process and print lm-eval's table. Needs pip install 'rwkvpy[eval]'; "
        "lm-eval's own tasks download their data sets from the Hugging Face hub.",
    )
    p.add_argument("-m", "--model", metavar="MODEL", default=None, help=MODEL_HELP)
    p.add_argument(
        "tasks",
        nargs="*",
        metavar="TASK",
        help="lm-eval task or group names, or paths of task YAML files",
    )
    p.add_argument(
        "--include-path",
        action="append",
        metavar="DIR",
        default=None,
        help="a folder of lm-eval task YAML files (may be repeated)",
    )
    p.add_argument(
        "--limit",
        type=int_at_least(1),
        default=None,
        metavar="N",
        help="only the first N documents of each task (for a quick look)",
    )
    p.add_argument(
        "--num-fewshot",
        type=int_at_least(0),
        default=None,
        metavar="N",
        help="examples in each prompt (default: the task's own)",
    )
    p.add_argument(
        "--batch-size",
        type=int_at_least(1),
        default=16,
        metavar="N",
        help="continuations scored side by side (default 16)",
    )
    p.add_argument(
        "--prefix-token",
        type=int_at_least(0),
        default=0,
        metavar="ID",
        help="the token whole documents and empty contexts are conditioned on "
        "(default 0, RWKV's end-of-text token; a model that never saw it, "
        "such as the byte-level demo, may do better from 10, a newline)",
    )
    p.add_argument(
        "--bootstrap-iters",
        type=int_at_least(0),
        default=100000,
        metavar="N",
        help="resamples for the standard errors of metrics such as perplexity "
        "(default 100000, as lm-eval; 0: leave them out)",
    )
    add_run_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object, no table")
    p.add_argument(
        "--output", metavar="FILE", default=None, help="also write the results as JSON to FILE"
    )
    p.add_argument("--quiet", action="store_true", help="no progress or log output")
    p.set_defaults(func=cmd_eval)
