"""Text generation: a prompt in, sampled tokens out, as one result or as a stream of text.

The prompt goes to ``model.forward`` in one call (sequence mode); each generated token then
goes in alone. Text is decoded with :class:`~rwkvpy.tokenizers.StreamDecoder`, so a character
split across tokens is never emitted half-done.

Stopping:

- ``max_tokens`` tokens sampled: ``finish_reason`` "length";
- a token in ``stop_tokens`` sampled: "stop"; that token is not in ``tokens`` nor in the text,
  and the state has not seen it;
- a ``stop`` string appears in the text: "stop"; the text ends just before the stop string's
  first occurrence (the earliest of all stop strings). While generating, text that could be the
  beginning of a stop string is held back, so a stream never emits any part of a stop string.
  The tokens that produced it are in ``tokens`` and in the state.

The result's ``state`` has consumed the prompt and every token of ``tokens``: feed it the next
user input to continue the conversation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .errors import RwkvpyError
from .sampling import Sampler, SamplingParams
from .tokenizers import StreamDecoder, TokenizerError


class GenerationError(RwkvpyError):
    """A prompt or argument generation cannot start from."""


@dataclass(frozen=True)
class Timings:
    """Wall-clock seconds. When streaming, ``generation_seconds`` also counts the time the
    consumer spends between pieces."""

    prompt_seconds: float       # the prompt's forward call
    generation_seconds: float   # sampling, the per-token forward calls and decoding
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_seconds(self) -> float:
        return self.prompt_seconds + self.generation_seconds

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second."""
        return (self.completion_tokens / self.generation_seconds
                if self.generation_seconds > 0 else 0.0)


@dataclass(frozen=True)
class GenerationResult:
    text: str                 # the generated text, without any stop string
    tokens: list              # generated token ids (a stop token excluded)
    finish_reason: str        # "stop" or "length"
    prompt_tokens: int        # number of prompt tokens
    completion_tokens: int    # number of tokens sampled (a stop token included)
    timings: Timings
    state: object = field(repr=False)  # rwkvpy.State after the prompt and ``tokens``
    stop: object = None       # the stop string or stop token id that ended generation, if any
    seed: int | None = None   # the sampler's seed (reproduces the run with the same inputs)


def _prompt_ids(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple)) or hasattr(prompt, "tolist"):
        ids = prompt.tolist() if hasattr(prompt, "tolist") else list(prompt)
    else:
        raise GenerationError(f"prompt must be a str or a list of token ids, "
                              f"got {type(prompt).__name__}")
    if not ids:
        raise GenerationError("the prompt is empty: the model needs at least one token to "
                              "predict the next one")
    return ids


def _held_back(text: str, stops) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _first_stop(text: str, stops):
    """(index, stop string) of the earliest stop string in ``text``, or (-1, None)."""
    at, which = -1, None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (at < 0 or i < at):
            at, which = i, s
    return at, which


def _check(model, tokenizer, params):
    if params is None:
        params = SamplingParams()
    if not isinstance(params, SamplingParams):
        raise GenerationError(f"params must be a SamplingParams, got {type(params).__name__}")
    V = model.config.vocab_size
    if tokenizer.vocab_size > V:
        raise TokenizerError(f"the {tokenizer.name} tokenizer (vocab size {tokenizer.vocab_size}) "
                             f"does not fit the model (vocab size {V})")
    for i in params.stop_tokens:
        if i >= V:
            raise GenerationError(f"stop token id {i} is out of range: the model's vocabulary "
                                  f"has ids 0..{V - 1}")
    return params


def _run(model, tokenizer, ids: list, params: SamplingParams, state):
    """Yields the text pieces; returns the GenerationResult."""
    sampler = Sampler(params)
    stops, stop_tokens = params.stop, frozenset(params.stop_tokens)
    decoder = StreamDecoder(tokenizer)
    t0 = time.perf_counter()
    logits, state = model.forward(ids, state)
    t1 = time.perf_counter()
    tokens: list[int] = []
    parts: list[str] = []
    pending = ""  # decoded, not yet emitted: may be the beginning of a stop string
    finish, stop, sampled, by_string = "length", None, 0, False

    while sampled < params.max_tokens:
        token = sampler.sample(logits)
        sampled += 1
        if token in stop_tokens:
            finish, stop = "stop", token
            break
        tokens.append(token)
        logits, state = model.forward([token], state)
        pending += decoder.feed([token])
        if not stops:
            out, pending = pending, ""
        else:
            at, which = _first_stop(pending, stops)
            if at >= 0:
                finish, stop, by_string = "stop", which, True
                pending = pending[:at]
                break
            keep = _held_back(pending, stops)
            out, pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
        if out:
            parts.append(out)
            yield out
    if not by_string:
        # The end: held-back text is no stop string after all; an unfinished character -> U+FFFD.
        pending += decoder.flush()
        if stops:
            at, which = _first_stop(pending, stops)
            if at >= 0:
                finish, stop, pending = "stop", which, pending[:at]
    if pending:
        parts.append(pending)
        yield pending
    t2 = time.perf_counter()
    timings = Timings(t1 - t0, t2 - t1, len(ids), sampled)
    return GenerationResult(text="".join(parts), tokens=tokens, finish_reason=finish,
                            prompt_tokens=len(ids), completion_tokens=sampled, timings=timings,
                            state=state, stop=stop, seed=sampler.seed)


class GenerationStream:
    """An iterator of the generated text pieces; ``result`` is the GenerationResult once the
    iteration has ended (None before). ``close()`` stops generating early."""

    def __init__(self, gen):
        self._gen = gen
        self.result: GenerationResult | None = None

    def __iter__(self):
        return self

    def __next__(self) -> str:
        try:
            return next(self._gen)
        except StopIteration as end:
            if end.value is not None:
                self.result = end.value
            raise StopIteration from None

    def close(self) -> None:
        self._gen.close()


def stream(model, tokenizer, prompt, params: SamplingParams | None = None,
           state=None) -> GenerationStream:
    """Generate from ``prompt`` (a str, or a list of token ids), yielding text pieces as they
    are decided. Concatenated, the pieces are the result's ``text``; the stream's ``result``
    holds the :class:`GenerationResult` once it is exhausted. ``state``: continue from this
    state (None: a fresh one); it is not modified."""
    params = _check(model, tokenizer, params)
    ids = _prompt_ids(tokenizer, prompt)  # bad prompts fail here, not at the first piece
    return GenerationStream(_run(model, tokenizer, ids, params, state))


def generate(model, tokenizer, prompt, params: SamplingParams | None = None,
             state=None) -> GenerationResult:
    """Generate from ``prompt`` (a str, or a list of token ids) until a stop condition (see the
    module's docstring); ``state``: continue from this state (None: a fresh one)."""
    s = stream(model, tokenizer, prompt, params, state)
    for _ in s:
        pass
    return s.result
