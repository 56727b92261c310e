"""Constrained decoding: outputs that follow a JSON schema or a grammar.

A :class:`Constraint` is what the output must be: a JSON value valid under a JSON schema
(:meth:`Constraint.json_schema`), any JSON object (:meth:`Constraint.json_object`), or the
language of a grammar in GBNF (llama.cpp's notation) or Lark (:meth:`Constraint.grammar`). It is
checked when it is made (a bad schema or grammar is a :class:`ConstraintError`) and compiled by
`llguidance <https://github.com/guidance-ai/llguidance>`_ (the optional extra
``rwkvpy[structured]``), which works on the bytes of each token, so the three tokenizers (World,
the 20B one, bytes) all work.

Each generated sequence gets its own :class:`GrammarProcessor` (``constraint.processor(
tokenizer)``), the :class:`~rwkvpy.processors.LogitsProcessor` that, at every step:

1. asks the matcher which tokens may come next (a bit per token id);
2. sets the logits of every other token to ``-inf``, so that the sampler's temperature, top-k,
   top-p and min-p work on the allowed tokens alone;
3. when the text so far is complete (the grammar accepts it), lets the model end it: token id 0
   (the end-of-text token of World and 20B models; NUL, which grammars here never produce, for
   byte models) takes the log of the summed probability of every token the grammar forbids at
   this point, its own included. The output ends where the model would have gone on with
   something the grammar does not allow; choosing id 0 ends the sequence with
   ``finish_reason`` "stop" (id 0 is one of the processor's ``stop_tokens``);
4. moves the matcher on by the chosen token; a grammar that admits no more text (a JSON value's
   closing brace) ends the sequence with "stop" at once.

What the output is not guaranteed to be: complete, when ``max_tokens`` cuts it
(``finish_reason`` "length"), or when a stop string appears inside it (generation stops at a
stop string as always). JSON output has at most one space between its tokens and no line
break (:data:`JSON_WHITESPACE`), so it never holds a blank line (the chat format's stop string).
"""

from __future__ import annotations

import json
import math
import threading
import time
import weakref
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from .errors import SamplingError
from .processors import LogitsProcessor

#: Whitespace allowed between JSON tokens: at most one space (``{"a": 1, "b": [2, 3]}``). Never
#: a line break, so never a blank line (which ends a chat reply), and no room for a model to
#: spend its tokens on whitespace. A schema's own ``"x-guidance": {"whitespace_pattern": ...}``
#: wins.
JSON_WHITESPACE = r" ?"
END_TOKEN = 0  # see the module's docstring, step 3
_INSTALL = "constrained decoding needs llguidance: pip install 'rwkvpy[structured]'"


class ConstraintError(SamplingError):
    """A JSON schema or grammar that cannot constrain generation: not valid JSON, a schema
    llguidance rejects (unknown type or format, a broken $ref or pattern), a grammar with a
    syntax error; or llguidance missing."""


def _llg():
    try:
        import llguidance
    except ImportError:
        raise ConstraintError(_INSTALL) from None
    return llguidance


def _json_schema_arg(schema):
    """A JSON schema given as a dict/bool or as JSON text, as a dict/bool."""
    if isinstance(schema, (bytes, bytearray)):
        schema = schema.decode("utf-8", errors="replace")
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ConstraintError(f"the JSON schema is not valid JSON: {e}") from None
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise ConstraintError(
            f"a JSON schema must be an object (or true), got {type(schema).__name__}"
        )
    return schema


def _with_whitespace(schema: dict) -> dict:
    """The schema with rwkvpy's JSON whitespace (a copy; a user's x-guidance settings win)."""
    out = dict(schema)
    opts = {"whitespace_pattern": JSON_WHITESPACE}
    user = out.get("x-guidance")
    if isinstance(user, dict):
        opts.update(user)
    out["x-guidance"] = opts
    return out


