"""What happens to one generated sequence at each step, whoever runs the model.

:class:`TokenLoop` holds one sequence's sampler, stream decoder, stop conditions and log
probabilities. The code that runs the model (``rwkvpy.generate`` for one sequence, the server's
:class:`~rwkvpy.engine.Engine` for many in a batch) calls, per step::

    token = loop.choose(logits)      # None: the sequence ends here (length, stop token)
    ...the state reads ``token`` (model.forward or forward_batch)...
    event = loop.accept(token)       # a TextEvent with the text now decided, or None
    if loop.done: ...
    last = loop.close()              # at the end: the rest of the text (a TextEvent or None)

Each step's logits go through, in order: the sampler's bias, penalties and bans
(:meth:`~rwkvpy.sampling.Sampler.process`), the removal of ids the tokenizer cannot decode (a
head wider than the vocabulary: World models have 65536 logits for 65530 tokens, and a model
that is not well trained, random weights for instance, draws the other 6 now and then), then
each :class:`LogitsProcessor` (the hook for masks such as a grammar's: set a logit to ``-inf``
to forbid a token), then the draw (:meth:`~rwkvpy.sampling.Sampler.choose`). Log
probabilities (``SamplingParams.logprobs``) are the float32 ``log_softmax`` of the logits the
draw is made from, after bias, penalties, bans, that removal and processors, before
temperature, top-k/top-p/min-p: with none of those set (and a head no wider than the
vocabulary) they are the model's own, equal to what :func:`rwkvpy.perplexity.perplexity`
scores.

Stopping (the same for every caller):

- ``max_tokens`` tokens sampled: ``finish_reason`` "length";
- a token of ``stop_tokens`` sampled: "stop"; the state never reads it and it is in no output;
- a ``stop`` string appears in the text: "stop"; the text ends just before the earliest stop
  string. Text that could be the beginning of a stop string is held back until it is decided,
  so no event ever carries part of a stop string;
- a processor reports that it is finished (a grammar that is complete): "stop".

Text is decoded with :class:`~rwkvpy.tokenizers.StreamDecoder`: a character split across tokens
comes out whole, with the token that completes it. Each token's log probability travels with
the first :class:`TextEvent` whose text reaches the token's own text (``TokenLogprob.offset``,
its first character in the generated text); the tokens whose text lies inside a stop string are
dropped with it.

The events an engine sends about a sequence are the dataclasses :class:`TextEvent`,
:class:`PromptEvent`, :class:`DoneEvent`, :class:`ErrorEvent` and :class:`CancelledEvent`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .processors import LogitsProcessor  # noqa: F401  (the loop's hook, importable beside it)
from .sampling import Sampler, SamplingParams
from .tokenizers import StreamDecoder


# -- events ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenLogprob:
    """One token's log probability (natural log) and the most probable alternatives."""

    token: int
    logprob: float | None  # None: nothing predicted it (a prompt's first token)
    top: tuple = ()  # ((token id, logprob), ...), most probable first
    offset: int = 0  # its first character's index in the text it belongs to


@dataclass(frozen=True)
class TextEvent:
    """Text now decided (never part of a stop string), with the log probabilities of the tokens
    it completes when they were asked for."""

    text: str
    logprobs: tuple = ()  # of TokenLogprob


@dataclass(frozen=True)
class PromptEvent:
    """The prompt has been read and scored (only for a sequence that asked for its prompt's
    log probabilities)."""

    logprobs: tuple  # of TokenLogprob, one per prompt token


@dataclass(frozen=True)
class DoneEvent:
    """The sequence ended normally; its last TextEvent came before."""

    finish_reason: str  # "stop" or "length"
    stop: object  # the stop string or stop token that ended it, if any
    prompt_tokens: int
    completion_tokens: int  # tokens sampled (a stop token included)
    cached_tokens: int  # prompt tokens taken from the prefix cache
    tokens: list  # generated token ids the state has read
    state: object  # the state after the prompt and ``tokens``
    seed: int | None
    prompt_logprobs: tuple | None = None  # of TokenLogprob per prompt token, when asked


@dataclass(frozen=True)
class ErrorEvent:
    """The sequence failed. ``user_error``: bad input (a 400), else an internal error."""

    message: str
    user_error: bool


@dataclass(frozen=True)
class CancelledEvent:
    """The sequence was cancelled with a reason (a server shutting down)."""

    reason: str


