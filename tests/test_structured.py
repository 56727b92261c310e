"""Structured outputs and tool calls: rwkvpy.constrain in the API, the CLI and the real server.

Models: the demo (byte vocabulary) and a random v7 with the 65536-token World vocabulary. JSON
outputs are checked with ``json`` and ``jsonschema``; the server runs for real in a subprocess
(tests/servers.Server) and is driven by the official ``openai`` client."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from servers import Server, openai_client

import rwkvpy
from rwkvpy.config import Version
from rwkvpy.constrain import Constraint, ConstraintError, vocabulary
from rwkvpy.errors import RwkvpyError
from rwkvpy.generate import generate, stream
from rwkvpy.sampling import SamplingError, SamplingParams
from rwkvpy.server.protocol import check_messages, render_messages
from rwkvpy.synth import save_random_model
from rwkvpy.tokenizers import ByteTokenizer, NeoXTokenizer, WorldTokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# nested objects, enums (one needing escapes), arrays, integers, bounded numbers, booleans, and
# a string that can only be written with escapes
PERSON = {
    "type": "object",
    "properties": {
        "n": {"type": "string", "maxLength": 6},
        "k": {"enum": ["cat", 'say "hi"']},
        "a": {"type": "integer", "minimum": 0, "maximum": 99},
        "w": {"type": "number", "minimum": -10, "maximum": 10},
        "t": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
        "q": {"type": "string", "pattern": '^["\\\\\\n\\t/]{1,2}$'},
        "o": {
            "type": "object",
            "properties": {"f": {"type": "string", "maxLength": 4}, "ok": {"type": "boolean"}},
            "required": ["f", "ok"],
            "additionalProperties": False,
        },
    },
    "required": ["n", "k", "a", "w", "t", "q", "o"],
    "additionalProperties": False,
}
# a top-level array of objects, with a nullable number
ROWS = {
    "type": "array",
    "minItems": 1,
    "maxItems": 3,
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 999},
            "tag": {"enum": ["a", "b", "c"]},
            "s": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        },
        "required": ["id", "tag", "s"],
        "additionalProperties": False,
    },
}
SCHEMAS = {"person": PERSON, "rows": ROWS}
SEEDS = 50
ALONE = 4  # seeds per schema also generated alone in this process, compared with the server's
PROMPT = "Here is the record as JSON:"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": 0, "maximum": 99},
                "b": {"type": "integer", "minimum": 0, "maximum": 99},
            },
            "required": ["a", "b"],
        },
    },
}
TOOLS = [WEATHER, ADD]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def valid(text: str, schema: dict):
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


# -- models and servers --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world_path(tmp_path_factory):
    return save_random_model(
        tmp_path_factory.mktemp("world") / "world-v7.pth",
        version=Version.V7,
        n_embd=64,
        n_layer=1,
        vocab=65536,
        seed=3,
    )


@pytest.fixture(scope="module")
def models(world_path):
    return {"demo": rwkvpy.load("demo", threads=1), "world": rwkvpy.load(world_path, threads=1)}


@pytest.fixture(scope="module")
def servers(world_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("servers")
    with ThreadPoolExecutor(2) as pool:  # both start side by side
        make = [
            pool.submit(Server, ["--no-access-log"], d / f"{name}.log", model=m)
            for name, m in (("demo", "demo"), ("world", world_path))
        ]
        out = {"demo": make[0].result(), "world": make[1].result()}
    for s in out.values():
        with openai_client(s, timeout=120) as c:
            s.name = c.models.list().data[0].id
    yield out
    with ThreadPoolExecutor(2) as pool:  # both stop side by side
        assert list(pool.map(Server.stop, out.values())) == [0, 0]
    for s in out.values():
        assert "Traceback" not in s.text(), s.text()


# -- the vocabulary --------------------------------------------------------------------------------
def test_vocabulary_bytes_of_the_three_tokenizers():
    text = 'Grammars see bytes: naïve 日本語 🎉 "quoted"\n\tend'
    for tok, V in ((ByteTokenizer(), 256), (WorldTokenizer(), 65536), (NeoXTokenizer(), 50304)):
        table = tok.vocabulary_bytes()
        assert len(table) == tok.vocab_size
        ids = tok.encode(text)
        assert b"".join(table[i] for i in ids) == text.encode()
        if not isinstance(tok, ByteTokenizer):
            assert table[0] == b""  # the end-of-text token stands for no text
        llg = vocabulary(tok, V)
        assert llg.vocab_size == V
        assert vocabulary(tok, V) is llg  # built once


def test_bad_schema_and_grammar_are_typed_errors():
    cases = [
        dict(json_schema={"type": "foo"}),
        dict(json_schema="{not json"),
        dict(json_schema=[1, 2]),
        dict(json_schema={"type": "string", "pattern": "(("}),
        dict(grammar="root ::= ((("),
        dict(grammar="start: undefined_rule"),
        dict(json_schema={"type": "object"}, grammar='root ::= "a"'),
    ]
    for kw in cases:
        with pytest.raises(SamplingError) as e:
            SamplingParams(**kw)
        assert isinstance(e.value, RwkvpyError)
        if len(kw) == 1:
            assert isinstance(e.value, ConstraintError)
    assert "Invalid type: foo" in str(
        pytest.raises(ConstraintError, SamplingParams, json_schema={"type": "foo"}).value
    )


# -- the API ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["demo", "world"])
def test_api_generate_and_stream_follow_the_schema(models, name):
    m = models[name]
    tok = m.tokenizer()
    for seed in range(3):
        p = SamplingParams(json_schema=PERSON, seed=seed, max_tokens=300)
        r = generate(m, tok, PROMPT, p)
        assert r.finish_reason == "stop", r
        valid(r.text, PERSON)
        assert "".join(stream(m, tok, PROMPT, p)) == r.text
    # a grammar, in GBNF and in Lark
    for g in ('root ::= "yes" | "no" | "maybe"', 'start: ("yes" | "no" | "maybe")'):
        r = generate(m, tok, "Answer:", SamplingParams(grammar=g, seed=1))
        assert r.text in ("yes", "no", "maybe") and r.finish_reason == "stop"
    g = 'root ::= [a-z]+ ("," [a-z]+)*'
    for seed in range(3):
        r = generate(m, tok, "Words:", SamplingParams(grammar=g, seed=seed, max_tokens=40))
        assert re.fullmatch(
            r"[a-z]+(,[a-z]+)*", r.text if r.finish_reason == "stop" else r.text.rstrip(",")
        ), r


def test_api_length_stop_strings_and_chat(models):
    m = models["demo"]
    tok = m.tokenizer()
    r = generate(m, tok, PROMPT, SamplingParams(json_schema=PERSON, seed=0, max_tokens=6))
    assert r.finish_reason == "length" and r.completion_tokens == 6
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.text)
    # a stop string ends a structured output as any other (the text before it)
    r = generate(m, tok, PROMPT, SamplingParams(json_schema=PERSON, seed=0, stop=['"a"']))
    assert r.finish_reason == "stop" and r.stop == '"a"' and '"a"' not in r.text
    # chat replies follow the schema too, and never hold the blank line that ends them
    from rwkvpy.chat import ChatSession

    chat = ChatSession(m, tok, SamplingParams(json_schema=ROWS, seed=4, max_tokens=300))
    reply = "".join(chat.say("List the rows."))
    valid(reply, ROWS)


# -- the server: JSON schemas, 50 seeded requests each, batched, streamed and not -----------------
async def _ask_all(server, jobs):
    """Send every (schema, seed, chat) of ``jobs`` at once; odd seeds streamed. Returns the
    (text, finish_reason) of each."""
    async with openai.AsyncOpenAI(
        base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300
    ) as c:

        async def one(schema, seed, chat):
            fmt = {"type": "json_schema", "json_schema": {"name": "record", "schema": schema}}
            streamed = seed % 2 == 1
            if chat:
                kw = dict(messages=[{"role": "user", "content": PROMPT}], response_format=fmt)
                call = c.chat.completions.create
            else:
                kw = dict(prompt=PROMPT, extra_body={"response_format": fmt})
                call = c.completions.create
            r = await call(model=server.name, seed=seed, max_tokens=300, stream=streamed, **kw)
            if not streamed:
                ch = r.choices[0]
                return (ch.message.content if chat else ch.text), ch.finish_reason
            parts, finish = [], None
            async for chunk in r:
                for ch in chunk.choices:
                    piece = ch.delta.content if chat else ch.text
                    parts.append(piece or "")
                    finish = ch.finish_reason or finish
            return "".join(parts), finish

        return await asyncio.gather(*(one(*job) for job in jobs))


@pytest.mark.parametrize("name", ["demo", "world"])
def test_server_json_schemas_batched(models, servers, name):
    """SEEDS requests per schema, in two rounds that each mix both schemas (one per route),
    streamed and not: every request follows its own schema in the shared batch."""
    m, server = models[name], servers[name]
    tok = m.tokenizer()
    chat = {sname: (i + (name == "world")) % 2 == 1 for i, sname in enumerate(SCHEMAS)}
    half = SEEDS // 2
    out = {}
    for seeds in (range(half), range(half, SEEDS)):
        jobs = [(sname, seed) for seed in seeds for sname in SCHEMAS]
        got = asyncio.run(_ask_all(server, [(SCHEMAS[sn], seed, chat[sn]) for sn, seed in jobs]))
        out.update(zip(jobs, got))
    assert len(out) == SEEDS * len(SCHEMAS)
    for (sname, seed), (text, finish) in out.items():
        assert finish == "stop", (sname, seed, text)
        valid(text, SCHEMAS[sname])
    for sname, schema in SCHEMAS.items():
        if chat[sname]:
            continue
        for seed in range(ALONE):  # alone, in this process: the same text as in the batch
            r = generate(
                m, tok, PROMPT, SamplingParams(json_schema=schema, seed=seed, max_tokens=300)
            )
            assert r.text == out[sname, seed][0], (sname, seed)


def test_server_json_object_grammar_length_and_errors(servers):
    server = servers["demo"]
    with openai_client(server, timeout=120) as c:
        r = c.completions.create(
            model=server.name,
            prompt="JSON:",
            max_tokens=200,
            seed=5,
            extra_body={"response_format": {"type": "json_object"}},
        )
        assert isinstance(json.loads(r.choices[0].text), dict)
        assert r.choices[0].finish_reason == "stop"
        r = c.chat.completions.create(
            model=server.name,
            messages=[{"role": "user", "content": "Hi"}],
            response_format={"type": "json_object"},
            seed=5,
        )
        assert isinstance(json.loads(r.choices[0].message.content), dict)
        g = 'root ::= "yes" | "no"'
        r = c.completions.create(
            model=server.name, prompt="Answer:", n=4, seed=1, extra_body={"grammar": g}
        )
        assert {ch.text for ch in r.choices} <= {"yes", "no"}
        r = c.completions.create(
            model=server.name,
            prompt=PROMPT,
            max_tokens=5,
            seed=1,
            extra_body={
                "response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}}
            },
        )
        assert r.choices[0].finish_reason == "length"
        bad = [
            (
                {
                    "response_format": {
                        "type": "json_schema",
                        "json_schema": {"name": "x", "schema": {"type": "foo"}},
                    }
                },
                "response_format.json_schema",
            ),
            ({"grammar": "root ::= ((("}, "grammar"),
            ({"response_format": {"type": "xml"}}, "response_format"),
            ({"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}, "grammar"),
        ]
        for extra, param in bad:
            with pytest.raises(openai.BadRequestError) as e:
                c.completions.create(model=server.name, prompt="x", extra_body=extra)
            assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body


# -- tool calls ------------------------------------------------------------------------------------
def _calls_valid(msg, allowed):
    assert msg.content is None and msg.tool_calls
    for call in msg.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


def test_tool_calls_through_the_openai_client(servers):
    server = servers["demo"]
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    with openai_client(server, timeout=120) as c:
        for seed in range(3):
            r = c.chat.completions.create(
                model=server.name,
                messages=ask,
                tools=TOOLS,
                seed=seed,
                tool_choice="required",
                max_tokens=200,
            )
            assert r.choices[0].finish_reason == "tool_calls"
            _calls_valid(r.choices[0].message, {"get_weather", "add"})
        named = {"type": "function", "function": {"name": "add"}}
        r = c.chat.completions.create(
            model=server.name,
            messages=ask,
            tools=TOOLS,
            tool_choice=named,
            seed=7,
            max_tokens=200,
            parallel_tool_calls=False,
        )
        assert r.choices[0].finish_reason == "tool_calls"
        _calls_valid(r.choices[0].message, {"add"})
        assert len(r.choices[0].message.tool_calls) == 1
        call = r.choices[0].message.tool_calls[0]
        # auto: a plain reply or calls, each well formed
        for seed in range(6):
            a = c.chat.completions.create(
                model=server.name,
                messages=ask,
                tools=TOOLS,
                seed=seed,
                tool_choice="auto",
                max_tokens=200,
            )
            msg = a.choices[0].message
            if msg.tool_calls:
                _calls_valid(msg, {"get_weather", "add"})
            else:
                assert msg.content and not msg.content.startswith("<")
        r = c.chat.completions.create(
            model=server.name, messages=ask, tools=TOOLS, tool_choice="none", seed=1, max_tokens=30
        )
        assert r.choices[0].message.tool_calls is None
        # streamed: the calls come whole, the client accumulates them
        s = c.chat.completions.create(
            model=server.name,
            messages=ask,
            tools=TOOLS,
            seed=0,
            tool_choice="required",
            max_tokens=200,
            stream=True,
        )
        got, finish = {}, None
        for chunk in s:
            for ch in chunk.choices:
                for tc in ch.delta.tool_calls or ():
                    got[tc.index] = (tc.function.name, tc.function.arguments)
                finish = ch.finish_reason or finish
        first = c.chat.completions.create(
            model=server.name,
            messages=ask,
            tools=TOOLS,
            seed=0,
            tool_choice="required",
            max_tokens=200,
        )
        assert finish == "tool_calls"
        assert [got[i] for i in sorted(got)] == [
            (t.function.name, t.function.arguments) for t in first.choices[0].message.tool_calls
        ]
        # the round trip: the call and its result go back into the conversation
        history = ask + [
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {
                            "name": call.function.name,
                            "arguments": call.function.arguments,
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.id, "content": "42"},
        ]
        r2 = c.chat.completions.create(
            model=server.name, messages=history, tools=TOOLS, seed=2, max_tokens=60
        )
        assert r2.choices[0].finish_reason in ("stop", "tool_calls", "length")
        from rwkvpy.server.structured import parse_tools

        made = json.dumps({"name": "add", "arguments": json.loads(call.function.arguments)})
        prompt = (
            f"System: {parse_tools({'tools': TOOLS}).system_text()}\n\n"
            f"User: {ask[0]['content']}\n\n"
            f"Assistant: <tool_call>{made}</tool_call>\n\n"
            f"Tool (add): 42\n\nAssistant:"
        )
        assert r2.usage.prompt_tokens == len(prompt.encode())  # the byte model: a token a byte
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(
                model=server.name,
                messages=ask,
                tools=TOOLS,
                tool_choice={"type": "function", "function": {"name": "nope"}},
            )
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(
                model=server.name,
                messages=ask,
                tools=TOOLS,
                response_format={"type": "json_object"},
            )


def test_tool_prompt_format():
    body = {
        "messages": [
            {"role": "user", "content": "Add 2 and 3"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "5"},
        ]
    }
    msgs = check_messages(body)
    p = render_messages(msgs, ByteTokenizer())
    assert p.text == (
        "User: Add 2 and 3\n\n"
        'Assistant: <tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}'
        "</tool_call>\n\n"
        "Tool (add): 5\n\nAssistant:"
    )
    from rwkvpy.server.structured import parse_tools

    tools = parse_tools({"tools": TOOLS})
    line = tools.system_text()
    assert "\n" not in line and line.startswith("You can call these functions.")
    assert '"name": "get_weather"' in line and '"name": "add"' in line
    Constraint.from_lark(tools.lark())  # a grammar llguidance takes
    from rwkvpy.server.structured import parse_calls

    reply = (
        ' <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "</tool_call>", '
        '"unit": "c"}}</tool_call>\n<tool_call>{"name": "add", "argu'
    )  # cut short
    calls = parse_calls(reply)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("add", {"a": 1, "b": 2}),
        ("get_weather", {"city": "</tool_call>", "unit": "c"}),
    ]
    assert len({c["id"] for c in calls}) == 2


# -- the command line --------------------------------------------------------------------------------
def test_cli_json_schema(tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(ROWS))
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "foo"}')
    cli = [sys.executable, "-m", "rwkvpy", "generate", "-m", "demo", "--threads", "1"]
    runs = [
        [
            *cli,
            "--json-schema",
            str(schema),
            "--seed",
            "3",
            "--json",
            "--max-tokens",
            "300",
            PROMPT,
        ],
        [*cli, "--json-schema", str(bad), "x"],
    ]
    procs = [
        subprocess.Popen(r, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in runs
    ]  # side by side: two interpreters' start-up in the time of one
    (out, err), (out3, err3) = (p.communicate(timeout=300) for p in procs)
    assert [p.returncode for p in procs] == [0, 1], (err, err3)
    first = json.loads(out)
    valid(first["text"], ROWS)
    assert first["finish_reason"] == "stop"
    assert out3 == ""
    assert err3.strip() == f"rwkvpy: error: {bad}: invalid JSON schema: Invalid type: foo"