class Constraint:
    """What an output must be (see the module's docstring); make one with
    :meth:`json_schema`, :meth:`json_object` or :meth:`grammar`. ``kind`` is "json_schema",
    "json_object" or "grammar"; ``source`` what was given (the schema dict or grammar text)."""

    def __init__(self, kind: str, source, lark: str):
        self.kind = kind
        self.source = source
        self.lark = lark  # the Lark text handed to llguidance
        self._protos: dict = {}  # (tokenizer id, vocab size) -> (tokenizer, a fresh matcher)
        self._lock = threading.Lock()
        llg = _llg()
        try:
            self._grammar = llg.LLMatcher.grammar_from_lark(lark)
            err = llg.LLMatcher.validate_grammar(self._grammar)
        except (ValueError, TypeError) as e:
            err = str(e)
        if err:
            raise ConstraintError(f"invalid {kind.replace('_', ' ')}: {_one_line(err)}")

    def __repr__(self) -> str:
        return f"<rwkvpy Constraint {self.kind}>"

    @classmethod
    def json_schema(cls, schema, *, leading_space: bool = True) -> Constraint:
        """JSON valid under ``schema`` (a dict, or JSON text). ``leading_space``: the output may
        start with one space (as a chat reply after ``Assistant:`` does)."""
        schema = _json_schema_arg(schema)
        full = _with_whitespace(schema)
        try:
            body = json.dumps(full, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ConstraintError(f"the JSON schema cannot be written as JSON: {e}") from None
        llg = _llg()
        try:  # the schema alone first: its errors, without the grammar around it
            err = llg.LLMatcher.validate_grammar(llg.LLMatcher.grammar_from_json_schema(body))
        except (ValueError, TypeError) as e:
            err = str(e)
        if err:
            raise ConstraintError(f"invalid JSON schema: {_one_line(err)}")
        return cls("json_schema", schema, _json_lark(body, leading_space))

    @classmethod
    def json_object(cls, *, leading_space: bool = True) -> Constraint:
        """Any JSON object."""
        body = json.dumps(_with_whitespace({"type": "object"}))
        return cls("json_object", None, _json_lark(body, leading_space))

    @classmethod
    def grammar(cls, text: str) -> Constraint:
        """A grammar in GBNF (``root ::= ...``) or Lark (``start: ...``), as llguidance reads
        them (its Lark dialect also takes ``%json {schema}`` and regular expressions)."""
        if not isinstance(text, str) or not text.strip():
            raise ConstraintError("a grammar must be a non-empty str")
        _llg()  # installed, or the error that says how
        from llguidance.gbnf_to_lark import any_to_lark

        try:
            lark = any_to_lark(text)
        except Exception as e:  # noqa: BLE001 - the converter raises its own types
            raise ConstraintError(f"invalid grammar: {_one_line(str(e))}") from None
        return cls("grammar", text, lark)

    @classmethod
    def from_lark(cls, lark: str, *, kind: str = "grammar") -> Constraint:
        """A grammar already in llguidance's Lark (no GBNF conversion)."""
        return cls(kind, lark, lark)

    def processor(self, tokenizer) -> GrammarProcessor:
        """A fresh per-sequence :class:`GrammarProcessor` for text of ``tokenizer``."""
        return GrammarProcessor(self, tokenizer)

    def matcher(self, tokenizer, vocab_size: int):
        """A new llguidance matcher at the start of the text. The grammar is compiled once per
        tokenizer and vocabulary size; each matcher is a copy of that first one (a copy takes
        microseconds, a compile a millisecond or more, and the copies share its lexer's
        cache)."""
        llg = _llg()
        key = (id(tokenizer), vocab_size)
        with self._lock:
            entry = self._protos.get(key)
            if entry is None:
                vocab = vocabulary(tokenizer, vocab_size)
                # the tokenizer is kept: its id stays its own while the entry lives
                entry = (tokenizer, llg.LLMatcher(vocab, self._grammar, log_level=0))
                self._protos[key] = entry
            return entry[1].deep_copy()


_made: OrderedDict = OrderedDict()  # (kind, canonical text) -> Constraint, most recent last
_made_lock = threading.Lock()
CACHED_CONSTRAINTS = 64


def constraint_for(kind: str, source) -> Constraint:
    """The Constraint of a ``kind`` ("json_schema", "json_object" or "grammar") and its source,
    made once for the same schema or grammar (the last :data:`CACHED_CONSTRAINTS` are kept):
    requests that share a schema share its compiled grammar."""
    if kind == "json_schema":
        schema = _json_schema_arg(source)
        try:
            key = json.dumps(schema, sort_keys=True, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ConstraintError(f"the JSON schema cannot be written as JSON: {e}") from None
    elif kind == "json_object":
        schema, key = None, ""
    elif kind == "grammar":
        if not isinstance(source, str):
            raise ConstraintError(f"a grammar must be a str, got {type(source).__name__}")
        key = source
    else:
        raise ConstraintError(f"unknown constraint kind {kind!r}")
    with _made_lock:
        c = _made.get((kind, key))
        if c is not None:
            _made.move_to_end((kind, key))
            return c
    if kind == "json_schema":
        c = Constraint.json_schema(schema)
    elif kind == "json_object":
        c = Constraint.json_object()
    else:
        c = Constraint.grammar(source)
    with _made_lock:
        _made[(kind, key)] = c
        while len(_made) > CACHED_CONSTRAINTS:
            _made.popitem(last=False)
    return c


def _json_lark(body: str, leading_space: bool) -> str:
    return f"start: {'/ ?/ ' if leading_space else ''}json_value\njson_value: %json {body}\n"


def _one_line(msg: str) -> str:
    return " ".join(msg.split())


# -- the vocabulary ----------------------------------------------------------------------------------
_vocab_lock = threading.Lock()
_vocabs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Encoder:
    """What llguidance asks of a tokenizer: its token bytes, special ids, end token, encode."""

    def __init__(self, tokenizer, vocab_size: int):
        table = tokenizer.vocabulary_bytes()[:vocab_size]
        table += [b""] * (vocab_size - len(table))
        if getattr(tokenizer, "name", "") == "bytes":
            table[END_TOKEN] = b""  # NUL: the end token of byte models, never grammar text
        self.special_token_ids = [i for i, b in enumerate(table) if not b]
        # tokens with no text get a name llguidance keeps apart from any text
        self.tokens = [b if b else f"<|rwkvpy-{i}|>".encode() for i, b in enumerate(table)]
        self.eos_token_id = END_TOKEN
        self.bos_token_id = None
        self._tokenizer = tokenizer

    def __call__(self, text) -> list:
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8", errors="replace")
        return self._tokenizer.encode(text)


def vocabulary(tokenizer, vocab_size: int):
    """llguidance's view of ``tokenizer`` for a model with ``vocab_size`` logits (built once per
    tokenizer and size: a second or so for the 65536-token World vocabulary)."""
    llg = _llg()
    with _vocab_lock:
        per = _vocabs.setdefault(tokenizer, {})
        v = per.get(vocab_size)
        if v is None:
            enc = _Encoder(tokenizer, vocab_size)
            v = llg.LLTokenizer(llg.TokenizerWrapper(enc), n_vocab=vocab_size)
            per[vocab_size] = v
        return v


# -- per sequence ------------------------------------------------------------------------------------
class GrammarProcessor(LogitsProcessor):
    """One sequence's matcher, applied to each step's logits (see the module's docstring).
    The matcher is made at the first step, when the model's vocabulary size is known."""

    stop_tokens = frozenset((END_TOKEN,))

    def __init__(self, constraint: Constraint, tokenizer):
        self.constraint = constraint
        self.tokenizer = tokenizer
        self._matcher: Any = None  # llguidance's LLMatcher, made at the first step
        self._bits: torch.Tensor | None = None
        self.mask_seconds = 0.0  # time spent computing and applying masks (for benchmarks)
        self.steps = 0

    def _start(self, V: int) -> None:
        self._matcher = self.constraint.matcher(self.tokenizer, V)
        self._check()
        self._bits = torch.zeros((V + 31) // 32, dtype=torch.int32)

    def _check(self) -> None:
        if self._matcher.is_error():
            raise ConstraintError(
                f"the {self.constraint.kind.replace('_', ' ')} failed: "
                f"{_one_line(self._matcher.get_error())}"
            )

    def allowed(self, V: int) -> np.ndarray:
        """The bool mask (V,) of tokens that may come next (id 0: the text may end here)."""
        if self._matcher is None:
            self._start(V)
        b = self._bits
        self._matcher.unsafe_compute_mask_ptr(b.data_ptr(), b.numel() * 4)
        self._check()
        bits = np.unpackbits(b.numpy().view(np.uint8), bitorder="little")[:V]
        return bits.view(np.bool_)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        x = logits.detach().to(device="cpu", dtype=torch.float32).contiguous()
        xn = x.numpy()  # shares x's memory: the changes below are x's
        allowed = self.allowed(xn.size)
        end_ok = bool(allowed[END_TOKEN])
        allowed[END_TOKEN] = False
        end = None
        if end_ok:  # log of the forbidden tokens' summed probability (unnormalized)
            z = np.where(allowed, -np.inf, xn)
            top = z.max()
            end = top + math.log(np.exp(z - top).sum()) if np.isfinite(top) else -math.inf
        np.copyto(xn, -np.inf, where=~allowed)
        if end is not None:
            xn[END_TOKEN] = end
        self.steps += 1
        self.mask_seconds += time.perf_counter() - t0
        return x

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(int(token)):
            self._check()
            raise ConstraintError(
                f"token {token} does not follow the {self.constraint.kind.replace('_', ' ')}"
            )

    def finished(self) -> bool:
        """True when the grammar admits no more text (the sequence ends with "stop")."""
        return self._matcher is not None and self._matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        """The text so far is complete under the constraint."""
        return self._matcher is not None and self._matcher.is_accepting()
