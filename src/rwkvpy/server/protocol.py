"""OpenAI request bodies in, generation specs out: every check, with OpenAI-style errors.

Nothing here touches the model: a parsed request is a list of prompts (token ids, with the
state they start from) and a :class:`~rwkvpy.sampling.SamplingParams` per choice.

Parameter mapping (OpenAI -> rwkvpy):

- ``temperature`` (default 1; 0 = greedy), ``top_p`` (default 1; 0 = greedy), ``max_tokens``
  (``max_completion_tokens`` for chat; default 16 for completions, the server's limit for chat;
  above the limit: 400), ``stop`` (a string or a list of up to 16), ``seed`` (choice i of a
  request draws with ``seed + i``; none: a fresh seed each), ``presence_penalty`` and
  ``frequency_penalty`` (BlinkDL's alpha_presence / alpha_frequency, decayed by
  ``penalty_decay``, 0.996 unless given), ``logit_bias`` ({"token id": bias in [-100, 100]}),
  ``n`` (choices), ``stream`` and ``stream_options.include_usage``; completions: ``prompt``
  (a string, a list of token ids, or a list of either), ``echo``.
- rwkvpy extensions: ``top_k``, ``min_p``, ``penalty_decay``, ``state`` (start from a named
  state, see ``POST /v1/states``).
- Log probabilities: completions' ``logprobs`` (0-20 alternatives per token; with ``echo``
  the prompt's tokens are scored too, and ``max_tokens: 0`` scores a text without generating),
  chat's ``logprobs: true`` with ``top_logprobs`` (0-20); shapes in server/responses.py.
- Structured outputs and tool calls: ``response_format`` (text, ``json_object``,
  ``json_schema``), rwkvpy's ``grammar`` extension, and chat's ``tools``, ``tool_choice``,
  ``parallel_tool_calls``, ``role: "tool"`` messages and assistant ``tool_calls``: see
  server/structured.py.
- Refused with 400 (they would change what the client gets without it noticing):
  ``suffix``, ``best_of`` above ``n``, the deprecated ``functions``. Other unknown fields are
  ignored, as OpenAI's clients send some (``user``, ``metadata``...).

Chat format (RWKV's): each message is rendered as ``System: ...\\n\\n``, ``User: ...\\n\\n`` or
``Assistant: ...\\n\\n`` (``developer`` counts as system), and the prompt ends with
``Assistant:``; the stop string ``"\\n\\n"`` is always added. Message text is normalized as
:func:`rwkvpy.chat.normalize_message` does (no blank line inside a message, no surrounding
whitespace). Each message is encoded on its own (then concatenated), so earlier messages always
give the same tokens and a conversation's next turn finds its past in the prefix cache; an
assistant message is encoded as ``"Assistant:"`` then ``" " + content + "\\n\\n"``, which is how
a generated reply reads.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..chat import normalize_message
from ..sampling import SamplingError, SamplingParams
from .api_error import ApiError, bad

CHAT_STOP = "\n\n"
MAX_STOPS = 16
MAX_LOGPROBS = 20
ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
STATE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class Limits:
    max_tokens: int = 4096  # the most tokens one choice may ask for
    max_sequences: int = 64  # choices (prompts x n) one request may ask for
    default_completion_tokens: int = 16
    max_prompt_tokens: int = 32768  # the longest prompt (a chat's whole conversation)


@dataclass
class Prompt:
    ids: list  # token ids (non-empty)
    text: str | None = None  # the text, when given as text (for echo)
    checkpoints: tuple = ()  # positions whose states are worth caching (turn boundaries)


@dataclass
class Spec:
    kind: str  # "completion" or "chat"
    prompts: list  # of Prompt
    params: list  # SamplingParams per choice (n of them)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    state: str | None = None  # named starting state
    logprobs: int | None = None  # alternatives per token with log probabilities; None: none
    extra: dict = field(default_factory=dict)


# -- field checks --------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def get_int(body, name, default, lo=None, hi=None):
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v):
        raise bad(f"'{name}' must be an integer, got {_show(v)}", name)
    if lo is not None and v < lo:
        raise bad(f"'{name}' must be >= {lo}, got {v}", name)
    if hi is not None and v > hi:
        raise bad(f"'{name}' must be <= {hi}, got {v}", name)
    return v


def get_num(body, name, default, lo=None, hi=None):
    v = body.get(name)
    if v is None:
        return default
    if not _is_num(v):
        raise bad(f"'{name}' must be a number, got {_show(v)}", name)
    if lo is not None and v < lo:
        raise bad(f"'{name}' must be >= {lo}, got {v}", name)
    if hi is not None and v > hi:
        raise bad(f"'{name}' must be <= {hi}, got {v}", name)
    return float(v)


def get_bool(body, name, default=False):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be true or false, got {_show(v)}", name)
    return v


def _show(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def check_unicode(body) -> None:
    """400 unless every string of the body (keys included) is valid Unicode: JSON's escapes
    can make lone surrogates ("\\ud800"), which no tokenizer encodes and no response can
    carry back."""
    stack = [body]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                raise bad(
                    f"the request holds a lone surrogate (U+{ord(v[e.start]):04X}) in the "
                    f"string {_show(v)}: text must be valid Unicode",
                    code="invalid_unicode",
                ) from None


def check_prompt_tokens(prompts, limits: Limits) -> None:
    """400 for a prompt longer than the server's --max-prompt-tokens."""
    for p in prompts:
        if len(p.ids) > limits.max_prompt_tokens:
            raise bad(
                f"the prompt is {len(p.ids)} tokens; this server takes at most "
                f"{limits.max_prompt_tokens} (--max-prompt-tokens)",
                code="context_length_exceeded",
            )


