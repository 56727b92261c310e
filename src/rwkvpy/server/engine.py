"""The scheduler: one thread owns the model and runs every request's sequences together.

Each :class:`Sequence` is one generated text (one choice of one HTTP request) with its own
prompt tokens, starting state, :class:`~rwkvpy.sampling.Sampler` (seeded on its own) and
:class:`~rwkvpy.tokenizers.StreamDecoder`. The engine thread loops:

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

Events go to each sequence's ``emit`` callback, from the engine thread: ``("text", str)``,
``("done", dict)``, ``("error", message, is_user_error)``, ``("cancelled", reason)`` (only for a
cancellation with a reason, such as a shutdown: a client that went away gets nothing).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from ..errors import RwkvpyError
from ..generate import _first_stop, _held_back
from ..sampling import Sampler
from ..tokenizers import StreamDecoder

log = logging.getLogger("rwkvpy.server")


class EngineClosed(RuntimeError):
    """The engine is stopping or stopped: no new sequences."""


class Sequence:
    """One sequence to generate. ``ids``: the prompt's token ids (non-empty); ``params``: a
    SamplingParams; ``state``: the starting state (None: fresh) and ``root`` its prefix-cache
    root; ``checkpoints``: extra prompt positions whose states go to the cache; ``emit``:
    called with each event."""

    __slots__ = ("by_string", "cached", "cancel_reason", "cancelled", "checkpoints",
                 "decoder", "emit", "finish", "ids", "logits", "params", "pending", "phase", "pos",
                 "root", "sampled", "sampler", "start_state", "state", "stop",
                 "stop_tokens", "t_first", "t_submit", "tokens")

    def __init__(self, ids, params, emit, *, state=None, root=None, checkpoints=()):
        self.ids = list(ids)
        self.params = params
        self.start_state = state
        self.root = root
        self.checkpoints = tuple(checkpoints)
        self.emit = emit
        self.sampler = Sampler(params)
        self.decoder = None
        self.stop_tokens = frozenset(params.stop_tokens)
        self.cancelled = False
        self.cancel_reason = None
        self.phase = "queued"  # queued -> prefill -> decode -> done
        self.pos = 0           # prompt tokens the state has read
        self.cached = 0        # prompt tokens found in the prefix cache
        self.state = state
        self.logits = None
        self.tokens: list = []
        self.pending = ""
        self.sampled = 0
        self.finish = "length"
        self.stop = None
        self.by_string = False
        self.t_submit = time.perf_counter()
        self.t_first = None

    def cancel(self, reason=None) -> None:
        """Stop this sequence at the engine's next iteration. ``reason``: None for a client
        that went away (no event), else a message sent as a ``("cancelled", reason)`` event."""
        if not self.cancelled:
            self.cancel_reason = reason
            self.cancelled = True


class Engine:
    """Runs sequences on ``model`` in one background thread (see the module's docstring)."""

    def __init__(self, model, tokenizer, *, cache=None, max_batch: int = 32,
                 prefill_budget: int = 1024, max_chunk: int = 2048):
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
        self._thread = None
        # counters (read without the lock: ints, informational)
        self.prefill_tokens = 0   # prompt tokens given to model.forward
        self.decode_tokens = 0    # tokens given to model.forward_batch
        self.decode_steps = 0     # forward_batch calls
        self.max_batch_seen = 0
        self.sequences_done = 0
        self.sequences_cancelled = 0

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
        out = {"active_sequences": len(self._live), "queued": len(self._inbox) + len(self._prefill),
               "decoding": len(self._decode), "prefill_tokens": self.prefill_tokens,
               "decode_tokens": self.decode_tokens, "decode_steps": self.decode_steps,
               "max_batch_seen": self.max_batch_seen, "max_batch": self.max_batch,
               "sequences_done": self.sequences_done,
               "sequences_cancelled": self.sequences_cancelled}
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
        s.decoder = StreamDecoder(self.tokenizer)
        ids, cache = s.ids, self.cache
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
        activations' memory, for prompts that have no checkpoints closer)."""
        end = len(s.ids)
        cuts = [(s.pos // self.max_chunk + 1) * self.max_chunk]
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
                if s.decoder is None:
                    self._start_prefill(s)
                if s.logits is None:
                    end = self._next_cut(s)
                    logits, state = self.model.forward(s.ids[s.pos:end], s.state)
                    self.prefill_tokens += end - s.pos
                    budget -= end - s.pos
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

    # -- decode ------------------------------------------------------------------------------
    def _decode_step(self) -> None:
        run = []
        for s in self._decode:
            if s.phase != "decode":
                continue
            try:
                if s.sampled >= s.params.max_tokens:
                    self._finish(s)
                    continue
                token = s.sampler.sample(s.logits)
                s.sampled += 1
                if token in s.stop_tokens:
                    s.finish, s.stop = "stop", token
                    self._finish(s)
                    continue
                run.append((s, token))
            except Exception as e:  # noqa: BLE001 - one sequence fails, the rest go on
                self._fail(s, e)
        for i in range(0, len(run), self.max_batch):
            group = run[i:i + self.max_batch]
            try:
                logits, states = self.model.forward_batch([[t] for _, t in group],
                                                          [s.state for s, _ in group])
            except Exception as e:  # noqa: BLE001 - one sequence fails, the rest go on
                for s, _ in group:
                    self._fail(s, e)
                continue
            self.decode_tokens += len(group)
            self.decode_steps += 1
            self.max_batch_seen = max(self.max_batch_seen, len(group))
            for (s, token), lg, st in zip(group, logits, states):
                try:
                    s.tokens.append(token)
                    s.state, s.logits = st, lg
                    self._took(s, token)
                    if s.phase == "decode" and s.sampled >= s.params.max_tokens:
                        self._finish(s)
                except Exception as e:  # noqa: BLE001 - one sequence fails, the rest go on
                    self._fail(s, e)

    def _took(self, s: Sequence, token: int) -> None:
        """Decode a token the state has read; stop strings; emit what is decided."""
        stops = s.params.stop
        s.pending += s.decoder.feed([token])
        if not stops:
            out, s.pending = s.pending, ""
        else:
            at, which = _first_stop(s.pending, stops)
            if at >= 0:
                s.finish, s.stop, s.by_string = "stop", which, True
                s.pending = s.pending[:at]
                self._finish(s)
                return
            keep = _held_back(s.pending, stops)
            cut = len(s.pending) - keep
            out, s.pending = s.pending[:cut], s.pending[cut:]
        if out:
            if s.t_first is None:
                s.t_first = time.perf_counter()
            s.emit(("text", out))

    # -- endings -----------------------------------------------------------------------------
    def _store_end(self, s: Sequence) -> None:
        if self.cache is not None and s.tokens:
            try:
                self.cache.insert(s.ids + s.tokens, s.state, root=s.root)
            except Exception:  # pragma: no cover - never expected
                log.exception("prefix cache insert failed")

    def _finish(self, s: Sequence) -> None:
        if not s.by_string:
            s.pending += s.decoder.flush()
            if s.params.stop:
                at, which = _first_stop(s.pending, s.params.stop)
                if at >= 0:
                    s.finish, s.stop, s.pending = "stop", which, s.pending[:at]
        if s.pending:
            s.emit(("text", s.pending))
            s.pending = ""
        self._store_end(s)
        s.phase = "done"
        self.sequences_done += 1
        self._forget(s)
        s.emit(("done", {"finish_reason": s.finish, "stop": s.stop,
                         "prompt_tokens": len(s.ids), "completion_tokens": s.sampled,
                         "cached_tokens": s.cached, "tokens": list(s.tokens),
                         "state": s.state, "seed": s.sampler.seed}))

    def _drop(self, s: Sequence) -> None:
        if s.phase == "done":
            return
        if s.phase == "decode":
            self._store_end(s)
        s.phase = "done"
        self.sequences_cancelled += 1
        self._forget(s)
        if s.cancel_reason is not None:
            s.emit(("cancelled", s.cancel_reason))

    def _fail(self, s: Sequence, err) -> None:
        """End ``s`` with an error event: ``("error", message, is_user_error)``."""
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
        self._forget(s)
        s.emit(("error", msg, user))

    def _forget(self, s: Sequence) -> None:
        with self._cond:
            self._live.discard(s)
