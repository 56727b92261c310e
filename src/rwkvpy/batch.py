"""Batch jobs: generate from, or score, many requests; in one process or on a Ray cluster.

``rwkvpy batch generate|perplexity [MODEL | -m MODEL] INPUT OUTPUT [--ray [ADDR]]``

INPUT is a JSONL file, one request a line (``id``, ``prompt`` (or ``text``), and for generate
the fields of :class:`~rwkvpy.sampling.SamplingParams` (perplexity ignores them): ``max_tokens``, ``temperature``,
``top_p``, ``top_k``, ``min_p``, ``presence_penalty``, ``frequency_penalty``, ``penalty_decay``,
``logit_bias``, ``banned_tokens``, ``stop``, ``stop_tokens``, ``seed``, ``greedy``), or a folder
of ``.txt`` files (each one request, its id the file's path inside the folder). A request
without an ``id`` gets its line number. Every request is checked before any work starts.

OUTPUT is JSONL, or Parquet when its name ends in ``.parquet``: one row per request,

- generate: ``id``, ``text``, ``finish_reason``, ``prompt_tokens``, ``completion_tokens``,
  ``seed`` (the sampler's seed: the row is reproduced by it), ``error``;
- perplexity: ``id``, ``tokens`` (scored), ``nll`` (nats per token), ``perplexity``, ``error``.

``error`` is null, or the reason a request failed (an empty prompt, a text too short to score);
the other fields are then null. A failed request is a row too: the job goes on.

How the work is cut: requests are taken in input order in *groups* of ``batch_size``. A group
is the unit of work: the requests of a generate group are decoded together by the
:class:`~rwkvpy.engine.Engine` the server runs (each step one ``Model.forward_batch`` over the group,
each request sampling with its own seeded sampler, exactly as ``rwkvpy.generate`` does for one;
a group of one *is* ``generate``); a perplexity group scores its texts one after another with
:func:`rwkvpy.perplexity.perplexity` (sequence mode already runs a text's tokens together).

Without Ray the groups run one after another in this process. With Ray (``ray=True``) the
groups are the rows of a Ray Data dataset (one block each) mapped by ``map_batches`` over a
fixed pool of actors (one model per actor): the same groups, the same code, so with the same seeds,
``batch_size`` and threads, the rows are the same as in one process.

Exactly once, resumable: rows are appended to OUTPUT (JSONL; for Parquet a
``OUTPUT.partial.jsonl`` beside it, turned into the Parquet file at the end) as groups
complete. Ray retries the group of an actor that died on a restarted actor, and only the output
of a completed group reaches the driver, so every row is written once. ``resume=True`` reads
the ids already in OUTPUT and runs only the groups that miss some, writing only the missing
rows (a torn last line, from a killed run, is dropped first); groups keep their composition, so
a resumed job gives the rows an uninterrupted one would.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

from .errors import RwkvpyError

TASKS = ("generate", "perplexity")
SAMPLING_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "penalty_decay",
    "logit_bias",
    "banned_tokens",
    "stop",
    "stop_tokens",
    "seed",
    "greedy",
)
COLUMNS = {
    "generate": (
        "id",
        "text",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "seed",
        "error",
    ),
    "perplexity": ("id", "tokens", "nll", "perplexity", "error"),
}
DEFAULT_BATCH_SIZE = 8


class BatchError(RwkvpyError):
    """A bad batch input, output or option."""


# -- input ---------------------------------------------------------------------------------------
def _key(rid) -> str:
    """The identity of an id for --resume: 1 and "1" are different ids."""
    return json.dumps(rid, ensure_ascii=False, sort_keys=True)


def read_requests(path: str, task: str, *, max_tokens=None, seed=None) -> list[dict]:
    """The requests of INPUT, checked, as ``{"id", "prompt", "params"}`` dicts (generate:
    ``params`` are SamplingParams' keyword arguments with the defaults applied: ``max_tokens``
    for rows without one; ``seed + row index`` for rows without a seed when ``seed`` is given)."""
    if task not in TASKS:
        raise BatchError(f"unknown batch task {task!r}: use one of {', '.join(TASKS)}")
    if os.path.isdir(path):
        raw = _read_folder(path)
    elif os.path.exists(path):
        raw = _read_jsonl(path)
    else:
        raise BatchError(f"{path}: no such file or folder")
    if not raw:
        raise BatchError(f"{path}: no requests")
    from .sampling import SamplingParams

    out, seen = [], {}
    for index, (where, row) in enumerate(raw):
        rid = row.get("id", where[1] if isinstance(where, tuple) else where)
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise BatchError(f"{_at(where)}: 'id' must be a string or an integer, got {rid!r}")
        k = _key(rid)
        if k in seen:
            raise BatchError(f"{_at(where)}: id {rid!r} is also the id of {_at(seen[k])}")
        seen[k] = where
        has_p, has_t = "prompt" in row, "text" in row
        if has_p == has_t:
            raise BatchError(f"{_at(where)}: give exactly one of 'prompt' or 'text'")
        prompt = row["prompt" if has_p else "text"]
        if not isinstance(prompt, str):
            raise BatchError(
                f"{_at(where)}: the prompt must be a string, got {type(prompt).__name__}"
            )
        # perplexity ignores the sampling fields: one INPUT serves both tasks
        extra = sorted(set(row) - {"id", "prompt", "text", *SAMPLING_FIELDS})
        if extra:
            raise BatchError(
                f"{_at(where)}: unknown field{'s' if len(extra) > 1 else ''} "
                f"{', '.join(extra)}; a request takes id, prompt (or text) and "
                f"{', '.join(SAMPLING_FIELDS)}"
            )
        req: dict[str, Any] = {"id": rid, "index": index, "prompt": prompt}
        if task == "generate":
            params = {k: row[k] for k in SAMPLING_FIELDS if k in row and row[k] is not None}
            if max_tokens is not None:
                params.setdefault("max_tokens", max_tokens)
            if seed is not None:
                params.setdefault("seed", seed + index)
            if "logit_bias" in params and isinstance(params["logit_bias"], dict):
                try:  # JSON object keys are strings
                    params["logit_bias"] = {int(t): b for t, b in params["logit_bias"].items()}
                except ValueError:
                    raise BatchError(f"{_at(where)}: logit_bias keys must be token ids") from None
            try:
                SamplingParams(**params)
            except RwkvpyError as e:
                raise BatchError(f"{_at(where)}: {e}") from None
            req["params"] = params
        out.append(req)
    return out


def _at(where) -> str:
    return f"{where[0]} line {where[1]}" if isinstance(where, tuple) else where


def _read_jsonl(path: str) -> list:
    rows = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise BatchError(f"{path}: cannot read: {e.strerror}") from None
    with f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise BatchError(f"{path} line {n}: not JSON: {e}") from None
                if not isinstance(row, dict):
                    raise BatchError(f"{path} line {n}: a request is a JSON object")
                rows.append(((path, n), row))
        except UnicodeDecodeError:
            raise BatchError(f"{path}: not a UTF-8 text file") from None
    return rows


def _read_folder(path: str) -> list:
    rows = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            if not name.endswith(".txt"):
                continue
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path).replace(os.sep, "/")
            try:
                with open(full, encoding="utf-8") as f:
                    text = f.read()
            except UnicodeDecodeError:
                raise BatchError(f"{full}: not a UTF-8 text file") from None
            rows.append((rel, {"id": rel, "prompt": text}))
    return rows


def groups(requests: list, batch_size: int) -> list[list]:
    """The requests cut into groups of ``batch_size``, in input order (the unit of work)."""
    return [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]


# -- the work ------------------------------------------------------------------------------------
class BatchWorker:
    """One model and what runs a group of requests on it: in this process, or as a Ray Data
    actor (``__call__`` takes a block of encoded requests and returns their rows)."""

    def __init__(
        self,
        task: str,
        model: str,
        load_kw: dict | None = None,
        tokenizer=None,
        vocab=None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        chunk: int | None = None,
        ignore_first: int = 0,
    ):
        import rwkvpy

        self.task = task
        self.model = rwkvpy.load(model, **(load_kw or {}))
        self.tokenizer = self.model.tokenizer(tokenizer, vocab)
        self.chunk = chunk
        self.ignore_first = ignore_first
        self.engine = None
        if task == "generate":
            from .engine import Engine

            self.engine = Engine(
                self.model, self.tokenizer, cache=None, max_batch=max(1, batch_size)
            )
            self.engine.start()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()

    def run(self, reqs: list) -> list[dict]:
        """The rows of one group, in its order."""
        return self._generate(reqs) if self.task == "generate" else self._perplexity(reqs)

    def __call__(self, batch):
        """Ray Data: a batch of groups (a ``requests`` column, each a group's requests as
        JSON) -> one row per request: ``row`` (the output row as JSON) and ``pid`` (this
        actor's process, for the caller's progress and for tests)."""
        rows = []
        for text in batch.column("requests").to_pylist():
            rows += self.run(json.loads(text))
        return {
            "row": [json.dumps(r, ensure_ascii=False) for r in rows],
            "pid": [os.getpid()] * len(rows),
        }

    def _empty(self, req, error: str) -> dict:
        row = dict.fromkeys(COLUMNS[self.task])
        row.update(id=req["id"], error=error)
        return row

    def _generate(self, reqs: list) -> list[dict]:
        from .engine import Sequence
        from .generation import DoneEvent, ErrorEvent, TextEvent
        from .sampling import SamplingParams

        n = len(reqs)
        rows: list = [None] * n
        texts = [[] for _ in range(n)]
        lock, done = threading.Lock(), threading.Event()
        left = [0]

        def emitter(i):
            def emit(ev):
                if isinstance(ev, TextEvent):
                    texts[i].append(ev.text)
                    return
                req = reqs[i]
                if isinstance(ev, DoneEvent):
                    rows[i] = {
                        "id": req["id"],
                        "text": "".join(texts[i]),
                        "finish_reason": ev.finish_reason,
                        "prompt_tokens": ev.prompt_tokens,
                        "completion_tokens": ev.completion_tokens,
                        "seed": ev.seed,
                        "error": None,
                    }
                else:  # an ErrorEvent or a CancelledEvent
                    rows[i] = self._empty(
                        req, ev.message if isinstance(ev, ErrorEvent) else ev.reason
                    )
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()

            return emit

        seqs = []
        for i, req in enumerate(reqs):
            ids = self.tokenizer.encode(req["prompt"])
            if not ids:
                rows[i] = self._empty(
                    req,
                    "the prompt is empty: the model needs at least one "
                    "token to predict the next one",
                )
                continue
            seqs.append(Sequence(ids, SamplingParams(**req["params"]), emitter(i)))
        if seqs:
            left[0] = len(seqs)
            self.engine.submit(seqs)
            done.wait()
        return rows

    def _perplexity(self, reqs: list) -> list[dict]:
        from .perplexity import DEFAULT_CHUNK, perplexity

        rows = []
        for req in reqs:
            ids = self.tokenizer.encode(req["prompt"])
            try:
                r = perplexity(
                    self.model,
                    ids,
                    chunk=self.chunk or DEFAULT_CHUNK,
                    ignore_first=self.ignore_first,
                )
            except RwkvpyError as e:
                rows.append(self._empty(req, str(e)))
                continue
            rows.append(
                {
                    "id": req["id"],
                    "tokens": r.tokens,
                    "nll": r.nll,
                    "perplexity": r.perplexity,
                    "error": None,
                }
            )
        return rows


# -- output --------------------------------------------------------------------------------------
class Output:
    """OUTPUT, appended to group by group (see the module's docstring)."""

    def __init__(self, path: str, task: str, *, resume: bool = False, force: bool = False):
        self.path = path
        self.task = task
        self.parquet = path.lower().endswith(".parquet")
        self.log = path + ".partial.jsonl" if self.parquet else path
        self.done: set = set()
        if self.parquet:
            _need_pyarrow()
        there = [p for p in {self.path, self.log} if os.path.exists(p)]
        if resume:
            for p in there:
                self.done |= {_key(r["id"]) for r in self._read(p, repair=True)}
        elif there and not force and any(os.path.getsize(p) for p in there):
            raise BatchError(
                f"{there[0]} exists: give --resume to go on with it, or --force to start over"
            )
        else:
            for p in there:
                os.remove(p)
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise BatchError(f"{parent}: no such folder for OUTPUT")

    def _read(self, p: str, repair: bool = False) -> list[dict]:
        if p.lower().endswith(".parquet"):
            import pyarrow.parquet as pq

            return pq.read_table(p).to_pylist()
        with open(p, "rb") as f:
            data = f.read()
        end = data.rfind(b"\n") + 1
        if repair and end < len(data):  # a torn last line: the run was killed while writing
            with open(p, "r+b") as f:
                f.truncate(end)
        rows = []
        for n, line in enumerate(data[:end].splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    raise BatchError(f"{p} line {n}: not a row of a batch job's output") from None
        return rows

    def write(self, rows: list) -> list:
        """Append the rows not written yet; returns them."""
        new = [r for r in rows if _key(r["id"]) not in self.done]
        if new:
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new)
            with open(self.log, "a", encoding="utf-8") as f:
                f.write(text)
                f.flush()
            self.done |= {_key(r["id"]) for r in new}
        return new

    def finish(self) -> None:
        if not self.parquet or not os.path.exists(self.log):
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = self._read(self.path) if os.path.exists(self.path) else []
        rows += self._read(self.log)
        cols = COLUMNS[self.task]
        table = pa.table({c: [r.get(c) for r in rows] for c in cols})
        tmp = self.path + ".tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.path)
        os.remove(self.log)


def _need_pyarrow():
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise BatchError(
            "Parquet output needs pyarrow: pip install 'rwkvpy[ray]' or pip install pyarrow"
        ) from None


def read_output(path: str) -> list[dict]:
    """The rows of a batch job's OUTPUT (JSONL or Parquet)."""
    return Output.__new__(Output)._read(path)


# -- the job -------------------------------------------------------------------------------------
def run(
    task: str,
    model: str,
    input: str,
    output: str,
    *,
    ray: bool = False,
    address: str | None = None,
    concurrency: int = 1,
    cpus_per_actor: float = 1,
    batch_size: int = DEFAULT_BATCH_SIZE,
    resume: bool = False,
    force: bool = False,
    max_tokens: int | None = None,
    seed: int | None = None,
    load_kw: dict | None = None,
    tokenizer=None,
    vocab=None,
    chunk: int | None = None,
    ignore_first: int = 0,
    progress: bool = False,
    on_rows=None,
) -> dict:
    """Run a batch job (see the module's docstring); returns a summary. ``on_rows(rows, pid)``
    is called after each group is written (``pid``: the process that ran it)."""
    if batch_size < 1:
        raise BatchError(f"--batch-size must be at least 1, got {batch_size}")
    if concurrency < 1:
        raise BatchError(f"--concurrency must be at least 1, got {concurrency}")
    from .hub import resolve_model

    reqs = read_requests(input, task, max_tokens=max_tokens, seed=seed)
    model = resolve_model(model)  # once here: every actor loads this file
    if not os.path.exists(model):
        raise BatchError(f"{model}: no such model file")
    from .model import inspect

    inspect(model)  # a file that is no model fails here, not in every actor
    out = Output(output, task, resume=resume, force=force)
    todo = [g for g in groups(reqs, batch_size) if any(_key(r["id"]) not in out.done for r in g)]
    missing = sum(1 for g in todo for r in g if _key(r["id"]) not in out.done)
    worker_kw = {
        "task": task,
        "model": model,
        "load_kw": dict(load_kw or {}),
        "tokenizer": tokenizer,
        "vocab": vocab,
        "batch_size": batch_size,
        "chunk": chunk,
        "ignore_first": ignore_first,
    }
    bar = None
    if progress and missing:
        from tqdm import tqdm

        bar = tqdm(
            total=missing, unit="row", desc=f"batch {task}", file=sys.stderr, dynamic_ncols=True
        )
    written, errors = 0, 0
    t0 = time.perf_counter()
    try:
        source = (
            _ray_groups(todo, worker_kw, address, concurrency, cpus_per_actor)
            if ray
            else _local_groups(todo, worker_kw)
        )
        for rows, pid in source:
            new = out.write(rows)
            written += len(new)
            errors += sum(1 for r in new if r.get("error") is not None)
            if bar is not None:
                bar.update(len(new))
            if on_rows is not None:
                on_rows(new, pid)
        out.finish()
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    return {
        "task": task,
        "input": input,
        "output": output,
        "requests": len(reqs),
        "skipped": len(reqs) - missing,
        "written": written,
        "errors": errors,
        "seconds": seconds,
        "rows_per_s": written / seconds if seconds > 0 else 0.0,
        "ray": ray,
    }


def _local_groups(todo, worker_kw):
    if not todo:
        return
    w = BatchWorker(**worker_kw)
    try:
        for g in todo:
            yield w.run(g), os.getpid()
    finally:
        w.close()


def _ray_groups(todo, worker_kw, address, concurrency, cpus_per_actor):
    """Each group one row of a Ray Data dataset, mapped over a pool of ``concurrency``
    BatchWorker actors; yields each group's rows as its block comes back, in input order."""
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise BatchError(
            f"--ray needs Ray: pip install 'rwkvpy[ray]' ({e.name} is missing)"
        ) from None
    if not todo:
        return
    if worker_kw["load_kw"].get("threads") is None:
        worker_kw["load_kw"]["threads"] = max(1, int(cpus_per_actor))
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        # one dataset row per group, one block per group: a group is never split, and an
        # actor that dies loses (and Ray redoes) that one group
        items = [{"requests": json.dumps(g, ensure_ascii=False)} for g in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            BatchWorker,
            fn_constructor_kwargs=worker_kw,
            batch_size=1,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            num_cpus=cpus_per_actor,
        )
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            rows = [json.loads(s) for s in block.column("row").to_pylist()]
            pids = block.column("pid").to_pylist()
            yield rows, (pids[0] if pids else None)
    finally:
        if started:
            ray.shutdown()
