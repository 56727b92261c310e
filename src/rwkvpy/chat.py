"""A multi-turn chat with an RWKV model, in the RWKV chat format.

The conversation is one text, which the model's state has read up to the end::

    System: {system}\\n\\n            (only when a system prompt is given)
    User: {message}\\n\\nAssistant:{reply}\\n\\n
    User: {message}\\n\\nAssistant:{reply}\\n\\n
    ...

A turn sends ``User: {message}\\n\\nAssistant:`` and samples until the stop string ``\\n\\n``
(a blank line): what the model wrote in between is the reply. Messages are normalized so they
cannot break the format: ``\\r\\n`` becomes ``\\n``, blank lines inside a message become single
line breaks, and leading and trailing whitespace is dropped. The model usually starts its reply
with a space (``Assistant: Hello``); the pieces :meth:`ChatSession.say` yields and the reply
stored in :attr:`ChatSession.messages` leave out the reply's leading whitespace, while the
state has read the reply exactly as generated.

The session keeps the token ids the state has read (``tokens``) and the state after them, so a
turn processes only its own tokens. With a shared :class:`~rwkvpy.prefix_cache.PrefixCache`
(``cache=``), states are also found there (another session's system prompt, a regenerated turn);
without one, the session uses a small private cache.

Interrupted replies: a reply is committed to the conversation when its iterator ends, and also
when the consumer stops early: ``close()`` (or leaving a ``with`` block, or the iterator being
garbage collected) and a KeyboardInterrupt raised while the model runs. The text emitted so far
then becomes the assistant's reply, followed by the usual blank line, and the state is brought
to exactly that text (tokens the model generated past it, such as a held-back part of the stop
string or of a character, are replaced by the blank line). The conversation therefore always
reads as the transcript shows: what was on the screen is what the model remembers. A turn
interrupted before its prompt was processed (so no reply has started) is dropped entirely.
Calling ``say``, ``regenerate``, ``reset``, ``save`` or ``load`` while a reply is still open
ends it first in the same way (a reply never iterated at all is dropped).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re

from .errors import RwkvpyError
from .generate import stream
from .prefix_cache import PrefixCache, cache_root, state_nbytes
from .sampling import SamplingParams

STOP = "\n\n"
SIDECAR_SUFFIX = ".chat.json"
CHAT_FORMAT = "rwkvpy-chat"
CHAT_FORMAT_VERSION = 2  # the transcript inside the state file
LEGACY_FORMAT_VERSION = 1  # the transcript in PATH.chat.json beside the state file


class ChatError(RwkvpyError):
    """A chat operation that cannot be done: an empty message, nothing to regenerate, a saved
    chat that does not belong to this model or tokenizer, or a broken chat file."""


def normalize_message(text) -> str:
    """A message as it is put in the conversation (see the module's docstring)."""
    if not isinstance(text, str):
        raise ChatError(f"a message must be a str, got {type(text).__name__}")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"\n\s*\n", "\n", text)
    return text.strip()


def render_system(text: str) -> str:
    return f"System: {text}{STOP}"


def render_user(text: str) -> str:
    return f"User: {text}{STOP}Assistant:"


class ChatReply:
    """The pieces of one reply, as an iterator. ``text`` is the reply so far (leading whitespace
    left out); ``result`` the GenerationResult once the reply ended normally (None when it was
    interrupted); ``committed`` tells whether the turn is in the conversation. ``close()``
    stops the reply and commits what was emitted (see the module's docstring)."""

    def __init__(self, gen, holder: dict):
        self._gen = gen
        self._holder = holder

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    @property
    def text(self) -> str:
        return self._holder["text"]

    @property
    def result(self):
        return self._holder["result"]

    @property
    def committed(self) -> bool:
        return self._holder["committed"]

    @property
    def interrupted(self) -> bool:
        return self._holder["interrupted"]


