"""Choosing the next token from logits.

:class:`SamplingParams` holds every knob, checked when it is made; :class:`Sampler` applies them
to one logits vector at a time and remembers what it chose (for the penalties).

Order of operations on the float32 logits of one step:

1. ``logit_bias``: ``logits[id] += bias``;
2. penalties (BlinkDL's ``alpha_presence`` / ``alpha_frequency`` / ``alpha_decay``): every token
   generated so far loses ``presence_penalty + frequency_penalty * count``, where ``count`` is
   its decayed number of occurrences: after each chosen token, all counts are multiplied by
   ``penalty_decay`` and then the chosen token's count grows by 1. The presence part does not
   decay: it stays once a token has appeared. (BlinkDL's pipeline also counts whitespace and
   digit tokens as 0 occurrences; rwkvpy counts every token alike.) Prompt tokens do not count;
3. ``banned_tokens``: ``-inf``;
4. greedy (``greedy=True`` or ``temperature == 0``): the id of the largest logit (the lowest such
   id on a tie); otherwise
5. ``logits / temperature``, softmax, then ``top_k`` (keep the k most probable), ``top_p`` (keep
   the most probable tokens whose mass first reaches ``top_p``; the most probable always stays),
   ``min_p`` (drop tokens less probable than ``min_p`` times the most probable), each on the
   renormalized result of the one before, and one draw from what is left.

Draws use a ``torch.Generator`` owned by the sampler (seeded from ``seed``), never the global
random state: the same seed and the same logits give the same tokens.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch

from .errors import SamplingError

__all__ = ["Sampler", "SamplingError", "SamplingParams"]


def _number(name, v, *, lo=None, hi=None, lo_open=False, hi_open=False, what=""):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise SamplingError(f"{name} must be a finite number{what}, got {v!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise SamplingError(f"{name} must be {'>' if lo_open else '>='} {lo}{what}, got {v!r}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise SamplingError(f"{name} must be {'<' if hi_open else '<='} {hi}{what}, got {v!r}")
    return float(v)


def _int(name, v, *, lo=0):
    if isinstance(v, bool):
        raise SamplingError(f"{name} must be an int, got {v!r}")
    try:
        i = operator.index(v)
    except TypeError:
        raise SamplingError(f"{name} must be an int, got {v!r}") from None
    if i < lo:
        raise SamplingError(f"{name} must be >= {lo}, got {i}")
    return i


def _ids(name, v) -> tuple:
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v,)
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        raise SamplingError(f"{name} must be a list of token ids, got {v!r}")
    return tuple(_int(f"{name} entry", i) for i in v)


@dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens and when to stop (see the module's docstring for the order).

    temperature: >= 0; 0 means greedy. top_p: in (0, 1]; 1 keeps all. top_k: >= 0; 0 keeps all.
    min_p: in [0, 1); 0 keeps all. presence_penalty, frequency_penalty: any finite number
    (BlinkDL's alpha_presence, alpha_frequency; negative values favour repeats).
    penalty_decay: in (0, 1] (BlinkDL's alpha_decay; 1 = counts never fade).
    logit_bias: {token id: added to its logit} (finite, or -inf to ban).
    banned_tokens: ids that are never chosen. stop: strings that end generation (a str or a list;
    the stop string itself is not part of the output). stop_tokens: ids that end generation (not
    part of the output). max_tokens: the most tokens to generate (>= 0). seed: an int for
    reproducible draws; None draws a fresh seed (see ``Sampler.seed``). greedy: always take the
    most likely token. logprobs: None, or report each chosen token's log probability and the
    ``logprobs`` most probable alternatives (0: the chosen token's alone); see
    :mod:`rwkvpy.generation` for what they are computed from.
    Structured output (at most one of the three; see :mod:`rwkvpy.constrain`, needs
    ``rwkvpy[structured]``): json_schema: the output is JSON valid under this schema (a dict or
    JSON text); json_object: the output is a JSON object; grammar: the output follows this
    grammar (GBNF or Lark text). A bad schema or grammar is a
    :class:`~rwkvpy.constrain.ConstraintError` (a SamplingError) here.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_decay: float = 0.996
    logit_bias: dict = field(default_factory=dict)
    banned_tokens: tuple = ()
    stop: tuple = ()
    stop_tokens: tuple = ()
    max_tokens: int = 256
    seed: int | None = None
    greedy: bool = False
    logprobs: int | None = None
    json_schema: dict | str | None = None
    json_object: bool = False
    grammar: str | None = None

    def __post_init__(self):
        put = object.__setattr__.__get__(self)  # frozen: normalize in place once
        put("temperature", _number("temperature", self.temperature, lo=0))
        put("top_p", _number("top_p", self.top_p, lo=0, hi=1, lo_open=True, what=" in (0, 1]"))
        put("top_k", _int("top_k", self.top_k))
        put("min_p", _number("min_p", self.min_p, lo=0, hi=1, hi_open=True, what=" in [0, 1)"))
        put("presence_penalty", _number("presence_penalty", self.presence_penalty))
        put("frequency_penalty", _number("frequency_penalty", self.frequency_penalty))
        put(
            "penalty_decay",
            _number(
                "penalty_decay", self.penalty_decay, lo=0, hi=1, lo_open=True, what=" in (0, 1]"
            ),
        )
        bias = self.logit_bias if self.logit_bias is not None else {}
        if not isinstance(bias, dict):
            raise SamplingError(f"logit_bias must be a dict {{token id: bias}}, got {bias!r:.80}")
        clean = {}
        for k, v in bias.items():
            k = _int("logit_bias token id", k)
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or math.isnan(v)
                or v == math.inf
            ):
                raise SamplingError(f"logit_bias[{k}] must be a finite number or -inf, got {v!r}")
            clean[k] = float(v)
        put("logit_bias", clean)
        banned = self.banned_tokens
        put("banned_tokens", _ids("banned_tokens", () if banned is None else banned))
        stop = self.stop if self.stop is not None else ()
        if isinstance(stop, str):
            stop = (stop,)
        if isinstance(stop, bytes) or not hasattr(stop, "__iter__"):
            raise SamplingError(f"stop must be a string or a list of strings, got {stop!r:.80}")
        stop = tuple(stop)
        for s in stop:
            if not isinstance(s, str) or not s:
                raise SamplingError(f"stop strings must be non-empty str, got {s!r:.80}")
        put("stop", stop)
        stop_tokens = self.stop_tokens
        put("stop_tokens", _ids("stop_tokens", () if stop_tokens is None else stop_tokens))
        put("max_tokens", _int("max_tokens", self.max_tokens))
        if self.seed is not None:
            put("seed", _int("seed", self.seed))
        if not isinstance(self.greedy, bool):
            raise SamplingError(f"greedy must be True or False, got {self.greedy!r}")
        if self.logprobs is not None:
            put("logprobs", _int("logprobs", self.logprobs))
        if not isinstance(self.json_object, bool):
            raise SamplingError(f"json_object must be True or False, got {self.json_object!r}")
        given = [n for n in ("json_schema", "grammar") if getattr(self, n) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) > 1:
            raise SamplingError(
                f"give at most one of json_schema, json_object and grammar, "
                f"got {' and '.join(given)}"
            )
        self.constraint  # noqa: B018 - checks the schema or grammar now

    @property
    def constraint(self):
        """The :class:`~rwkvpy.constrain.Constraint` of json_schema, json_object or grammar
        (None without one); the same object for the same schema or grammar."""
        if self.json_schema is None and self.grammar is None and not self.json_object:
            return None
        from .constrain import constraint_for

        if self.json_object:
            return constraint_for("json_object", None)
        if self.json_schema is not None:
            return constraint_for("json_schema", self.json_schema)
        return constraint_for("grammar", self.grammar)

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class Sampler:
    """Applies :class:`SamplingParams` to logits, one step at a time.

    ``sample(logits)`` returns a token id and records it for the penalties; ``distribution``
    gives the probabilities it would draw from (no draw, nothing recorded). One sampler serves
    one generated sequence; make a new one (or ``reset``) for the next.
    """

    def __init__(self, params: SamplingParams | None = None):
        if params is None:
            params = SamplingParams()
        if not isinstance(params, SamplingParams):
            raise SamplingError(f"params must be a SamplingParams, got {type(params).__name__}")
        self.params = params
        self.generator = torch.Generator(device="cpu")
        if params.seed is None:
            self.generator.seed()  # a fresh nondeterministic seed, in this generator only
        else:
            self.generator.manual_seed(params.seed)
        self.seed = self.generator.initial_seed()
        self.vocab_size: int | None = None
        self._counts: torch.Tensor | None = None  # float64 decayed occurrence counts
        self._seen: torch.Tensor | None = None  # bool: occurred at least once
        self._bias_ids: torch.Tensor | None = None
        self._bias_vals: torch.Tensor | None = None
        self._banned: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget the recorded tokens and restart the draws from the seed."""
        self.generator.manual_seed(self.seed)
        if self._counts is not None:
            self._counts.zero_()
            self._seen.zero_()

    # -- logits processing -----------------------------------------------------------------
    def _setup(self, V: int) -> None:
        p = self.params
        for what, ids in (("logit_bias", p.logit_bias.keys()), ("banned_tokens", p.banned_tokens)):
            for i in ids:
                if i >= V:
                    raise SamplingError(
                        f"{what} token id {i} is out of range: the model's "
                        f"vocabulary has ids 0..{V - 1}"
                    )
        self.vocab_size = V
        self._counts = torch.zeros(V, dtype=torch.float64)
        self._seen = torch.zeros(V, dtype=torch.bool)
        self._bias_ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
        self._bias_vals = torch.tensor(list(p.logit_bias.values()), dtype=torch.float32)
        self._banned = torch.tensor(p.banned_tokens, dtype=torch.long)

    def _check(self, logits) -> torch.Tensor:
        if not isinstance(logits, torch.Tensor):
            try:
                logits = torch.as_tensor(logits)
            except Exception:
                raise SamplingError(
                    f"logits must be a tensor, got {type(logits).__name__}"
                ) from None
        if logits.dim() != 1 or logits.numel() == 0:
            raise SamplingError(
                f"logits must be one non-empty vector, got shape {tuple(logits.shape)}"
            )
        V = logits.numel()
        if self.vocab_size is None:
            self._setup(V)
        elif V != self.vocab_size:
            raise SamplingError(f"logits have {V} entries, earlier ones had {self.vocab_size}")
        return logits

    def process(self, logits) -> torch.Tensor:
        """Steps 1-3 (bias, penalties, bans): a new float32 vector; ``logits`` is not changed."""
        logits = self._check(logits)
        p = self.params
        x = logits.detach().to(device="cpu", dtype=torch.float32).clone()
        if torch.isnan(x).any() or torch.isposinf(x).any():
            raise SamplingError("logits contain NaN or +inf")
        if self._bias_ids.numel():
            x.index_add_(0, self._bias_ids, self._bias_vals)
        if p.uses_penalties and bool(self._seen.any()):
            pen = torch.where(
                self._seen,
                p.presence_penalty + p.frequency_penalty * self._counts,
                torch.zeros((), dtype=torch.float64),
            )
            x -= pen.to(torch.float32)
        if self._banned.numel():
            x[self._banned] = -math.inf
        if float(x.max()) == -math.inf:
            raise SamplingError(
                "no token can be chosen: every logit is -inf (banned or biased away)"
            )
        return x

    def _candidates(self, x: torch.Tensor):
        """(ids or None for all, float64 probabilities summing to 1) after steps 5's filters."""
        p = self.params
        x = x.double() / p.temperature
        V = x.numel()
        ids = None
        if 0 < p.top_k < V:
            x, ids = torch.topk(x, p.top_k)  # sorted, largest first
        elif p.top_p < 1.0 or p.min_p > 0.0:
            x, ids = torch.sort(x, descending=True, stable=True)
        probs = torch.softmax(x, dim=0)
        if p.top_p < 1.0:
            before = torch.cumsum(probs, 0) - probs  # mass of the more probable tokens
            n = max(1, int((before < p.top_p).sum()))
            probs, ids = probs[:n], ids[:n]
            probs = probs / probs.sum()
        if p.min_p > 0.0:
            n = max(1, int((probs >= p.min_p * probs[0]).sum()))
            probs, ids = probs[:n], ids[:n]
            probs = probs / probs.sum()
        return ids, probs

    def distribution(self, logits) -> torch.Tensor:
        """The float64 probabilities (vocab,) the next draw would use (one-hot when greedy)."""
        x = self.process(logits)
        out = torch.zeros(x.numel(), dtype=torch.float64)
        if self.params.is_greedy:
            out[int(torch.argmax(x))] = 1.0
            return out
        ids, probs = self._candidates(x)
        if ids is None:
            return probs
        out[ids] = probs
        return out

    # -- choosing --------------------------------------------------------------------------
    def sample(self, logits) -> int:
        """Choose the next token and record it (see :meth:`record`)."""
        return self.choose(self.process(logits))

    def choose(self, x: torch.Tensor) -> int:
        """Steps 4-5 on logits already through :meth:`process` (and any further mask, such as
        a grammar's): draw the token and record it."""
        if self.params.is_greedy:
            token = int(torch.argmax(x))
        else:
            ids, probs = self._candidates(x)
            cdf = torch.cumsum(probs, 0)
            u = torch.rand((), dtype=torch.float64, generator=self.generator)
            i = int(torch.searchsorted(cdf, u * cdf[-1], right=True))
            i = min(i, cdf.numel() - 1)
            while i > 0 and probs[i] == 0:  # rounding at the very top of the cdf
                i -= 1
            token = i if ids is None else int(ids[i])
        self.record(token)
        return token

    def record(self, token: int) -> None:
        """Count ``token`` as generated: decay every count, then add 1 to this one's."""
        if self.vocab_size is None or not self.params.uses_penalties:
            return
        if not 0 <= token < self.vocab_size:
            raise SamplingError(f"token id {token} is out of range 0..{self.vocab_size - 1}")
        self._counts *= self.params.penalty_decay
        self._counts[token] += 1.0
        self._seen[token] = True