# -- log probabilities -----------------------------------------------------------------------------
def token_logprobs(rows: torch.Tensor, targets, top: int = 0) -> list:
    """TokenLogprob of ``targets[i]`` under ``rows[i]`` (float logits, one row per target), with
    the ``top`` most probable tokens of each row; offsets are left 0."""
    lp = torch.log_softmax(rows.detach().to(device="cpu", dtype=torch.float32), dim=-1)
    if lp.dim() == 1:
        lp = lp.unsqueeze(0)
    t = torch.as_tensor(list(targets), dtype=torch.long)
    picked = lp.gather(1, t.unsqueeze(1)).squeeze(1).tolist()
    tops = [()] * len(picked)
    if top > 0:
        vals, ids = torch.topk(lp, min(top, lp.shape[1]), dim=1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
    return [TokenLogprob(int(tok), p, tp) for tok, p, tp in zip(targets, picked, tops)]


# -- the loop --------------------------------------------------------------------------------------
def held_back(text: str, stops) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def first_stop(text: str, stops):
    """(index, stop string) of the earliest stop string in ``text``, or (-1, None)."""
    at, which = -1, None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (at < 0 or i < at):
            at, which = i, s
    return at, which


class TokenLoop:
    """One sequence's token handling (see the module's docstring). ``tokenizer`` decodes,
    ``params`` (a SamplingParams) samples and stops, ``processors`` change the logits."""

    def __init__(self, tokenizer, params: SamplingParams, processors=()):
        self.params = params
        self.sampler = Sampler(params)
        self.decoder = StreamDecoder(tokenizer)
        self._n_vocab = int(getattr(tokenizer, "vocab_size", 0) or 0)  # ids it can decode
        procs = tuple(processors)
        if params.constraint is not None:  # json_schema / json_object / grammar
            procs += (params.constraint.processor(tokenizer),)
        self.processors = procs
        # a processor may end the sequence through tokens of its own (a grammar's end token)
        self.stop_tokens = frozenset(params.stop_tokens).union(
            *(getattr(p, "stop_tokens", ()) for p in procs)
        )
        self.tokens: list[int] = []  # chosen tokens the state has read
        self.sampled = 0  # tokens chosen (a stop token included)
        self.finish_reason: str | None = None
        self.stop: int | str | None = None
        self.logprobs: list = []  # TokenLogprob of the tokens released with text so far
        self._pending = ""  # decoded, not yet emitted (may begin a stop string)
        self._decoded = 0  # characters decoded so far
        self._emitted = 0  # characters emitted so far
        self._chosen = None  # TokenLogprob of the token chosen, not yet accepted
        self._waiting: list = []  # TokenLogprob of accepted tokens awaiting their text
        self._by_string = False

    @property
    def seed(self) -> int:
        return self.sampler.seed

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def choose(self, logits) -> int | None:
        """The next token from this step's logits, or None when the sequence ends here
        (``max_tokens`` reached, or a stop token drawn)."""
        if self.sampled >= self.params.max_tokens:
            self.finish_reason = "length"
            return None
        x = self.sampler.process(logits)  # a new vector: masked in place below
        if 0 < self._n_vocab < x.shape[-1]:  # never an id the tokenizer cannot decode
            x[self._n_vocab :] = float("-inf")
        for p in self.processors:
            x = p(x)
        token = self.sampler.choose(x)
        self.sampled += 1
        if token in self.stop_tokens:
            self.finish_reason, self.stop = "stop", token
            return None
        if self.params.logprobs is not None:
            self._chosen = token_logprobs(x, [token], self.params.logprobs)[0]
        return token

    def accept(self, token: int) -> TextEvent | None:
        """The state has read ``token``: decode it, look for stop strings; the text decided
        (None if none yet). Sets ``finish_reason`` when the sequence is over."""
        self.tokens.append(token)
        for p in self.processors:
            p.accept(token)
        if self._chosen is not None:
            self._waiting.append(replace(self._chosen, offset=self._decoded))
            self._chosen = None
        piece = self.decoder.feed([token])
        self._decoded += len(piece)
        self._pending += piece
        stops = self.params.stop
        if not stops:
            out, self._pending = self._pending, ""
        else:
            at, which = first_stop(self._pending, stops)
            if at >= 0:
                self.finish_reason, self.stop, self._by_string = "stop", which, True
                self._pending = self._pending[:at]
                return None
            cut = len(self._pending) - held_back(self._pending, stops)
            out, self._pending = self._pending[:cut], self._pending[cut:]
        if any(p.finished() for p in self.processors):
            self.finish_reason = "stop"
        elif self.sampled >= self.params.max_tokens:
            self.finish_reason = "length"
        return self._emit(out) if out else None

    def close(self) -> TextEvent | None:
        """The end (after ``done``, or to end early): the text not emitted yet, if any. Text
        held back is no stop string after all; an unfinished character becomes U+FFFD."""
        if self.finish_reason is None:
            self.finish_reason = "length"
        if not self._by_string:
            self._pending += self.decoder.flush()
            if self.params.stop:
                at, which = first_stop(self._pending, self.params.stop)
                if at >= 0:
                    self.finish_reason, self.stop = "stop", which
                    self._pending = self._pending[:at]
                    self._by_string = True
        text, self._pending = self._pending, ""
        # no stop string: every token's text is out, release them all
        ev = self._emit(text, everything=not self._by_string)
        self._waiting = []
        return ev if (text or ev.logprobs) else None

    def _emit(self, text: str, everything: bool = False) -> TextEvent:
        """A TextEvent of ``text`` with the waiting tokens whose text starts in what has been
        emitted (all of them with ``everything``)."""
        self._emitted += len(text)
        n = len(self._waiting)
        if not everything:
            n = 0
            while n < len(self._waiting) and self._waiting[n].offset < self._emitted:
                n += 1
        out, self._waiting = self._waiting[:n], self._waiting[n:]
        self.logprobs += out
        return TextEvent(text, tuple(out))
