"""OpenAI's response shapes: completion and chat bodies, stream chunks, usage, log probabilities.

Nothing here runs the model or reads a request: the routes (server/routes.py) hand over what the
engine produced (:mod:`rwkvpy.generation`'s events) and get JSON-ready dicts back.

Log probabilities (natural logs) come in two shapes:

- completions (OpenAI's legacy shape): ``{"tokens", "token_logprobs", "top_logprobs",
  "text_offset"}``, one entry per token; ``top_logprobs`` maps token strings to log
  probabilities; ``text_offset`` is the token's first character in the choice's ``text``
  (which starts with the prompt under ``echo``). The prompt's first token has ``null`` for its
  log probability and its alternatives: nothing predicted it;
- chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
  "bytes"}]}]}``.

Token strings: a token whose bytes are valid UTF-8 is that text. A token of a byte-level
vocabulary can hold part of a character (an emoji split over tokens); such a token is written
``"bytes:"`` followed by its bytes as ``\\xNN`` escapes (``"bytes:\\xf0\\x9f"``), as OpenAI
writes them, and the chat shape's ``bytes`` field always holds the exact byte values.
"""

from __future__ import annotations

import json

from ..tokenizers import StreamDecoder


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def totals(prompts, infos, n: int) -> dict:
    """Usage of a request: ``prompts`` (each with ``ids``), ``infos`` the DoneEvent of each
    choice (None for one that did not end), ``n`` choices per prompt."""
    pt = sum(len(p.ids) for p in prompts)
    ct = sum(i.completion_tokens for i in infos if i is not None)
    cached = sum(
        infos[pi * n].cached_tokens for pi in range(len(prompts)) if infos[pi * n] is not None
    )
    return usage(pt, ct, cached)


def sse(obj) -> str:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


DONE = "data: [DONE]\n\n"


# -- tokens as text ------------------------------------------------------------------------------
def token_string(tokenizer, token: int) -> str:
    """The token's text, or ``"bytes:\\xNN..."`` when its bytes are not valid UTF-8."""
    b = tokenizer.decode_bytes([token])
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{c:02x}" for c in b)


def prompt_offsets(tokenizer, ids) -> list:
    """The first character of each token in the prompt's decoded text (a token that ends
    inside a character starts where that character does)."""
    dec = StreamDecoder(tokenizer)
    out, n = [], 0
    for t in ids:
        out.append(n)
        n += len(dec.feed([t]))
    return out


def completion_logprobs(tokenizer, entries, offsets) -> dict:
    """The legacy shape for ``entries`` (TokenLogprob) at ``offsets`` (one per entry)."""
    tokens, lps, tops = [], [], []
    for e in entries:
        tokens.append(token_string(tokenizer, e.token))
        lps.append(e.logprob)
        tops.append(
            None if e.logprob is None else {token_string(tokenizer, t): lp for t, lp in e.top}
        )
    return {
        "tokens": tokens,
        "token_logprobs": lps,
        "top_logprobs": tops,
        "text_offset": list(offsets),
    }


def chat_logprobs(tokenizer, entries) -> dict:
    """The chat shape for ``entries`` (TokenLogprob)."""

    def one(t, lp):
        return {
            "token": token_string(tokenizer, t),
            "logprob": lp,
            "bytes": list(tokenizer.decode_bytes([t])),
        }

    return {
        "content": [
            {**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
            for e in entries
        ]
    }


# -- whole responses -----------------------------------------------------------------------------
def completion_choice(i: int, text: str, finish_reason, logprobs=None) -> dict:
    return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(i: int, content: str, finish_reason, logprobs=None) -> dict:
    return {
        "index": i,
        "message": {"role": "assistant", "content": content},
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }


def body(kind: str, meta: dict, fingerprint: str, choices: list, use: dict) -> dict:
    """A whole response (not streamed); ``meta``: id, created, model."""
    return {
        "id": meta["id"],
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": meta["created"],
        "model": meta["model"],
        "system_fingerprint": fingerprint,
        "choices": choices,
        "usage": use,
    }


class Chunks:
    """Stream chunks of one response (``kind`` "chat" or "completion")."""

    def __init__(self, kind: str, meta: dict, fingerprint: str, include_usage: bool):
        self.chat = kind == "chat"
        self.base = {
            "id": meta["id"],
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": meta["created"],
            "model": meta["model"],
            "system_fingerprint": fingerprint,
        }
        if include_usage:
            self.base["usage"] = None

    def role(self, i: int) -> str:
        """A chat choice's first chunk: the role."""
        return self._choice(
            {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        )

    def piece(self, i: int, text: str, logprobs=None) -> str:
        if self.chat:
            c = {
                "index": i,
                "delta": {"content": text},
                "logprobs": logprobs,
                "finish_reason": None,
            }
        else:
            c = completion_choice(i, text, None, logprobs)
        return self._choice(c)

    def tool_calls(self, i: int, calls: list) -> str:
        """A chat choice's tool calls, whole (``calls`` in the message shape), as a delta."""
        delta = {"content": None, "tool_calls": [dict(c, index=j) for j, c in enumerate(calls)]}
        return self._choice({"index": i, "delta": delta, "logprobs": None, "finish_reason": None})

    def finish(self, i: int, finish_reason: str) -> str:
        if self.chat:
            c = {"index": i, "delta": {}, "logprobs": None, "finish_reason": finish_reason}
        else:
            c = completion_choice(i, "", finish_reason)
        return self._choice(c)

    def usage(self, use: dict) -> str:
        return sse({**self.base, "choices": [], "usage": use})

    def _choice(self, c: dict) -> str:
        return sse({**self.base, "choices": [c]})
