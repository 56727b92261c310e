"""Perplexity of a model on a token sequence: the measure of a format's quality.

Example::

    import rwkvpy
    from rwkvpy.perplexity import perplexity
    from rwkvpy.tokenizers import ByteTokenizer

    model = rwkvpy.load("model.bin")
    r = perplexity(model, ByteTokenizer().encode(text), ignore_first=128)
    print(r.nll, r.perplexity, r.tokens)

What is scored: the model reads tokens 0..T-1 in order; after token i its logits predict token
i+1. Token 0 has no prediction, so a sequence of T tokens gives T-1 scored predictions, of tokens
1..T-1. ``ignore_first=N`` leaves out the predictions of tokens 0..N-1 (they are context, a
warm-up of the state), so ``T - max(N, 1)`` tokens are scored. ``nll`` is the mean negative log
likelihood of the scored tokens in nats (natural log), and ``perplexity = exp(nll)``.

The sequence runs in sequence mode, ``chunk`` tokens per call with the state carried from call
to call: the result does not depend on ``chunk`` (beyond float32 rounding), only the speed and
the memory of the (chunk, vocab) logits do. The last token is never fed (nothing follows it).
"""

from __future__ import annotations

import math
import operator
import sys
import time
from dataclasses import asdict, dataclass

import torch

from .errors import RwkvpyError

#: Tokens per model call. 512 is near the fastest on CPU for every size measured; a 65536-token
#: vocabulary makes (512, 65536) float32 logits, 128 MiB.
DEFAULT_CHUNK = 512


class PerplexityError(RwkvpyError):
    """Bad input to a perplexity run: too few tokens to score, a bad chunk size or count."""


@dataclass(frozen=True)
class PerplexityResult:
    nll: float  # mean negative log likelihood of the scored tokens, nats per token
    perplexity: float  # exp(nll)
    tokens: int  # tokens scored
    tokens_total: int  # tokens in the sequence (including the first one and ignored ones)
    ignored: int  # tokens at the start whose predictions were not scored (max(ignore_first, 1))
    nll_sum: float  # total negative log likelihood of the scored tokens, nats
    seconds: float  # time spent in the model and the scoring
    tokens_per_s: float  # tokens fed through the model per second
    chunk: int

    def to_dict(self) -> dict:
        return asdict(self)


def _token_tensor(tokens) -> torch.Tensor:
    if isinstance(tokens, torch.Tensor):
        t = tokens
    elif isinstance(tokens, (list, tuple)) and not tokens:
        t = torch.zeros(0, dtype=torch.long)
    else:
        try:
            t = torch.as_tensor(tokens if hasattr(tokens, "__array__") else list(tokens))
        except (TypeError, ValueError, RuntimeError):
            raise PerplexityError("tokens must be a sequence of ints") from None
    if t.dim() != 1 or t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise PerplexityError(
            f"tokens must be a 1-D sequence of ints, got {t.dtype} of shape {tuple(t.shape)}"
        )
    return t.long()


def _count(value, name: str, minimum: int) -> int:
    try:
        n = operator.index(value)
    except TypeError:
        raise PerplexityError(f"{name} must be an int, got {value!r}") from None
    if n < minimum:
        raise PerplexityError(f"{name} must be at least {minimum}, got {n}")
    return n


def check_scorable(n_tokens: int, ignore_first: int = 0, source: str = "the text") -> int:
    """How many tokens a sequence of ``n_tokens`` scores with ``ignore_first``; a
    PerplexityError naming ``source`` when none is left."""
    start = max(ignore_first, 1)
    if n_tokens == 0:
        raise PerplexityError(f"{source} has no tokens: nothing to evaluate")
    if n_tokens <= start:
        if ignore_first > 1:
            raise PerplexityError(
                f"{source} has {n_tokens} tokens; ignoring the first {ignore_first} leaves none "
                f"to score (at least {ignore_first + 1} tokens are needed)"
            )
        raise PerplexityError(
            f"{source} has {n_tokens} token; at least 2 are needed (the "
            "first token has no prediction)"
        )
    return n_tokens - start


def _bar(total: int, progress):
    if progress is True:
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency
            return None
        return tqdm(
            total=total,
            unit="tok",
            desc="perplexity",
            leave=False,
            file=sys.stderr,
            dynamic_ncols=True,
            smoothing=0.1,
        )
    return None


@torch.no_grad()
def perplexity(
    model, tokens, chunk: int = DEFAULT_CHUNK, ignore_first: int = 0, progress=False
) -> PerplexityResult:
    """Score ``tokens`` with ``model`` (see the module docstring for what is scored).

    Args:
        model: a :class:`rwkvpy.Model`.
        tokens: the token ids (list, tuple, 1-D tensor or array of ints).
        chunk: tokens per model call (the state is carried between calls).
        ignore_first: the predictions of the first ``ignore_first`` tokens are not scored.
        progress: True for a tqdm bar on stderr (tokens, rate, ETA, running perplexity), or a
            callable ``progress(done, total)`` called after each chunk with tokens fed so far.

    Raises:
        PerplexityError: no token left to score, a bad ``chunk`` or ``ignore_first``.
        rwkvpy.errors.TokenError: a token id outside the model's vocabulary.
    """
    chunk = _count(chunk, "chunk", 1)
    ignore_first = _count(ignore_first, "ignore_first", 0)
    t = _token_tensor(tokens)
    T = int(t.shape[0])
    scored = check_scorable(T, ignore_first, "the token sequence")
    start = T - scored  # index of the first scored token
    model._tokens(t)  # every id checked up front, not after minutes of work
    fed = T - 1  # the last token predicts nothing
    bar = _bar(fed, progress)
    call = progress if callable(progress) else None
    nll_sum = torch.zeros((), dtype=torch.float64)
    state = None
    t0 = time.perf_counter()
    try:
        for a in range(0, fed, chunk):
            b = min(fed, a + chunk)
            # rows a..b-1 predict tokens a+1..b; rows below start-1 are not scored
            if b < start:
                _, state = model.forward(t[a:b], state)
            else:
                logits, state = model.forward(t[a:b], state, all_logits=True)
                lo = max(start - 1 - a, 0)
                rows = logits[lo:]
                target = t[a + 1 + lo : b + 1].unsqueeze(1).to(rows.device)
                picked = rows.gather(1, target).squeeze(1)
                nll_sum += (torch.logsumexp(rows, dim=-1) - picked).double().sum().cpu()
                del logits, rows
            if bar is not None:
                bar.update(b - a)
                done = b + 1 - start
                if done > 0:
                    bar.set_postfix(ppl=f"{math.exp(float(nll_sum) / done):.4g}", refresh=False)
            if call is not None:
                call(b, fed)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    nll = float(nll_sum) / scored
    return PerplexityResult(
        nll=nll,
        perplexity=math.exp(nll) if nll < 700 else math.inf,
        tokens=scored,
        tokens_total=T,
        ignored=start,
        nll_sum=float(nll_sum),
        seconds=seconds,
        tokens_per_s=fed / seconds if seconds > 0 else math.inf,
        chunk=chunk,
    )
