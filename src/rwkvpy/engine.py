"""Continuous batching: one thread owns the model and runs every request's sequences together.

The server's scheduler (:mod:`rwkvpy.server`) and the decoder of batch jobs' generate groups
(:mod:`rwkvpy.batch`). It sits below both front ends, which never import each other.

Each :class:`Sequence` is one generated text (one choice of an HTTP request, or one request of
a batch group) with its own
prompt tokens, starting state and :class:`~rwkvpy.generation.TokenLoop` (its sampler, seeded on
its own, decoder and stop conditions). The engine thread loops:

1. take the sequences submitted since the last iteration into the prefill queue (FIFO);
2. drop cancelled sequences (a client that went away, a server shutting down);
3. prefill: the sequence at the head of the queue looks up its longest cached prefix in the
   shared :class:`~rwkvpy.prefix_cache.PrefixCache`, then runs the rest of its prompt through
   ``model.forward`` in sequence mode, in pieces that end at the cache's checkpoints (multiples
   of ``cache.every``, as ``generate`` cuts them) and are never longer than ``max_chunk``;
   pieces run until ``prefill_budget`` tokens were processed in this iteration, so a long
   prompt delays the others' next token by a bounded amount. A sequence whose prompt is done
   joins the decode batch;
4. decode: every sequence in the batch samples its next token from its own logits; the tokens
   go through ``model.forward_batch`` together (groups of at most ``max_batch``), one pass over
   the weights for the whole group; each sequence then decodes its token, checks its stop
   strings and emits its text.

A sequence follows exactly the steps of :func:`rwkvpy.generate.generate` (same sampling,
stopping, held-back text, cache inserts): run alone, it gives the same text as ``generate``
with the same seed and the same cache contents, bit for bit (a decode group of one goes
through ``model.forward``). States
are values: no sequence ever sees another's state. Requests arriving while others generate join
the batch at the next iteration; nobody waits for anyone to finish.

Numerics: a decode group of several sequences uses matrix-matrix kernels, whose float32 sums
are ordered differently from the single-token path (logits differ by about 1e-6). A sampled
token changes only if its draw falls within that distance of a boundary of the distribution,
which is rare enough that batched and lone runs give the same text in practice (the tests
compare 32 concurrent requests with ``generate``), but it is not a bit-exact guarantee;
``max_batch=1`` gives bit-exact results at the cost of batching. Likewise, a prompt whose
beginning comes from the prefix cache is processed in other pieces than a cold one.

Each sequence's token handling (sampling, log probabilities, decoding, stop strings) is a
:class:`~rwkvpy.generation.TokenLoop`, the one ``generate`` uses. Events go to each sequence's
``emit`` callback, from the engine thread: :class:`~rwkvpy.generation.TextEvent`,
:class:`~rwkvpy.generation.DoneEvent`, :class:`~rwkvpy.generation.ErrorEvent` and
:class:`~rwkvpy.generation.CancelledEvent` (only for a cancellation with a reason, such as a
shutdown: a client that went away gets nothing).

A sequence made with ``prompt_logprobs=N`` (scoring a prompt, ``echo`` with ``logprobs``)
processes its whole prompt (no prefix-cache lookup) with the logits of every position, and its
PromptEvent (when the prompt is done) and DoneEvent carry each prompt token's log probability
under the model's raw logits (the first's is None).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from .errors import RwkvpyError
from .generation import (
    CancelledEvent,
    DoneEvent,
    ErrorEvent,
    PromptEvent,
    TokenLogprob,
    TokenLoop,
    token_logprobs,
)

# the server's logger: the engine's failures appear among the lines `rwkvpy serve` writes
log = logging.getLogger("rwkvpy.server")

#: Most tokens per prefill piece of a prompt scored with every position's logits: 512 x a
#: 65536-token vocabulary is 128 MiB of float32 logits.
SCORE_CHUNK = 512


class EngineClosed(RuntimeError):
    """The engine is stopping or stopped: no new sequences."""


class Sequence:
    """One sequence to generate. ``ids``: the prompt's token ids (non-empty); ``params``: a
    SamplingParams; ``state``: the starting state (None: fresh) and ``root`` its prefix-cache
    root; ``checkpoints``: extra prompt positions whose states go to the cache; ``emit``:
    called with each event; ``processors``: LogitsProcessor objects of this sequence;
    ``prompt_logprobs``: None, or score the prompt with this many alternatives per token."""

    __slots__ = (
        "cached",
        "cancel_reason",
        "cancelled",
        "checkpoints",
        "emit",
        "ids",
        "logits",
        "loop",
        "params",
        "phase",
        "pos",
        "processors",
        "prompt_logprobs",
        "prompt_lp",
        "root",
        "row",
        "start_state",
        "started",
        "state",
        "t_first",
        "t_last",
        "t_submit",
    )

    def __init__(
        self,
        ids,
        params,
        emit,
        *,
        state=None,
        root=None,
        checkpoints=(),
        processors=(),
        prompt_logprobs=None,
    ):
        self.ids = list(ids)
        self.params = params
        self.start_state = state
        self.root = root
        self.checkpoints = tuple(checkpoints)
        self.emit = emit
        self.processors = tuple(processors)
        self.loop = None  # the TokenLoop, made when the sequence starts (on the engine thread)
        self.prompt_logprobs = prompt_logprobs
        self.prompt_lp = None  # TokenLogprob per prompt token read so far
        self.row = None  # the last prompt piece's last logits (they predict the next)
        self.started = False
        self.cancelled = False
        self.cancel_reason = None
        self.phase = "queued"  # queued -> prefill -> decode -> done
        self.pos = 0  # prompt tokens the state has read
        self.cached = 0  # prompt tokens found in the prefix cache
        self.state = state
        self.logits = None
        self.t_submit = time.perf_counter()
        self.t_first = None  # when its first token was chosen
        self.t_last = None  # when its latest token was chosen

    @property
    def tokens(self) -> list:
        return self.loop.tokens if self.loop is not None else []

    @property
    def sampled(self) -> int:
        return self.loop.sampled if self.loop is not None else 0

    def cancel(self, reason=None) -> None:
        """Stop this sequence at the engine's next iteration. ``reason``: None for a client
        that went away (no event), else a message sent as a CancelledEvent."""
        if not self.cancelled:
            self.cancel_reason = reason
            self.cancelled = True


class Engine:
    """Runs sequences on ``model`` in one background thread (see the module's docstring)."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        cache=None,
        max_batch: int = 32,
        prefill_budget: int = 1024,
        max_chunk: int = 2048,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.tokenizer = tokenizer
        self.cache = cache
        self.max_batch = max_batch
        self.prefill_budget = max(1, prefill_budget)
        self.max_chunk = max(1, max_chunk)
        self._cond = threading.Condition()
        self._inbox: deque = deque()
        self._prefill: deque = deque()
        self._decode: list = []
        self._live: set = set()  # every sequence submitted and not finished
        self._closing = False
        self._thread: threading.Thread | None = None
        # counters (read without the lock: ints, informational)
        self.prefill_tokens = 0  # prompt tokens given to model.forward
        self.decode_tokens = 0  # tokens given to model.forward_batch
        self.decode_steps = 0  # forward_batch calls
        self.max_batch_seen = 0
        self.sequences_done = 0
        self.sequences_cancelled = 0
        self.sequences_failed = 0
        self.prompt_tokens = 0  # prompt tokens of the sequences started, cached ones included
        self.generated_tokens = 0  # tokens chosen (a stop token included), as usage counts them
        #: None, or an object told ``batch_size(n)`` for each forward_batch group,
        #: ``first_token(seconds since submit)`` and ``token_gap(seconds since the previous
        #: token)`` for each token chosen (server/metrics.py's Metrics)
        self.observer = None

    # -- control (any thread) ----------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="rwkvpy-engine", daemon=True)
            self._thread.start()

    def submit(self, seqs) -> None:
        seqs = list(seqs)
        with self._cond:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            for s in seqs:
                s.t_submit = time.perf_counter()
                self._inbox.append(s)
                self._live.add(s)
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def cancel_all(self, reason: str) -> int:
        """Cancel every sequence not finished yet; returns how many."""
        with self._cond:
            live = [s for s in self._live if not s.cancelled]
            for s in live:
                s.cancel(reason)
            self._cond.notify()
        return len(live)

    @property
    def active(self) -> int:
        return len(self._live)

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new sequences, cancel the running ones and end the thread."""
        with self._cond:
            self._closing = True
        self.cancel_all("the server is shutting down")
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> dict:
        out = {
            "active_sequences": len(self._live),
            "queued": len(self._inbox) + len(self._prefill),
            "decoding": len(self._decode),
            "prefill_tokens": self.prefill_tokens,
            "decode_tokens": self.decode_tokens,
            "decode_steps": self.decode_steps,
            "max_batch_seen": self.max_batch_seen,
            "max_batch": self.max_batch,
            "sequences_done": self.sequences_done,
            "sequences_cancelled": self.sequences_cancelled,
            "sequences_failed": self.sequences_failed,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
        }
        if self.cache is not None:
            out["prefix_cache"] = self.cache.stats()
        return out

    # -- the thread --------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._inbox or self._prefill or self._decode or self._closing):
                    self._cond.wait()
                if self._closing and not (self._inbox or self._prefill or self._decode):
                    return
                while self._inbox:
                    s = self._inbox.popleft()
                    s.phase = "prefill"
                    self._prefill.append(s)
            try:
                self._iteration()
            except Exception:  # pragma: no cover - a bug: fail all, keep serving
                log.exception("engine iteration failed")
                for s in list(self._prefill) + list(self._decode):
                    self._fail(s, "internal error in the inference engine")
                self._prefill.clear()
                self._decode = []

    def _iteration(self) -> None:
        for s in [s for s in self._prefill if s.cancelled]:
            self._prefill.remove(s)
            self._drop(s)
        for s in [s for s in self._decode if s.cancelled]:
            self._drop(s)
        self._decode = [s for s in self._decode if s.phase == "decode"]
        self._prefill_step()
        self._decode_step()
        self._decode = [s for s in self._decode if s.phase == "decode"]

    # -- prefill -----------------------------------------------------------------------------
    def _start_prefill(self, s: Sequence) -> None:
        s.started = True
        s.loop = TokenLoop(self.tokenizer, s.params, s.processors)
        self.prompt_tokens += len(s.ids)
        ids, cache = s.ids, self.cache
        if s.prompt_logprobs is not None:  # every position's logits are needed: no lookup
            s.prompt_lp = []
            return
        if cache is None:
            return
        n, st, logits = cache.lookup(ids, root=s.root)
        if n == len(ids) and logits is None:  # a stored state without logits: redo the last token
            n, st, logits = cache.lookup(ids[:-1], root=s.root)
        if n:
            s.state, s.pos, s.cached = st, n, n
            if n == len(ids):
                s.logits = logits

    def _next_cut(self, s: Sequence) -> int:
        """Where the next prefill piece ends: the next cache checkpoint (as generate() cuts),
        a requested checkpoint, or at the latest ``max_chunk`` tokens on (a bound on the
        activations' memory, for prompts that have no checkpoints closer); a scored prompt's
        pieces are at most SCORE_CHUNK tokens (their logits are (tokens, vocab) float32)."""
        end = len(s.ids)
        chunk = self.max_chunk if s.prompt_lp is None else min(self.max_chunk, SCORE_CHUNK)
        cuts = [(s.pos // chunk + 1) * chunk]
        if self.cache is not None:
            cuts += [c for c in s.checkpoints if s.pos < c]
            every = self.cache.every
            if every > 0:
                cuts.append((s.pos // every + 1) * every)
        return min(min(cuts), end)

    def _prefill_step(self) -> None:
        budget = self.prefill_budget
        while self._prefill and budget > 0:
            s = self._prefill[0]
            try:
                if not s.started:
                    self._start_prefill(s)
                if s.logits is None:
                    end = self._next_cut(s)
                    scoring = s.prompt_lp is not None
                    logits, state = self.model.forward(
                        s.ids[s.pos : end], s.state, all_logits=scoring
                    )
                    self.prefill_tokens += end - s.pos
                    budget -= end - s.pos
                    if scoring:
                        self._score_prompt(s, logits, end)
                        logits = logits[-1]
                    if self.cache is not None:
                        self.cache.insert(s.ids[:end], state, root=s.root)
                    s.pos, s.state = end, state
                    if end == len(s.ids):
                        s.logits = logits
            except Exception as e:  # noqa: BLE001 - one sequence fails, the rest go on
                self._prefill.popleft()
                self._fail(s, e)
                continue
            if s.logits is not None:
                self._prefill.popleft()
                s.phase = "decode"
                self._decode.append(s)
                if s.prompt_lp is not None:
                    s.emit(PromptEvent(tuple(s.prompt_lp)))

    def _score_prompt(self, s: Sequence, rows, end: int) -> None:
        """Log probabilities of the prompt tokens ``s.pos .. end-1`` from the logits of the
        positions before them (``rows``: one per token of the piece ``s.pos .. end-1``)."""
        if s.pos == 0:
            s.prompt_lp.append(TokenLogprob(s.ids[0], None))  # nothing predicted it
        else:
            s.prompt_lp += token_logprobs(s.row.unsqueeze(0), [s.ids[s.pos]], s.prompt_logprobs)
        if end - s.pos > 1:
            s.prompt_lp += token_logprobs(rows[:-1], s.ids[s.pos + 1 : end], s.prompt_logprobs)
        s.row = rows[-1]

    # -- decode ------------------------------------------------------------------------------
    def _decode_step(self) -> None:
        run = []
        now = time.perf_counter()
        for s in self._decode:
            if s.phase != "decode":
                continue
            try:
                before = s.loop.sampled
                token = s.loop.choose(s.logits)
                if s.loop.sampled > before:
                    self._chose(s, now)
                if token is None:
                    self._finish(s)
                    continue
                run.append((s, token))
            except Exception as e:  # noqa: BLE001 - one sequence fails, the rest go on
                self._fail(s, e)
        for i in range(0, len(run), self.max_batch):
            group = run[i : i + self.max_batch]
            try:
                logits, states = self.model.forward_batch(
                    [[t] for _, t in group], [s.state for s, _ in group]
                )
            except Exception as e:  # noqa: BLE001 - one sequence fails, the rest go on
                for s, _ in group:
                    self._fail(s, e)
                continue
            self.decode_tokens += len(group)
            self.decode_steps += 1
            self.max_batch_seen = max(self.max_batch_seen, len(group))
            if self.observer is not None:
                self.observer.batch_size(len(group))
            for (s, token), lg, st in zip(group, logits, states):
                try:
                    s.state, s.logits = st, lg
                    event = s.loop.accept(token)
                    if event is not None:
                        s.emit(event)
                    if s.loop.done:
                        self._finish(s)
                except Exception as e:  # noqa: BLE001 - one sequence fails, the rest go on
                    self._fail(s, e)

    def _chose(self, s: Sequence, now: float) -> None:
        """Count a token ``s`` chose at ``now``."""
        self.generated_tokens += 1
        if self.observer is not None:
            if s.t_first is None:
                self.observer.first_token(now - s.t_submit)
            else:
                self.observer.token_gap(now - s.t_last)
        if s.t_first is None:
            s.t_first = now
        s.t_last = now

    # -- endings -----------------------------------------------------------------------------
    def _store_end(self, s: Sequence) -> None:
        if self.cache is not None and s.tokens:
            try:
                self.cache.insert(s.ids + s.tokens, s.state, root=s.root)
            except Exception:  # pragma: no cover - never expected
                log.exception("prefix cache insert failed")

    def _finish(self, s: Sequence) -> None:
        event = s.loop.close()
        if event is not None:
            s.emit(event)
        self._store_end(s)
        s.phase = "done"
        self.sequences_done += 1
        self._forget(s)
        s.emit(
            DoneEvent(
                finish_reason=s.loop.finish_reason,
                stop=s.loop.stop,
                prompt_tokens=len(s.ids),
                completion_tokens=s.loop.sampled,
                cached_tokens=s.cached,
                tokens=list(s.loop.tokens),
                state=s.state,
                seed=s.loop.seed,
                prompt_logprobs=None if s.prompt_lp is None else tuple(s.prompt_lp),
            )
        )

    def _drop(self, s: Sequence) -> None:
        if s.phase == "done":
            return
        if s.phase == "decode":
            self._store_end(s)
        s.phase = "done"
        self.sequences_cancelled += 1
        self._forget(s)
        if s.cancel_reason is not None:
            s.emit(CancelledEvent(s.cancel_reason))

    def _fail(self, s: Sequence, err) -> None:
        """End ``s`` with an ErrorEvent."""
        if s.phase == "done":
            return
        user = isinstance(err, RwkvpyError)  # bad input (a prompt, a sampling setting)
        if user:
            msg = str(err)
        elif isinstance(err, str):
            msg = err
        else:
            log.error("sequence failed: %s: %s", type(err).__name__, err)
            msg = "internal error in the inference engine"
        s.phase = "done"
        self.sequences_failed += 1
        self._forget(s)
        s.emit(ErrorEvent(msg, user))

    def _forget(self, s: Sequence) -> None:
        with self._cond:
            self._live.discard(s)
