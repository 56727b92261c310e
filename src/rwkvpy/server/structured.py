"""Structured outputs and tool calls in the server: ``response_format``, ``grammar``, ``tools``.

Structured outputs (both completion routes): ``response_format`` ``{"type": "text"}`` (the
default), ``{"type": "json_object"}`` (any JSON object) or ``{"type": "json_schema",
"json_schema": {"name": ..., "schema": {...}, "strict": ...}}`` (JSON valid under ``schema``),
and rwkvpy's extension ``grammar`` (a GBNF or Lark grammar, as text). Each choice follows its
own matcher (rwkvpy.constrain); a bad schema or grammar is a 400 naming the field.

Tool calls (chat completions), RWKV's chat format. The tools are described in one more system
message at the start of the conversation (one line, as every message is)::

    System: You can call these functions. To call one, reply with <tool_call>{"name": NAME,
    "arguments": ARGUMENTS}</tool_call> (several calls: one per line) and nothing else.
    Functions: {"name": "get_weather", "description": "...", "parameters": {...}}; {...}

An assistant message that called tools reads (content, when it has some, comes first)::

    Assistant: <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

and a tool's result (``role: "tool"``; the function's name comes from the assistant's call
with the same ``tool_call_id``, or from the message's ``name``)::

    Tool (get_weather): 18 degrees, light rain

The reply is constrained by a grammar built from the tools:

- ``required``: one or more calls, ``<tool_call>{"name": "f", "arguments": {...}}</tool_call>``
  separated by line breaks (one call when ``parallel_tool_calls`` is false), where ``name`` is
  one of the tools and ``arguments`` valid under that tool's ``parameters`` JSON schema (an
  object schema that does not say otherwise gets ``"additionalProperties": false``: only the
  declared keys, which is still valid under the schema as given);
- a named function (``{"type": "function", "function": {"name": "f"}}``): the same, with that
  function only;
- ``auto`` (the default when tools are given): either the calls above or a plain reply whose
  first character is neither ``<`` nor whitespace (after the usual single leading space); the
  model's first character decides. A plain reply ends as every chat reply does, at a blank line;
- ``none``: no tools in the prompt, no grammar: an ordinary reply.

A reply that starts with ``<tool_call>`` becomes ``tool_calls`` in OpenAI's shape (ids
``call_...``, ``arguments`` as JSON text) with ``finish_reason`` "tool_calls" and ``content``
null; calls cut short by ``max_tokens`` are left out and the reply says "length". Streamed, a
tool-call reply comes as one chunk with the whole calls when it is complete. Tools cannot be
combined with ``response_format`` or ``grammar`` (400).
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from ..chat import normalize_message
from ..constrain import ConstraintError, constraint_for
from ..generation import TextEvent
from .api_error import bad

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
OPEN, CLOSE = "<tool_call>", "</tool_call>"
INTRO = (
    'You can call these functions. To call one, reply with <tool_call>{"name": NAME, '
    '"arguments": ARGUMENTS}</tool_call> (several calls: one per line) and nothing else. '
    "Functions: "
)


class Tools:
    """The checked ``tools``, ``tool_choice`` and ``parallel_tool_calls`` of a request.
    ``choice``: "auto", "none", "required" or the name of the one function to call."""

    def __init__(self, functions: list, choice: str, parallel: bool):
        self.functions = functions  # [{"name", "description", "parameters"}]
        self.choice = choice
        self.parallel = parallel

    @property
    def active(self) -> bool:
        """Whether the reply is constrained (and the tools are in the prompt)."""
        return self.choice != "none"

    def system_text(self) -> str:
        """The system message describing the tools (see the module's docstring)."""
        shown = []
        for f in self.functions:
            d = {"name": f["name"]}
            if f.get("description"):
                d["description"] = normalize_message(f["description"])
            d["parameters"] = f["parameters"]
            shown.append(json.dumps(d, ensure_ascii=False))
        return INTRO + "; ".join(shown)

    def lark(self) -> str:
        """The grammar of the reply (see the module's docstring), in llguidance's Lark."""
        from ..constrain import JSON_WHITESPACE

        names = (
            [self.choice]
            if self.choice not in ("auto", "required")
            else [f["name"] for f in self.functions]
        )
        by_name = {f["name"]: f for f in self.functions}
        lines = []
        alts = []
        for i, name in enumerate(names):
            schema = dict(by_name[name]["parameters"])
            if schema.get("type") == "object":  # no keys the function did not declare
                schema.setdefault("additionalProperties", False)
            opts = {"whitespace_pattern": JSON_WHITESPACE}
            if isinstance(schema.get("x-guidance"), dict):
                opts.update(schema["x-guidance"])
            schema["x-guidance"] = opts
            head = json.dumps(f'{{"name": {json.dumps(name)}, "arguments": ')
            lines.append(f'fn{i}: {head} args{i} "}}"')
            lines.append(f"args{i}: %json {json.dumps(schema, ensure_ascii=False)}")
            alts.append(f"fn{i}")
        call = f"call: {json.dumps(OPEN)} ({' | '.join(alts)}) {json.dumps(CLOSE)}"
        calls = 'calls: call ("\\n" call)*' if self.parallel else "calls: call"
        if self.choice == "auto":
            top = "start: / ?/ (calls | TEXT)\nTEXT: /[^<\\s][\\s\\S]*/"
        else:
            top = "start: / ?/ calls"
        return "\n".join([top, calls, call, *lines]) + "\n"


def parse_tools(body) -> Tools | None:
    """The request's tools (None when it has none); a 400 for anything malformed."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not tools:
        if tools is not None and not isinstance(tools, list):
            raise bad("'tools' must be a list", "tools")
        if choice not in (None, "none", "auto"):
            raise bad("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if body.get("functions"):
        raise bad("give 'tools', not the deprecated 'functions'", "functions", "unsupported")
    if not isinstance(tools, list):
        raise bad("'tools' must be a list", "tools")
    functions = []
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if (
            not isinstance(t, dict)
            or t.get("type") != "function"
            or not isinstance(t.get("function"), dict)
        ):
            raise bad(f'{where} must be {{"type": "function", "function": {{...}}}}', where)
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise bad(
                f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r:.60}",
                f"{where}.function.name",
            )
        if any(g["name"] == name for g in functions):
            raise bad(f"two tools are named {name!r}", f"{where}.function.name")
        desc = f.get("description")
        if desc is not None and not isinstance(desc, str):
            raise bad(
                f"{where}.function.description must be a string", f"{where}.function.description"
            )
        params = f.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise bad(
                f"{where}.function.parameters must be a JSON schema object",
                f"{where}.function.parameters",
            )
        functions.append({"name": name, "description": desc, "parameters": params})
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise bad("'parallel_tool_calls' must be true or false", "parallel_tool_calls")
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise bad(
                '\'tool_choice\' must be "auto", "none", "required" or '
                '{"type": "function", "function": {"name": ...}}',
                "tool_choice",
            )
        if all(f["name"] != name for f in functions):
            raise bad(f"'tool_choice' names {name!r}, which is not among the tools", "tool_choice")
        choice = name
    elif choice not in ("auto", "none", "required"):
        raise bad(
            '\'tool_choice\' must be "auto", "none", "required" or '
            '{"type": "function", "function": {"name": ...}}',
            "tool_choice",
        )
    return Tools(functions, choice, parallel)


# -- messages ----------------------------------------------------------------------------------------
def assistant_calls_text(calls, i: int) -> str:
    """An assistant message's ``tool_calls`` as the reply text that makes them."""
    if not isinstance(calls, list) or not calls:
        raise bad(f"messages[{i}].tool_calls must be a non-empty list", f"messages[{i}]")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        args = fn.get("arguments") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not isinstance(args, (str, dict)):
            raise bad(
                f"messages[{i}].tool_calls[{j}] must hold function.name and function.arguments",
                f"messages[{i}].tool_calls",
            )
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                raise bad(
                    f"messages[{i}].tool_calls[{j}].function.arguments is not JSON",
                    f"messages[{i}].tool_calls",
                ) from None
        call = json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
        out.append(f"{OPEN}{call}{CLOSE}")
    return "\n".join(out)


def call_names(messages) -> dict:
    """tool_call_id -> function name, from the assistant messages' tool_calls."""
    names = {}
    for m in messages:
        if isinstance(m, dict) and m.get("role") == "assistant":
            for c in m.get("tool_calls") or ():
                if isinstance(c, dict) and isinstance(c.get("function"), dict):
                    names[c.get("id")] = c["function"].get("name")
    return names


def tool_label(m, names: dict) -> str:
    """``Tool`` or ``Tool (name)`` for a tool message (see the module's docstring)."""
    name = m.get("name") or names.get(m.get("tool_call_id"))
    return f"Tool ({name})" if isinstance(name, str) and name else "Tool"


# -- the reply ---------------------------------------------------------------------------------------
def is_call_text(text: str) -> bool:
    """Whether a reply (so far) is a tool call rather than text: its first character is '<'."""
    return text.lstrip().startswith("<")


def parse_calls(text: str) -> list:
    """The complete calls of a reply, in OpenAI's shape (an incomplete last one left out).
    Each call's JSON is read as JSON, so a "</tool_call>" inside a string value is no end."""
    out = []
    decoder = json.JSONDecoder()
    at = text.find(OPEN)
    while at >= 0:
        try:
            d, end = decoder.raw_decode(text, at + len(OPEN))
        except json.JSONDecodeError:
            break
        if not text.startswith(CLOSE, end):
            break
        if isinstance(d, dict) and isinstance(d.get("name"), str):
            out.append(
                {
                    "id": "call_" + secrets.token_hex(12),
                    "type": "function",
                    "function": {
                        "name": d["name"],
                        "arguments": json.dumps(d.get("arguments", {}), ensure_ascii=False),
                    },
                }
            )
        at = text.find(OPEN, end + len(CLOSE))
    return out


# -- response_format and grammar ---------------------------------------------------------------------
def constraint_kw(body) -> dict:
    """The SamplingParams fields (json_schema / json_object / grammar) of ``response_format``
    and ``grammar``, each checked (a 400 naming the field)."""
    fmt = body.get("response_format")
    grammar = body.get("grammar")
    kw: dict[str, Any] = {}
    if fmt is not None:
        if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
            raise bad("'response_format' must be an object with a 'type'", "response_format")
        kind = fmt["type"]
        if kind == "json_object":
            kw["json_object"] = True
        elif kind == "json_schema":
            js = fmt.get("json_schema")
            if not isinstance(js, dict):
                raise bad(
                    "response_format.json_schema must be an object holding 'schema'",
                    "response_format.json_schema",
                )
            schema = js.get("schema", {"type": "object"} if "name" in js else js)
            try:
                constraint_for("json_schema", schema)
            except ConstraintError as e:
                raise bad(str(e), "response_format.json_schema", "invalid_json_schema") from None
            kw["json_schema"] = schema
        elif kind != "text":
            raise bad(
                f'response_format type must be "text", "json_object" or '
                f'"json_schema", got {kind!r:.40}',
                "response_format",
                "unsupported",
            )
    if grammar is not None:
        if kw:
            raise bad("give 'grammar' or a JSON response_format, not both", "grammar")
        if not isinstance(grammar, str) or not grammar.strip():
            raise bad("'grammar' must be a non-empty string (GBNF or Lark)", "grammar")
        try:
            constraint_for("grammar", grammar)
        except ConstraintError as e:
            raise bad(str(e), "grammar", "invalid_grammar") from None
        kw["grammar"] = grammar
    return kw


def tools_kw(tools: Tools | None, kw: dict) -> dict:
    """``kw`` with the tools' grammar when they constrain the reply (400 beside another
    constraint)."""
    if tools is None or not tools.active:
        return kw
    if kw:
        raise bad(
            "'tools' cannot be combined with 'response_format' or 'grammar'", "tools", "unsupported"
        )
    lark = tools.lark()
    try:
        constraint_for("grammar", lark)
    except ConstraintError as e:
        raise bad(f"the tools' parameters: {e}", "tools", "invalid_json_schema") from None
    return {"grammar": lark}


def tool_finish_reason(calls, finish_reason: str) -> str:
    """ "tool_calls" for a reply that made calls and ended normally."""
    return "tool_calls" if calls and finish_reason == "stop" else finish_reason


class ReplySplitter:
    """Tells a streamed chat reply's text from its tool calls: its pieces are held until its
    first character other than whitespace decides; a plain reply's then flow on unchanged,
    a tool call's are kept for :meth:`calls` at the end."""

    def __init__(self):
        self.mode = None  # None (undecided), "text" or "calls"
        self._held = []

    @property
    def is_calls(self) -> bool:
        return self.mode == "calls"

    def feed(self, ev: TextEvent) -> TextEvent | None:
        """The event to stream now (None: held)."""
        if self.mode == "text":
            return ev
        self._held.append(ev)
        text = "".join(e.text for e in self._held)
        if self.mode is None and text.strip():
            self.mode = "calls" if is_call_text(text) else "text"
            if self.mode == "text":
                lps = tuple(x for e in self._held for x in e.logprobs)
                self._held = []
                return TextEvent(text, lps)
        return None

    def calls(self) -> list:
        return parse_calls("".join(e.text for e in self._held))


def shape_tool_reply(choice: dict, text: str, finish_reason: str) -> dict:
    """A chat choice whose reply made tool calls, in OpenAI's shape (see the module's
    docstring); other choices unchanged."""
    if not is_call_text(text):
        return choice
    calls = parse_calls(text)
    if not calls:
        return choice
    msg = dict(choice["message"], content=None, tool_calls=calls)
    return dict(choice, message=msg, finish_reason=tool_finish_reason(calls, finish_reason))
