"""The OpenAI-compatible server (rwkvpy.server), run for real: a subprocess on a free loopback
port serving the tiny trained v7 byte model, driven by the official ``openai`` client and by
raw HTTP. Reference outputs come from ``rwkvpy.generate.generate`` in this process."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx  # the test extra: httpx, openai; the server extra: fastapi, uvicorn
import openai
import pytest
import torch
from conftest import TINY_V7, fixture_path
from servers import Server, serving

import rwkvpy
from rwkvpy.generate import generate
from rwkvpy.prefix_cache import PrefixCache
from rwkvpy.sampling import SamplingParams
from rwkvpy.state import State
from rwkvpy.tokenizers import ByteTokenizer

KEY = "test-key-123"
NAME = "tiny-rwkv-7v0-834K-FP32"
EVERY = 32  # the server's --cache-every
HISTORY = [
    {"role": "system", "content": "You are a storyteller."},
    {"role": "user", "content": "Tell me about the sea."},
    {"role": "assistant", "content": "The sea is wide."},
]


@pytest.fixture(scope="module")
def model():
    before = torch.get_num_threads()
    m = rwkvpy.load(fixture_path(*TINY_V7), threads=1)
    yield m
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


@pytest.fixture(scope="module")
def state_file(model, tok, tmp_path_factory):
    """An rwkvpy state file: the state after a short text, to serve with --state."""
    _, st = model.forward(tok.encode("The old lighthouse keeper said:"))
    path = tmp_path_factory.mktemp("states") / "keeper.state"
    st.save(path)
    return path


@pytest.fixture(scope="module")
def api_key():
    return KEY


@pytest.fixture(scope="module")
def server(tmp_path_factory, state_file):
    args = ["--api-key", KEY, "--max-concurrent", "32", "--max-tokens-limit", "256"]
    args += ["--max-request-bytes", "65536", "--state", f"keeper={state_file}"]
    args += ["--cache-every", str(EVERY), "--no-access-log"]
    with serving(args, tmp_path_factory.mktemp("server") / "server.log") as s:
        yield s


def stats(http) -> dict:
    return http.get("/v1/stats").json()


def wait_idle(http, timeout=5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = stats(http)
        if s["slots_used"] == 0 and s["engine"]["active_sequences"] == 0:
            return s
        if time.monotonic() > deadline:
            pytest.fail(f"the server did not become idle: {s}")
        time.sleep(0.02)


def expect_error(r, status, param=None, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


def chat_prompt(messages) -> str:
    roles = {"system": "System", "user": "User", "assistant": "Assistant"}
    return "".join(f"{roles[m['role']]}: {m['content']}\n\n" for m in messages) + "Assistant:"


def reference(model, tok, prompt, *, chat=False, state=None, **kw) -> tuple:
    """(text, finish_reason, completion tokens) as generate() gives them."""
    stop = kw.pop("stop", None)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if chat:
        stops.append("\n\n")
    kw.setdefault("max_tokens", 16)
    # a fresh cache with the server's checkpoint interval: the prompt is cut where the server
    # cuts it, so a request run alone is bit-exact
    cache = PrefixCache(max_bytes=1 << 26, every=EVERY)
    r = generate(
        model, tok, prompt, SamplingParams(stop=tuple(stops), **kw), state=state, cache=cache
    )
    return (r.text.lstrip() if chat else r.text), r.finish_reason, r.completion_tokens


# -- basics --------------------------------------------------------------------------------------
def test_serve_command_parser():
    from rwkvpy.cli.serve import add_serve_command

    p = argparse.ArgumentParser(prog="rwkvpy")
    add_serve_command(p.add_subparsers(dest="command"))
    a = p.parse_args(["serve", "-m", "model.bin", "--state", "a=b.pth", "--state", "c=d.state"])
    assert a.host == "127.0.0.1" and a.port == 8000 and a.api_key is None
    assert a.state == ["a=b.pth", "c=d.state"] and callable(a.func)


def test_health_models_and_auth(server, client, http):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # no key needed
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (
            ("GET", "/v1/models"),
            ("POST", "/v1/completions"),
            ("GET", "/v1/stats"),
            ("GET", "/nowhere"),
        ):
            r = httpx.request(method, server.url + path, headers=headers, json={"prompt": "a"})
            expect_error(r, 401, code="invalid_api_key")
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    bad_key = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    expect_error(http.get("/nowhere"), 404)


def test_completions_match_generate(client, model, tok):
    prompt = "Once upon a time"
    r = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=20, seed=7, n=2, temperature=0.9, top_p=0.95
    )
    assert [c.index for c in r.choices] == [0, 1]
    for i, c in enumerate(r.choices):
        text, finish, n = reference(
            model, tok, prompt, max_tokens=20, seed=7 + i, temperature=0.9, top_p=0.95
        )
        assert (c.text, c.finish_reason) == (text, finish)
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == 40 and r.usage.total_tokens == 40 + len(prompt)
    # greedy with a stop string; token-id prompts
    r = client.completions.create(
        model=NAME, prompt=list(b"The cat"), max_tokens=30, temperature=0, stop=["the t"]
    )
    text, finish, n = reference(model, tok, "The cat", max_tokens=30, temperature=0, stop=["the t"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (text, finish)
    assert r.usage.completion_tokens == n


def test_streaming_completions_and_chat(client, model, tok):
    kw = {
        "max_tokens": 24,
        "seed": 3,
        "temperature": 1.0,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.3,
        "logit_bias": {"32": 2.5},
    }
    prompt = "It was a dark"
    pieces = list(client.completions.create(model=NAME, prompt=prompt, stream=True, **kw))
    text = "".join(p.choices[0].text for p in pieces if p.choices)
    ref = reference(model, tok, prompt, **{**kw, "logit_bias": {32: 2.5}})
    assert (text, pieces[-1].choices[0].finish_reason) == ref[:2]

    msgs = [{"role": "user", "content": "Hello there!"}]
    stream = client.chat.completions.create(
        model=NAME, messages=msgs, stream=True, stream_options={"include_usage": True}, **kw
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    ref = reference(model, tok, chat_prompt(msgs), chat=True, **{**kw, "logit_bias": {32: 2.5}})
    assert (content, finish) == ref[:2]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == ref[2]
    assert usage.prompt_tokens == len(chat_prompt(msgs))
    whole = client.chat.completions.create(model=NAME, messages=msgs, **kw)
    assert whole.choices[0].message.content == content
    assert whole.choices[0].message.role == "assistant"


def test_chat_stops_at_blank_line(client):
    # byte 10 is "\n": biased up, the reply is the blank line at once, and stops there
    r = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Hi"}],
        logit_bias={"10": 100},
        max_tokens=50,
    )
    c = r.choices[0]
    assert (c.message.content, c.finish_reason, r.usage.completion_tokens) == ("", "stop", 2)


# -- continuous batching -------------------------------------------------------------------------
def test_32_concurrent_streams_equal_requests_alone(server, http, model, tok):
    reqs = []
    for i in range(32):
        kw = {
            "max_tokens": 12 + i % 8,
            "seed": 1000 + i,
            "temperature": (0.0, 0.8, 1.0, 1.2)[i % 4],
            "top_p": (1.0, 0.9, 0.6)[i % 3],
            "presence_penalty": 0.4 if i % 5 == 0 else 0.0,
        }
        if i % 6 == 1:
            kw["stop"] = ["e", "the"]
        if i % 2:
            reqs.append(("chat", [{"role": "user", "content": f"Story number {i}, please."}], kw))
        else:
            reqs.append(("completion", f"{i}. In a small village", kw))
    before = stats(http)["engine"]

    async def run_one(ac, kind, prompt, kw):
        if kind == "chat":
            s = await ac.chat.completions.create(model=NAME, messages=prompt, stream=True, **kw)
            parts, finish = [], None
            async for ch in s:
                parts.append(ch.choices[0].delta.content or "")
                finish = ch.choices[0].finish_reason or finish
        else:
            s = await ac.completions.create(model=NAME, prompt=prompt, stream=True, **kw)
            parts, finish = [], None
            async for ch in s:
                parts.append(ch.choices[0].text)
                finish = ch.choices[0].finish_reason or finish
        return "".join(parts), finish

    async def run_all():
        async with openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60
        ) as ac:
            return await asyncio.gather(*(run_one(ac, *r) for r in reqs))

    got = asyncio.run(run_all())
    after = wait_idle(http)["engine"]
    assert after["max_batch_seen"] >= 8  # they really ran together
    assert after["decode_steps"] - before["decode_steps"] < sum(r[2]["max_tokens"] for r in reqs)
    for (kind, prompt, kw), (text, finish) in zip(reqs, got):
        if kind == "chat":
            ref = reference(model, tok, chat_prompt(prompt), chat=True, **kw)
        else:
            ref = reference(model, tok, prompt, **kw)
        assert (text, finish) == ref[:2], (kind, prompt, kw)


# -- prefix cache --------------------------------------------------------------------------------
def test_next_chat_turn_only_processes_new_messages(client, http):
    msgs = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is the capital of the moon?"},
    ]
    r1 = client.chat.completions.create(model=NAME, messages=msgs, temperature=0, max_tokens=12)
    reply = r1.choices[0].message.content
    assert r1.usage.prompt_tokens == len(chat_prompt(msgs))
    before = stats(http)["engine"]["prefill_tokens"]
    turn2 = msgs + [
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "And of the sun?"},
    ]
    r2 = client.chat.completions.create(model=NAME, messages=turn2, temperature=0, max_tokens=4)
    processed = stats(http)["engine"]["prefill_tokens"] - before
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert r2.usage.prompt_tokens == len(chat_prompt(turn2))
    # turn 1 (prompt and generated reply) came from the cache; only the new text went in
    assert cached == r1.usage.prompt_tokens + r1.usage.completion_tokens
    assert processed == r2.usage.prompt_tokens - cached
    assert processed == len("\n\nUser: And of the sun?\n\nAssistant:")
    # the very same prompt again: nothing at all goes through the model before decoding
    before = stats(http)["engine"]["prefill_tokens"]
    r3 = client.chat.completions.create(model=NAME, messages=turn2, temperature=0, max_tokens=4)
    assert stats(http)["engine"]["prefill_tokens"] == before
    assert r3.choices[0].message.content == r2.choices[0].message.content


# -- named states --------------------------------------------------------------------------------
def test_named_states(client, http, model, tok, state_file):
    r = http.post("/v1/states", json={"id": "sea", "messages": HISTORY})
    assert r.status_code == 200, r.text
    assert r.json()["prompt_tokens"] == len(chat_prompt(HISTORY)) - len("Assistant:")
    ids = sorted(s["id"] for s in http.get("/v1/states").json()["data"])
    assert ids == ["keeper", "sea"]
    ids = tok.encode(chat_prompt(HISTORY)[: -len("Assistant:")])
    after_history = None
    for i in range(0, len(ids), EVERY):  # in the server's pieces
        _, after_history = model.forward(ids[i : i + EVERY], after_history)
    ask = [{"role": "user", "content": "And the sky?"}]
    kw = {"max_tokens": 16, "seed": 5, "temperature": 0.8}
    r = client.chat.completions.create(model=NAME, messages=ask, extra_body={"state": "sea"}, **kw)
    ref = reference(model, tok, chat_prompt(ask), chat=True, state=after_history, **kw)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ref[:2]
    assert r.usage.prompt_tokens == len(chat_prompt(ask))
    # a state given at startup (--state keeper=FILE)
    r = client.completions.create(
        model=NAME, prompt=" Beware", extra_body={"state": "keeper"}, **kw
    )
    ref = reference(model, tok, " Beware", state=State.load(state_file), **kw)
    assert r.choices[0].text == ref[0]
    # unknown state, bad id, delete
    expect_error(
        http.post("/v1/completions", json={"prompt": "a", "state": "nope"}),
        404,
        param="state",
        code="state_not_found",
    )
    expect_error(http.post("/v1/states", json={"id": "no spaces", "prompt": "a"}), 400, param="id")
    expect_error(http.post("/v1/states", json={"id": "x"}), 400)
    assert http.delete("/v1/states/sea").json()["deleted"] is True
    expect_error(http.get("/v1/states/sea"), 404)


def test_state_tuned_file_is_loaded(tmp_path):
    from rwkvpy.state import State

    m = rwkvpy.load(fixture_path("rwkv-cpp-tiny", "tiny-rwkv-5v2-730K-FP32.bin"), threads=1)
    H, N = m.config.n_head, m.config.head_size
    g = torch.Generator().manual_seed(0)
    sd = {
        f"blocks.{i}.att.time_state": torch.randn(H, N, N, generator=g)
        for i in range(m.config.n_layer)
    }
    torch.save(sd, tmp_path / "tuned.pth")
    st = State.from_file(tmp_path / "tuned.pth", m)
    assert torch.equal(st.wkv[0], sd["blocks.0.att.time_state"].transpose(1, 2))


# -- limits and errors ---------------------------------------------------------------------------
def test_bad_requests(http):
    p = "/v1/completions"
    expect_error(
        http.post(p, content=b"{not json", headers={"Content-Type": "application/json"}),
        400,
        code="invalid_json",
    )
    expect_error(http.post(p, json=["a list"]), 400)
    expect_error(
        http.post(p, json={"model": "gpt-4", "prompt": "a"}),
        404,
        param="model",
        code="model_not_found",
    )
    expect_error(http.post(p, json={"prompt": "a", "max_tokens": 257}), 400, param="max_tokens")
    expect_error(
        http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 1000},
        ),
        400,
        param="max_completion_tokens",
    )
    expect_error(http.post(p, json={"prompt": "a", "temperature": "hot"}), 400, param="temperature")
    expect_error(http.post(p, json={"prompt": "a", "n": 33}), 400, param="n")
    expect_error(
        http.post(p, json={"prompt": "a", "logit_bias": {"999": 1}}), 400, param="logit_bias"
    )
    expect_error(http.post(p, json={"prompt": [1, 2, 300]}), 400, param="prompt")
    expect_error(http.post(p, json={"prompt": ""}), 400, param="prompt")
    expect_error(http.post(p, json={"prompt": "a", "logprobs": 21}), 400, param="logprobs")
    expect_error(
        http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2},
        ),
        400,
        param="top_logprobs",
    )
    expect_error(
        http.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "a"}]}),
        400,
        param="messages[0].role",
    )
    expect_error(http.post("/v1/chat/completions", json={"messages": []}), 400, param="messages")
    expect_error(http.post(p, json={"prompt": "x" * 70000}), 413, code="request_too_large")
    expect_error(http.get(p), 405)
    assert wait_idle(http)["slots_used"] == 0


def sse_stream(http, body):
    """(response context, iterator of parsed data events) of a raw streaming request."""
    ctx = http.stream("POST", "/v1/completions", json={**body, "stream": True})
    r = ctx.__enter__()
    assert r.status_code == 200

    def events():
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[6:]
                yield data if data == "[DONE]" else json.loads(data)

    return ctx, events()


def test_busy_429_and_disconnect_frees_slots(http, client):
    # n=32 fills every slot of this server (--max-concurrent 32)
    ctx, events = sse_stream(
        http, {"prompt": "Once", "n": 32, "max_tokens": 256, "temperature": 1.0}
    )
    first = next(events)
    assert first["object"] == "text_completion"
    err = expect_error(
        http.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}),
        429,
        code="rate_limit_exceeded",
    )
    assert "busy" in err["message"]
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model=NAME, prompt="a", max_tokens=1)
    ctx.__exit__(None, None, None)  # the client goes away mid-stream
    s = wait_idle(http, timeout=3)
    assert s["engine"]["sequences_cancelled"] >= 32
    r = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "n": 32})
    assert r.status_code == 200 and len(r.json()["choices"]) == 32


def test_disconnect_mid_stream_stops_generation(http):
    ctx, events = sse_stream(http, {"prompt": "Far away", "max_tokens": 256})
    for _ in range(3):
        next(events)
    ctx.__exit__(None, None, None)
    s = wait_idle(http, timeout=3)
    assert s["slots_used"] == 0
    tokens = s["engine"]["decode_tokens"]
    time.sleep(0.3)
    assert stats(http)["engine"]["decode_tokens"] == tokens  # nothing runs for it any more
    r = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
    assert r.status_code == 200
    # a non-streaming request whose client gives up a quarter of the way through (timed from
    # a whole one: decoding speed differs between machines and versions)
    body = {"prompt": "Far away", "max_tokens": 256, "temperature": 0}
    t0 = time.monotonic()
    assert http.post("/v1/completions", json=body).status_code == 200
    whole = time.monotonic() - t0
    with pytest.raises(httpx.TimeoutException):
        http.post("/v1/completions", json=body, timeout=max(0.05, whole / 4))
    s = wait_idle(http, timeout=3)
    assert s["engine"]["sequences_cancelled"] >= 2


# -- shutdown ------------------------------------------------------------------------------------
def test_sigterm_cancels_running_requests_and_exits_0(tmp_path):
    s = Server(
        ["--graceful-timeout", "0.5", "--max-tokens-limit", "100000"], tmp_path / "server.log"
    )
    try:
        with httpx.Client(base_url=s.url, timeout=30) as http:
            ctx, events = sse_stream(http, {"prompt": "Long ago", "max_tokens": 100000})
            next(events)
            t0 = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            rest = list(events)
            ctx.__exit__(None, None, None)
            assert time.monotonic() - t0 < 10
            assert rest[-1] == "[DONE]"
            assert rest[-2]["error"]["code"] == "server_shutting_down"
        assert s.proc.wait(20) == 0
    finally:
        code = s.stop()
    log = s.text()
    assert code == 0
    assert "Traceback" not in log and "ERROR" not in log, log
    assert "cancelled 1 running sequence" in log and "rwkvpy serve: stopped" in log


def test_server_helper_reaps_a_server_that_fails_to_start(tmp_path, monkeypatch):
    """Server's startup failures leave no process behind: a real server still starting when
    its time is up, and stand-ins (shell scripts in place of the interpreter) for one that
    exits at once and one that says where it listens but never answers /health."""
    started = []
    real = subprocess.Popen

    def popen(*a, **kw):
        started.append(real(*a, **kw))
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", popen)
    with pytest.raises(pytest.fail.Exception, match="did not start"):
        Server([], tmp_path / "slow.log", startup_s=0.3)  # still importing at 0.3 s
    assert started[-1].returncode == -signal.SIGKILL  # killed and reaped

    def stand_in(name, body):
        path = tmp_path / name
        path.write_text("#!/bin/sh\n" + body + "\n")
        path.chmod(0o755)
        monkeypatch.setattr(sys, "executable", str(path))

    stand_in("exits", "echo bad flag; exit 2")
    with pytest.raises(pytest.fail.Exception, match="did not start"):
        Server([], tmp_path / "exits.log")
    assert started[-1].returncode == 2
    stand_in("deaf", "echo listening on http://127.0.0.1:9; exec sleep 60")  # nothing on :9
    with pytest.raises(pytest.fail.Exception, match="did not become healthy"):
        Server([], tmp_path / "deaf.log", startup_s=1.0)
    assert started[-1].returncode == -signal.SIGKILL
    assert len(started) == 3
    for p in started:
        with pytest.raises(ChildProcessError):  # reaped: no zombie left
            os.waitpid(p.pid, os.WNOHANG)