def check_model(body, served: list) -> str:
    name = body.get("model")
    if name is None:
        return served[0]
    if not isinstance(name, str):
        raise bad(f"'model' must be a string, got {_show(name)}", "model")
    if name not in served:
        raise ApiError(
            404,
            f"The model '{name}' does not exist: this server serves "
            f"{', '.join(repr(s) for s in served)}",
            param="model",
            code="model_not_found",
        )
    return name


def state_name(body, name="state"):
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, str) or not STATE_ID.fullmatch(v):
        raise bad(
            f"'{name}' must be a state id (letters, digits, '.', '_', '-'; at most 64), "
            f"got {_show(v)}",
            name,
        )
    return v


# -- sampling ------------------------------------------------------------------------------------
def sampling(
    body, *, vocab_size: int, max_tokens: int, n: int, extra_stop=(), logprobs=None, constraint=None
) -> list:
    """One SamplingParams per choice; ``constraint``: their json_schema/json_object/grammar."""
    temperature = get_num(body, "temperature", 1.0, lo=0)
    top_p = get_num(body, "top_p", 1.0, lo=0, hi=1)
    greedy = temperature == 0.0 or top_p == 0.0
    if top_p == 0.0:
        top_p = 1.0
    kw = {
        "temperature": temperature,
        "top_p": top_p,
        "greedy": greedy,
        "top_k": get_int(body, "top_k", 0, lo=0),
        "min_p": get_num(body, "min_p", 0.0, lo=0),
        "presence_penalty": get_num(body, "presence_penalty", 0.0, lo=-2, hi=2),
        "frequency_penalty": get_num(body, "frequency_penalty", 0.0, lo=-2, hi=2),
        "max_tokens": max_tokens,
        "logprobs": logprobs,
        **(constraint or {}),
    }
    decay = get_num(body, "penalty_decay", None)
    if decay is not None:
        kw["penalty_decay"] = decay
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise bad("'logit_bias' must be an object mapping token ids to biases", "logit_bias")
        clean = {}
        for k, v in bias.items():
            try:
                tid = int(k)
            except (TypeError, ValueError):
                raise bad(f"logit_bias key {_show(k)} is not a token id", "logit_bias") from None
            if not 0 <= tid < vocab_size:
                raise bad(
                    f"logit_bias token id {tid} is out of range: the model's vocabulary has "
                    f"ids 0..{vocab_size - 1}",
                    "logit_bias",
                )
            if not _is_num(v) or not -100 <= v <= 100:
                raise bad(
                    f"logit_bias[{k}] must be a number in [-100, 100], got {_show(v)}", "logit_bias"
                )
            clean[tid] = float(v)
        kw["logit_bias"] = clean
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise bad("'stop' must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOPS:
        raise bad(f"'stop' may hold at most {MAX_STOPS} strings, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise bad("stop strings must not be empty", "stop")
    kw["stop"] = tuple(dict.fromkeys(stops + list(extra_stop)))
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63 - 1024):
        raise bad(f"'seed' must be an integer in [0, 2^63 - 1024), got {_show(seed)}", "seed")
    out = []
    for i in range(n):
        try:
            out.append(SamplingParams(**kw, seed=None if seed is None else seed + i))
        except SamplingError as e:
            raise bad(str(e)) from None
    return out


def logprobs_asked(body, kind: str):
    """How many alternatives per token the request wants with log probabilities, or None for
    no log probabilities: completions' ``logprobs`` (an integer); chat's ``logprobs`` (true or
    false) and ``top_logprobs`` (an integer, which needs ``logprobs: true``)."""
    if kind == "completion":
        return get_int(body, "logprobs", None, lo=0, hi=MAX_LOGPROBS)
    on = get_bool(body, "logprobs")
    top = get_int(body, "top_logprobs", None, lo=0, hi=MAX_LOGPROBS)
    if top is not None and not on:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if on else None


def _refuse_unsupported(body, kind: str) -> None:
    if kind == "completion":
        if body.get("suffix") not in (None, ""):
            raise bad("'suffix' is not supported by this server", "suffix", "unsupported")
    else:
        if body.get("functions"):
            raise bad(
                "the deprecated 'functions' is not supported: give 'tools'",
                "functions",
                "unsupported",
            )
    if kind == "completion" and body.get("tools"):
        raise bad("'tools' work with /v1/chat/completions", "tools", "unsupported")


def _common(
    body, kind: str, limits: Limits, vocab_size: int, n_prompts: int, default_max, tools=None
):
    from .structured import constraint_kw, tools_kw

    _refuse_unsupported(body, kind)
    constraint = tools_kw(tools, constraint_kw(body))
    n = get_int(body, "n", 1, lo=1)
    if n * n_prompts > limits.max_sequences:
        raise bad(
            f"this request asks for {n * n_prompts} choices; this server allows at most "
            f"{limits.max_sequences} per request",
            "n",
        )
    best_of = get_int(body, "best_of", None, lo=1)
    if best_of is not None and best_of != n:
        raise bad(
            "'best_of' other than n is not supported by this server", "best_of", "unsupported"
        )
    name = "max_tokens"
    mt = body.get("max_tokens")
    if kind == "chat" and mt is None and body.get("max_completion_tokens") is not None:
        name = "max_completion_tokens"
    max_tokens = get_int(body, name, default_max, lo=0)
    if max_tokens > limits.max_tokens:
        raise bad(
            f"'{name}' is {max_tokens}; this server allows at most {limits.max_tokens}",
            name,
            "max_tokens_too_large",
        )
    stream = get_bool(body, "stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad("'stream_options' must be an object", "stream_options")
        include_usage = get_bool(opts, "include_usage")
    logprobs = logprobs_asked(body, kind)
    params = sampling(
        body,
        vocab_size=vocab_size,
        max_tokens=max_tokens,
        n=n,
        extra_stop=(CHAT_STOP,) if kind == "chat" else (),
        logprobs=logprobs,
        constraint=constraint,
    )
    return n, stream, include_usage, params


# -- completions ---------------------------------------------------------------------------------
def _ids(v, vocab_size, param="prompt"):
    for t in v:
        if not _is_int(t) or not 0 <= t < vocab_size:
            raise bad(
                f"token id {_show(t)} in '{param}' is out of range: the model's vocabulary "
                f"has ids 0..{vocab_size - 1}",
                param,
            )
    return list(v)


def completion_prompts(body, vocab_size: int) -> list:
    """The raw prompts: a list of str or of token-id lists (not yet encoded)."""
    p = body.get("prompt")
    if p is None:
        raise bad("'prompt' is required", "prompt")
    if isinstance(p, str):
        items = [p]
    elif isinstance(p, list) and p and all(_is_int(t) for t in p):
        items = [_ids(p, vocab_size)]
    elif isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
        items = []
        for x in p:
            if isinstance(x, list):
                if not x or not all(_is_int(t) for t in x):
                    raise bad(
                        "'prompt' must be a string, a list of token ids, or a list of "
                        "either (none empty)",
                        "prompt",
                    )
                items.append(_ids(x, vocab_size))
            else:
                items.append(x)
    else:
        raise bad("'prompt' must be a string, a list of token ids, or a list of either", "prompt")
    if any(len(x) == 0 for x in items):
        raise bad(
            "the prompt is empty: the model needs at least one token to predict the next", "prompt"
        )
    return items


def parse_completion(body, limits: Limits, vocab_size: int) -> tuple:
    """(Spec without encoded prompts, raw prompts)."""
    raw = completion_prompts(body, vocab_size)
    n, stream, include_usage, params = _common(
        body, "completion", limits, vocab_size, len(raw), limits.default_completion_tokens
    )
    spec = Spec(
        "completion",
        [],
        params,
        n=n,
        stream=stream,
        include_usage=include_usage,
        echo=get_bool(body, "echo"),
        state=state_name(body),
        logprobs=params[0].logprobs,
    )
    return spec, raw


def encode_prompts(raw: list, tokenizer) -> list:
    out = []
    for x in raw:
        if isinstance(x, str):
            ids = tokenizer.encode(x)
            if not ids:
                raise bad("the prompt is empty after tokenization", "prompt")
            out.append(Prompt(ids, text=x))
        else:
            out.append(Prompt(list(x)))
    return out


# -- chat ------------------------------------------------------------------------------------------
def message_text(m, i: int) -> str:
    c = m.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for p in c:
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                raise bad(
                    f"messages[{i}].content: only text parts are supported",
                    f"messages[{i}].content",
                    "unsupported",
                )
        return "".join(parts)
    raise bad(
        f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content"
    )


def check_messages(body, *, required=True) -> list:
    msgs = body.get("messages")
    if msgs is None and not required:
        return None
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list", "messages")
    from .structured import assistant_calls_text, call_names, tool_label

    out = []
    names = None
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object", f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES and role != "tool":
            raise bad(
                f"messages[{i}].role must be one of {', '.join(ROLES)}, tool, got {_show(role)}",
                f"messages[{i}].role",
                "unsupported" if isinstance(role, str) else None,
            )
        text = message_text(m, i)
        if role == "assistant" and m.get("tool_calls"):
            calls = assistant_calls_text(m["tool_calls"], i)
            text = f"{text}\n{calls}" if text.strip() else calls
        if role == "tool":  # rendered under its own label: "Tool (name): ..."
            if names is None:
                names = call_names(msgs)
            role = tool_label(m, names)
        out.append((role, normalize_message(text)))
    return out


def render_messages(messages, tokenizer, generation_prompt: bool = True) -> Prompt:
    """Token ids of the conversation in RWKV's chat format (see the module's docstring)."""
    ids: list = []
    boundary = 0
    for role, text in messages:
        if role == "assistant":
            ids += tokenizer.encode("Assistant:") + tokenizer.encode(f" {text}{CHAT_STOP}")
            boundary = len(ids)
        else:
            ids += tokenizer.encode(f"{ROLES.get(role, role)}: {text}{CHAT_STOP}")
    if generation_prompt:
        ids += tokenizer.encode("Assistant:")
    text = "".join(
        (f"Assistant: {t}{CHAT_STOP}" if r == "assistant" else f"{ROLES.get(r, r)}: {t}{CHAT_STOP}")
        for r, t in messages
    )
    if generation_prompt:
        text += "Assistant:"
    return Prompt(ids, text=text, checkpoints=(boundary,) if 0 < boundary < len(ids) else ())


def parse_chat(body, limits: Limits, vocab_size: int) -> tuple:
    """(Spec without encoded prompts, checked messages). With tools that constrain the reply,
    their system message comes first and ``spec.extra["tools"]`` holds them."""
    from .structured import parse_tools

    msgs = check_messages(body)
    tools = parse_tools(body)
    n, stream, include_usage, params = _common(
        body, "chat", limits, vocab_size, 1, limits.max_tokens, tools=tools
    )
    spec = Spec(
        "chat",
        [],
        params,
        n=n,
        stream=stream,
        include_usage=include_usage,
        state=state_name(body),
        logprobs=params[0].logprobs,
    )
    if tools is not None and tools.active:
        msgs = [("system", tools.system_text())] + msgs
        spec.extra["tools"] = tools
    return spec, msgs