class ChatSession:
    """A conversation with ``model`` (see the module's docstring).

    ``params``: sampling for the replies; the stop string ``"\\n\\n"`` is always added to its
    stops. ``system``: a system prompt. ``cache``: a PrefixCache to share (None: a private one
    that holds a few states). A session is not thread-safe: use one per conversation.

    ``regenerate()`` with a fixed ``params.seed`` draws with ``seed + k`` on its k-th call for
    the same turn, so each regeneration gives another reply (and the same sequence of replies
    on every run).
    """

    def __init__(
        self,
        model,
        tokenizer,
        params: SamplingParams | None = None,
        system=None,
        cache: PrefixCache | None = None,
    ):
        if params is None:
            params = SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ChatError(f"params must be a SamplingParams, got {type(params).__name__}")
        if cache is not None and not isinstance(cache, PrefixCache):
            raise ChatError(f"cache must be a PrefixCache, got {type(cache).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.params = dataclasses.replace(params, stop=tuple(dict.fromkeys(params.stop + (STOP,))))
        if cache is None:
            per_state = state_nbytes(model.new_state()) + 4 * model.config.vocab_size
            cache = PrefixCache(max_bytes=4 * (per_state + 8 * 4096), every=0)
        self.cache = cache
        self._root = cache_root(model)
        self._open: ChatReply | None = None  # the ChatReply being streamed, if any
        self._set_system(system)
        self.reset()

    # -- the conversation ------------------------------------------------------------------
    def _set_system(self, system) -> None:
        if system is not None:
            system = normalize_message(system)
            if not system:
                system = None
        self.system = system
        self._system_tokens = (
            self.tokenizer.encode(render_system(system)) if system is not None else []
        )

    @property
    def messages(self) -> list:
        """The transcript: ``[{"role": "user" | "assistant", "content": str}, ...]`` (a copy)."""
        return [dict(m) for m in self._messages]

    @property
    def tokens(self) -> list:
        """The token ids of the conversation so far (what the state has read)."""
        return list(self._tokens)

    @property
    def state(self):
        """The state after :attr:`tokens` (computed now if the conversation has not started)."""
        return self._current_state()

    def _settle(self) -> None:
        """End a reply still open: a started one is committed as far as it got, one never
        iterated is dropped (its turn never happened)."""
        open_reply, self._open = self._open, None
        if open_reply is not None:
            open_reply.close()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self._settle()
        self._messages: list = []
        self._tokens: list = list(self._system_tokens)
        self._state = None if self._tokens else self._fresh_state()
        # (turn start, reply start, state at reply start, regenerations)
        self._last: tuple | None = None

    def _fresh_state(self):
        return dataclasses.replace(self.model.new_state(), model_fingerprint=self.model.fingerprint)

    def _current_state(self):
        if self._state is None:
            n, st, _ = self.cache.lookup(self._tokens, root=self._root)
            rest = self._tokens[n:]
            if rest:
                _, st = self.model.forward(rest, st)
                self.cache.insert(self._tokens, st, root=self._root)
            self._state = st
        return self._state

    # -- turns ----------------------------------------------------------------------------
    def say(self, text) -> ChatReply:
        """Send a user message; returns an iterator of the reply's text pieces. The turn is
        committed when the iterator ends or is closed (see the module's docstring)."""
        msg = normalize_message(text)
        if not msg:
            raise ChatError("the message is empty")
        self._settle()
        turn_start = len(self._tokens)
        prompt = self._tokens + self.tokenizer.encode(render_user(msg))
        return self._reply(prompt, turn_start, msg, self._state, self.params, regens=0)

    def regenerate(self) -> ChatReply:
        """Drop the last reply and sample a new one from the state before it."""
        self._settle()
        if self._last is None or not self._messages or self._messages[-1]["role"] != "assistant":
            raise ChatError("there is no reply to regenerate")
        turn_start, reply_start, reply_state, regens = self._last
        user_msg = self._messages[-2]["content"]
        params = self.params
        if params.seed is not None:
            params = dataclasses.replace(params, seed=params.seed + regens + 1)
        prompt = self._tokens[:reply_start]
        if reply_state is not None:  # start right there, whatever the shared cache dropped
            self.cache.insert(prompt, reply_state, root=self._root)
        return self._reply(
            prompt, turn_start, user_msg, None, params, regens=regens + 1, replaces=True
        )

    def _reply(
        self, prompt, turn_start, user_msg, history_state, params, regens, replaces=False
    ) -> ChatReply:
        if history_state is not None and turn_start:
            # make sure the conversation's state is found, whatever the shared cache dropped
            self.cache.insert(prompt[:turn_start], history_state, root=self._root)
        holder = {"text": "", "result": None, "committed": False, "interrupted": False}
        s = stream(
            self.model,
            self.tokenizer,
            prompt,
            params,
            cache=self.cache,
            checkpoints=(turn_start,) if turn_start else (),
        )
        self._open = ChatReply(
            self._pieces(s, prompt, turn_start, user_msg, regens, replaces, holder), holder
        )
        return self._open

    def _pieces(self, s, prompt, turn_start, user_msg, regens, replaces, holder):
        lead = True  # still dropping the reply's leading whitespace
        try:
            for piece in s:
                if lead:
                    piece = piece.lstrip()
                    if not piece:
                        continue
                    lead = False
                holder["text"] += piece
                yield piece
        except BaseException:  # GeneratorExit (closed early), KeyboardInterrupt, errors
            holder["interrupted"] = True
            s.close()
            self._commit(s, prompt, turn_start, user_msg, regens, replaces, holder)
            raise
        holder["result"] = s.result
        self._commit(s, prompt, turn_start, user_msg, regens, replaces, holder)

    def _commit(self, s, prompt, turn_start, user_msg, regens, replaces, holder) -> None:
        pre = s.prompt_state
        if pre is None:  # interrupted before the prompt was processed: the turn never happened
            return
        raw = s.text  # the reply as the model wrote it (leading space included)
        tokens, state = self._close_reply(pre, list(s.tokens), s.state, raw)
        holder["text"] = raw.lstrip()
        if replaces:
            self._messages = self._messages[:-2]
        self._messages += [
            {"role": "user", "content": user_msg},
            {"role": "assistant", "content": holder["text"]},
        ]
        self._tokens = prompt + tokens
        self._state = state
        self._last = (turn_start, len(prompt), pre, regens)
        self.cache.insert(self._tokens, state, root=self._root)
        holder["committed"] = True
        self._open = None

    def _close_reply(self, pre_state, gen: list, gen_state, raw: str):
        """(tokens, state) of the reply closed as ``raw + "\\n\\n"`` read from ``pre_state``,
        keeping as many of the generated tokens (and their state) as fit that text."""
        target = (raw + STOP).encode("utf-8")
        tok = self.tokenizer
        # the longest run of generated tokens whose bytes start the target at a character
        # boundary
        k, end = 0, 0
        pos = 0
        for i, t in enumerate(gen):
            b = tok.decode_bytes([t])
            if target[pos : pos + len(b)] != b:
                break
            pos += len(b)
            if pos == len(target) or (target[pos] & 0xC0) != 0x80:
                k, end = i + 1, pos
        rest = target[end:].decode("utf-8")
        add = tok.encode(rest) if rest else []
        if k == len(gen):
            state = gen_state if not add else self.model.forward(add, gen_state)[1]
        else:
            state = self.model.forward(gen[:k] + add, pre_state)[1]
        return gen[:k] + add, state

    # -- files ----------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the conversation to ``path``, one file written atomically: the state (a state
        file, see State.save, usable as ``generate --state``) with the transcript, token ids
        and settings in its header (covered by its checksum). A kill at any moment leaves the
        previous save or the new one, whole. A transcript of the older two-file layout beside
        it (``path + ".chat.json"``) is removed once the new file is in place."""
        path = os.fspath(path)
        self._settle()
        state = self._current_state()
        last = None
        if self._last is not None:
            last = {
                "turn_start": self._last[0],
                "reply_start": self._last[1],
                "regenerations": self._last[3],
            }
        doc = {
            "format": CHAT_FORMAT,
            "version": CHAT_FORMAT_VERSION,
            "model_fingerprint": self.model.fingerprint,
            "tokenizer": self.tokenizer.name,
            "system": self.system,
            "messages": self._messages,
            "tokens": self._tokens,
            "last_turn": last,
        }
        state.save(path, extra={"chat": doc})
        side = path + SIDECAR_SUFFIX
        if os.path.isfile(side) and not os.path.islink(side):  # stale: the new file holds all
            with contextlib.suppress(OSError):
                os.unlink(side)

    def load(self, path) -> None:
        """Replace the conversation with one saved by :meth:`save` (or by the older two-file
        layout: a state file and ``path + ".chat.json"``, whose recorded SHA-256 must match the
        state); the state must belong to this model and the transcript to this tokenizer
        (ChatError / StateError otherwise)."""
        from .state import State

        path = os.fspath(path)
        self._settle()
        if not os.path.lexists(path):
            raise ChatError(f"{path}: cannot read the chat: no such file")
        state, extra = State.load_with_extra(path, self.model)  # checks the model
        if extra and "chat" in extra:
            source = path
            doc = extra["chat"]
            version = CHAT_FORMAT_VERSION
        else:
            source = path + SIDECAR_SUFFIX
            doc = _read_sidecar(path, source)
            version = LEGACY_FORMAT_VERSION
        messages, tokens, system, last = _parse_transcript(doc, source, version)
        if doc.get("model_fingerprint") not in (None, "", self.model.fingerprint):
            raise ChatError(
                f"{path}: the chat was saved with another model (fingerprint "
                f"{doc['model_fingerprint']}, this model is {self.model.fingerprint})"
            )
        if doc.get("tokenizer") != self.tokenizer.name:
            raise ChatError(
                f"{path}: the chat was saved with the {doc.get('tokenizer')} "
                f"tokenizer, this session uses {self.tokenizer.name}"
            )
        if state.n_tokens != len(tokens):
            raise ChatError(
                f"{path}: the state has read {state.n_tokens} tokens, the "
                f"transcript has {len(tokens)}"
            )
        self._set_system(system)
        self._messages = messages
        self._tokens = tokens
        self._state = state
        self._last = None
        if (
            last
            and messages
            and messages[-1]["role"] == "assistant"
            and 0 <= last[0] <= last[1] <= len(tokens)
        ):
            self._last = (last[0], last[1], None, last[2])
        if tokens:
            self.cache.insert(tokens, state, root=self._root)


def _read_sidecar(path: str, side: str) -> dict:
    """The transcript of a chat saved in the older two-file layout (a state file and its
    ``.chat.json``), checked against the state file's SHA-256."""
    from .formats.atomic import require_regular

    require_regular(side, ChatError)
    try:
        with open(side, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ChatError(
            f"{path}: a state file without a chat transcript (not saved by a chat's save, and "
            f"no {side} beside it)"
        ) from None
    except OSError as e:
        raise ChatError(f"{side}: cannot read the chat transcript: {e.strerror}") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise ChatError(f"{side}: not an rwkvpy chat transcript") from None
    if not isinstance(doc, dict):
        raise ChatError(f"{side}: not an rwkvpy chat transcript")
    try:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        raise ChatError(f"{path}: cannot read the chat state: {e.strerror}") from None
    if digest != doc.get("state_sha256"):
        raise ChatError(
            f"{path}: the state file does not match its transcript {side} "
            f"(was one of them replaced?)"
        )
    return doc


def _parse_transcript(doc, source: str, version: int) -> tuple:
    """(messages, tokens, system, last_turn) of a transcript, every field checked (last_turn:
    None or (turn_start, reply_start, regenerations)); ChatError naming ``source``
    otherwise."""
    try:
        if not isinstance(doc, dict) or doc.get("format") != CHAT_FORMAT:
            raise ValueError("not a chat transcript")
        if doc.get("version") != version:
            raise ChatError(
                f"{source}: chat file version {doc.get('version')!r}, expected {version}"
            )
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in doc["messages"]]
        tokens = [int(t) for t in doc["tokens"]]
        system = doc.get("system")
        if system is not None and not isinstance(system, str):
            raise TypeError("system")
        last = doc.get("last_turn")
        if last is not None:  # where the last turn and its reply start, for regenerate
            last = (last["turn_start"], last["reply_start"], last.get("regenerations", 0))
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in last):
                raise TypeError("last_turn")
    except ChatError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ChatError(f"{source}: not an rwkvpy chat transcript") from None
    return messages, tokens, system, last
