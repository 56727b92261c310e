"""Text generation: a prompt in, sampled tokens out, as one result or as a stream of text.

The prompt goes to ``model.forward`` in one call (sequence mode); each generated token then
goes in alone. Text is decoded with :class:`~rwkvpy.tokenizers.StreamDecoder`, so a character
split across tokens is never emitted half-done.

Each step's token handling (sampling, log probabilities, decoding, stop strings) is
:class:`rwkvpy.generation.TokenLoop`'s, shared with the server's engine. Stopping:

- ``max_tokens`` tokens sampled: ``finish_reason`` "length";
- a token in ``stop_tokens`` sampled: "stop"; that token is not in ``tokens`` nor in the text,
  and the state has not seen it;
- a ``stop`` string appears in the text: "stop"; the text ends just before the stop string's
  first occurrence (the earliest of all stop strings). While generating, text that could be the
  beginning of a stop string is held back, so a stream never emits any part of a stop string.
  The tokens that produced it are in ``tokens`` and in the state.

The result's ``state`` has consumed the prompt and every token of ``tokens``: feed it the next
user input to continue the conversation.

Prefix cache (``cache=``, a :class:`~rwkvpy.prefix_cache.PrefixCache`): the prompt starts from
the state of its longest cached prefix and only the rest goes through the model (when the whole
prompt is cached, nothing does: its stored logits are used). While the rest is processed, the
states at the cache's checkpoints (multiples of ``cache.every``, and any position in
``checkpoints=``) and after the whole prompt are stored; when generation ends (or the stream is
closed early) the state after the prompt and the generated tokens is stored too. Cached entries
are keyed by the model and the starting ``state`` (see :func:`~rwkvpy.prefix_cache.cache_root`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .compiling import thread_seconds as compile_seconds
from .errors import RwkvpyError
from .generation import TokenLoop
from .sampling import SamplingParams
from .tokenizers import TokenizerError


class GenerationError(RwkvpyError):
    """A prompt or argument generation cannot start from."""


@dataclass(frozen=True)
class Timings:
    """Wall-clock seconds. When streaming, ``generation_seconds`` also counts the time the
    consumer spends between pieces. Time numba spent compiling kernels during the run (a first
    run with an empty cache: rwkvpy.compiling) is ``compile_seconds``, left out of the prompt's
    and the generation's seconds, so that the speeds below are those of the compiled kernels."""

    prompt_seconds: float  # the prompt's forward call
    generation_seconds: float  # sampling, the per-token forward calls and decoding
    prompt_tokens: int = 0
    completion_tokens: int = 0
    compile_seconds: float = 0.0  # compiling kernels, in either phase

    @property
    def total_seconds(self) -> float:
        """The whole run's wall-clock time, compiling included."""
        return self.prompt_seconds + self.generation_seconds + self.compile_seconds

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second."""
        return (
            self.completion_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0
        )


@dataclass(frozen=True)
class GenerationResult:
    text: str  # the generated text, without any stop string
    tokens: list  # generated token ids (a stop token excluded)
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int  # number of prompt tokens
    completion_tokens: int  # number of tokens sampled (a stop token included)
    timings: Timings
    state: object = field(repr=False)  # rwkvpy.State after the prompt and ``tokens``
    stop: object = None  # the stop string or stop token id that ended generation, if any
    seed: int | None = None  # the sampler's seed (reproduces the run with the same inputs)
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache (not processed)
    logprobs: tuple | None = None  # TokenLogprob per token of ``text`` (params.logprobs set)


def _prompt_ids(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple)) or hasattr(prompt, "tolist"):
        ids = prompt.tolist() if hasattr(prompt, "tolist") else list(prompt)
    else:
        raise GenerationError(
            f"prompt must be a str or a list of token ids, got {type(prompt).__name__}"
        )
    if not ids:
        raise GenerationError(
            "the prompt is empty: the model needs at least one token to predict the next one"
        )
    return ids


def _check(model, tokenizer, params):
    if params is None:
        params = SamplingParams()
    if not isinstance(params, SamplingParams):
        raise GenerationError(f"params must be a SamplingParams, got {type(params).__name__}")
    V = model.config.vocab_size
    if tokenizer.vocab_size > V:
        raise TokenizerError(
            f"the {tokenizer.name} tokenizer (vocab size {tokenizer.vocab_size}) "
            f"does not fit the model (vocab size {V})"
        )
    for i in params.stop_tokens:
        if i >= V:
            raise GenerationError(
                f"stop token id {i} is out of range: the model's vocabulary has ids 0..{V - 1}"
            )
    return params


def _process_prompt(model, ids: list, state, cache, checkpoints, live):
    """(logits, state, cached tokens) after ``ids``, from the longest cached prefix if any."""
    if cache is None:
        logits, state = model.forward(ids, state)
        return logits, state, 0
    from .prefix_cache import cache_root

    root = cache_root(model, state)
    live._cache_root = root
    n, cached, logits = cache.lookup(ids, root=root)
    if n == len(ids) and logits is None:  # a stored state without logits: redo the last token
        n, cached, logits = cache.lookup(ids[:-1], root=root)
    start = n
    if n:
        state = cached
    cuts = sorted(
        {
            c
            for c in list(cache.checkpoints(start, len(ids))) + list(checkpoints)
            if start < c < len(ids)
        }
    )
    for end in cuts + [len(ids)]:
        if end > start:
            logits, state = model.forward(ids[start:end], state)
            cache.insert(ids[:end], state, root=root)
            start = end
    return logits, state, n


def _run(
    model,
    tokenizer,
    ids: list,
    params: SamplingParams,
    state,
    cache=None,
    checkpoints=(),
    live=None,
    processors=(),
):
    """Yields the text pieces; returns the GenerationResult. ``live`` (a GenerationStream) is
    kept up to date with the progress, so an interrupted run leaves a consistent account."""
    if live is None:
        live = GenerationStream(iter(()))
    loop = TokenLoop(tokenizer, params, processors)
    c0 = compile_seconds()
    t0 = time.perf_counter()
    logits, state, cached = _process_prompt(model, ids, state, cache, checkpoints, live)
    live._progress = (0, state)
    live.prompt_state = state
    t1 = time.perf_counter()
    c1 = compile_seconds()
    live._tokens = tokens = loop.tokens
    parts: list[str] = []

    try:
        while not loop.done:
            token = loop.choose(logits)
            if token is None:
                break
            logits, state = model.forward([token], state)
            event = loop.accept(token)
            live._progress = (len(tokens), state)  # one assignment: never half updated
            if event is not None:
                parts.append(event.text)
                live.text += event.text
                yield event.text
        event = loop.close()
        if event is not None and event.text:
            parts.append(event.text)
            live.text += event.text
            yield event.text
    finally:
        n, done = live._progress
        if cache is not None and n:
            cache.insert(ids + tokens[:n], done, root=live._cache_root)
    t2 = time.perf_counter()
    c2 = compile_seconds()
    # never negative: compile seconds are counted per thread, and a stream may move between them
    cp, cg = max(0.0, c1 - c0), max(0.0, c2 - c1)
    timings = Timings(t1 - t0 - cp, t2 - t1 - cg, len(ids) - cached, loop.sampled, cp + cg)
    return GenerationResult(
        text="".join(parts),
        tokens=list(tokens),
        finish_reason=loop.finish_reason,
        prompt_tokens=len(ids),
        completion_tokens=loop.sampled,
        timings=timings,
        state=state,
        stop=loop.stop,
        seed=loop.seed,
        cached_tokens=cached,
        logprobs=(tuple(loop.logprobs) if params.logprobs is not None else None),
    )


class GenerationStream:
    """An iterator of the generated text pieces; ``result`` is the GenerationResult once the
    iteration has ended (None before). ``close()`` stops generating early.

    Progress so far, consistent at every moment (also after an interruption such as a
    KeyboardInterrupt inside the model): ``prompt_state`` (the state after the prompt; None
    until it is processed), ``tokens`` (generated tokens the state has consumed), ``state``
    (after the prompt and ``tokens``) and ``text`` (the text emitted so far).
    """

    def __init__(self, gen):
        self._gen = gen
        self.result: GenerationResult | None = None
        self.prompt_state = None
        self.text = ""
        self._tokens: list[int] = []
        self._progress = (0, None)  # (how many of _tokens the state has read, that state)
        self._cache_root = None

    @property
    def tokens(self) -> list[int]:
        return self._tokens[: self._progress[0]]

    @property
    def state(self):
        return self._progress[1]

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


def stream(
    model,
    tokenizer,
    prompt,
    params: SamplingParams | None = None,
    state=None,
    cache=None,
    checkpoints=(),
    processors=(),
) -> GenerationStream:
    """Generate from ``prompt`` (a str, or a list of token ids), yielding text pieces as they
    are decided. Concatenated, the pieces are the result's ``text``; the stream's ``result``
    holds the :class:`GenerationResult` once it is exhausted. ``state``: continue from this
    state (None: a fresh one); it is not modified. ``cache``: a PrefixCache to start from and
    fill (see the module's docstring); ``checkpoints``: extra prompt positions whose states
    are stored in it; ``processors``: :class:`~rwkvpy.processors.LogitsProcessor` objects for
    this run (each step's logits go through them before the draw)."""
    params = _check(model, tokenizer, params)
    ids = _prompt_ids(tokenizer, prompt)  # bad prompts fail here, not at the first piece
    if cache is not None and not hasattr(cache, "lookup"):
        raise GenerationError(f"cache must be a PrefixCache, got {type(cache).__name__}")
    live = GenerationStream(None)
    live._gen = _run(
        model, tokenizer, ids, params, state, cache, tuple(checkpoints), live, tuple(processors)
    )
    return live


def generate(
    model,
    tokenizer,
    prompt,
    params: SamplingParams | None = None,
    state=None,
    cache=None,
    processors=(),
) -> GenerationResult:
    """Generate from ``prompt`` (a str, or a list of token ids) until a stop condition (see the
    module's docstring); ``state``: continue from this state (None: a fresh one); ``cache``: a
    PrefixCache (see the module's docstring); ``processors``: as for :func:`stream`."""
    s = stream(model, tokenizer, prompt, params, state, cache, processors=processors)
    for _ in s:
        pass
    return s.result
