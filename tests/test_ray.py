"""rwkvpy on Ray (the ``ray`` extra): batch jobs on Ray Data, the server on Ray Serve.

One local Ray instance for the module (2 CPUs, 127.0.0.1, no dashboard), the demo model, one
thread per model everywhere (so that in-process and Ray runs do the same float operations).
The batch tests run first: Ray Serve's two replicas then take both CPUs. The server is the real
command (``python -m rwkvpy.server ... --ray --ray-address``) joining this instance, driven by
the official ``openai`` client and raw HTTP; its reference is the single-process app
(``build_app``) in this process.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

ray = pytest.importorskip("ray")  # the ray extra; in CI it is in .[test]
pytest.importorskip("ray.serve")
pytest.importorskip("ray.data")

import httpx  # noqa: E402
import openai  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

import rwkvpy  # noqa: E402
from rwkvpy import batch  # noqa: E402
from rwkvpy.batch import read_output  # noqa: E402

KEY = "ray-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LOAD = {"threads": 1}
PROMPTS = [
    "Once upon a time",
    "The sea is",
    "Hello",
    "RWKV",
    "A cat sat on",
    "1, 2, 3,",
    "Dear sir,",
    "The end of",
]


@pytest.fixture(scope="module")
def cluster():
    """The module's Ray instance (its GCS address); the numba cache warmed first, in this
    process, so that the actors load compiled kernels instead of compiling them each."""
    from rwkvpy.server.startup import warm_up

    warm_up(rwkvpy.load("demo", **LOAD))
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def model():
    m = rwkvpy.load("demo", **LOAD)
    return m, m.tokenizer()


def _requests(path, n=12):
    with open(path, "w") as f:
        for i in range(n):
            row = {
                "id": f"r{i}",
                "prompt": PROMPTS[i % len(PROMPTS)],
                "max_tokens": 6 + i % 5,
                "temperature": 0.9,
            }
            if i % 3 == 0:
                row["seed"] = 1000 + i
            if i == 5:
                row["stop"] = ["e"]
            f.write(json.dumps(row) + "\n")
    return str(path)


def _by_id(rows):
    out = {}
    for r in rows:
        assert r["id"] not in out, f"row {r['id']} is in the output twice"
        out[r["id"]] = r
    return out


# -- batch jobs ----------------------------------------------------------------------------------
def test_batch_generate_on_ray_equals_in_process_and_survives_a_killed_actor(cluster, tmp_path):
    src = _requests(tmp_path / "in.jsonl")
    local = tmp_path / "local.jsonl"
    batch.run("generate", "demo", src, str(local), batch_size=2, seed=7, load_kw=LOAD)
    ref = _by_id(read_output(str(local)))
    assert len(ref) == 12 and all(r["error"] is None for r in ref.values())

    killed = []

    def kill_first_actor(rows, pid):  # after the first group: kill the actor that ran it
        if not killed:
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)

    out = tmp_path / "ray.jsonl"
    r = batch.run(
        "generate",
        "demo",
        src,
        str(out),
        ray=True,
        concurrency=2,
        batch_size=2,
        seed=7,
        load_kw=LOAD,
        on_rows=kill_first_actor,
    )
    assert killed and killed[0] != os.getpid()
    assert r["written"] == 12
    got = _by_id(read_output(str(out)))  # every row exactly once
    assert got == ref
    with open(out) as f:
        assert sum(1 for line in f if line.strip()) == 12


def test_batch_perplexity_on_ray_resumes_an_interrupted_run(cluster, tmp_path, capsys):
    from rwkvpy.cli import main

    src = tmp_path / "texts"
    (src / "sub").mkdir(parents=True)
    for i, p in enumerate(PROMPTS[:5]):
        (src / ("sub" if i % 2 else "") / f"t{i}.txt").write_text(p + " and so on, " * (i + 1))
    (src / "short.txt").write_text("x")  # one token: nothing to score, an error row
    local = tmp_path / "local.jsonl"
    assert (
        main(
            [
                "batch",
                "perplexity",
                "demo",
                str(src),
                str(local),
                "--batch-size",
                "2",
                "--threads",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    ref = _by_id(read_output(str(local)))
    assert len(ref) == 6 and ref["short.txt"]["error"] and ref["short.txt"]["nll"] is None
    assert ref["sub/t1.txt"]["tokens"] > 0 and ref["t0.txt"]["perplexity"] > 1

    out = tmp_path / "out.parquet"

    def interrupt(rows, pid):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # killed after its first group
        batch.run(
            "perplexity", "demo", str(src), str(out), batch_size=2, load_kw=LOAD, on_rows=interrupt
        )
    partial = tmp_path / "out.parquet.partial.jsonl"
    assert len(read_output(str(partial))) == 2 and not out.exists()
    with open(partial, "a") as f:
        f.write('{"id": "t4.t')  # a torn last line, as a kill while writing leaves it
    # without --resume or --force, OUTPUT is kept
    assert main(["batch", "perplexity", "demo", str(src), str(out), "--quiet"]) == 1
    assert "--resume" in capsys.readouterr().err
    assert (
        main(
            [
                "batch",
                "perplexity",
                "-m",
                "demo",
                str(src),
                str(out),
                "--batch-size",
                "2",
                "--threads",
                "1",
                "--ray",
                cluster,
                "--concurrency",
                "2",
                "--resume",
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped"] == 2 and summary["written"] == 4
    assert _by_id(read_output(str(out))) == ref and not partial.exists()


# -- Ray Serve -----------------------------------------------------------------------------------
def test_session_home_replica_is_stable():
    """Rendezvous hashing: every proxy picks the same home whatever the order it lists the
    replicas in, sessions spread over all of them, and a replica that leaves moves only its own
    sessions."""
    from rwkvpy.server.ray_router import home_replica

    ids = [f"replica{i}" for i in range(4)]
    homes = {f"s{k}": home_replica(f"s{k}", ids) for k in range(400)}
    assert all(home_replica(s, ids[::-1]) == h for s, h in homes.items())
    assert all(60 < list(homes.values()).count(r) < 140 for r in ids)
    rest = ids[1:]
    for s, h in homes.items():
        assert home_replica(s, rest) == h if h != ids[0] else home_replica(s, rest) in rest


def test_serve_ray_options_are_checked_before_ray_starts(capsys):
    from rwkvpy.cli import main

    for args, says in (
        (["--autoscale", "2:1"], "0 <= MIN <= MAX"),
        (["--autoscale", "two"], "MIN:MAX"),
        (["--autoscale", "1:2", "--replicas", "2"], "not both"),
        (["--replicas", "0"], "--replicas must be > 0"),
    ):
        assert main(["serve", "demo", "--ray", *args]) == 1
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err


@pytest.fixture(scope="module")
def served(cluster, tmp_path_factory):
    """``rwkvpy serve demo --ray`` with 2 replicas, joining the module's Ray instance."""
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    log = open(log_path, "w")  # noqa: SIM115 - written by the server until the end
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RWKVPY_API_KEY", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rwkvpy.server",
            "demo",
            "--ray",
            "--ray-address",
            cluster,
            "--replicas",
            "2",
            "--port",
            "0",
            "--threads",
            "1",
            "--api-key",
            KEY,
            "--max-states",
            "3",
            "--graceful-timeout",
            "1",
            "--no-access-log",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )

    def text():
        with open(log_path) as f:
            return f.read()

    try:
        deadline = time.monotonic() + 240
        while not (m := re.search(r"listening on (http://[0-9.]+:\d+)", text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"rwkvpy serve --ray did not start:\n{text()}")
            time.sleep(0.2)
        yield m.group(1)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(60) == 0, text()
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()


@pytest.fixture(scope="module")
def single(model):
    """The single-process server (the same app, one process) with the same model."""
    from rwkvpy.engine import Engine
    from rwkvpy.server.app import ServerConfig, ServerState, build_app

    m, tok = model
    server = ServerState(
        m, tok, Engine(m, tok), ServerConfig(model_name="demo", api_key=KEY, max_states=3)
    )
    with TestClient(build_app(server)) as client:
        yield client


def _replica(r) -> str:
    rid = r.headers.get("x-rwkvpy-replica")
    assert rid, "every response names its replica"
    return rid


def test_serve_openai_client_gives_the_single_process_text(served, single):
    client = openai.OpenAI(base_url=served + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["demo"]
    kw = {"model": "demo", "max_tokens": 12, "temperature": 0.8, "seed": 42}
    c = client.completions.create(prompt="Once upon a time", **kw)
    ref = single.post(
        "/v1/completions", json={"prompt": "Once upon a time", **kw}, headers=AUTH
    ).json()
    assert c.choices[0].text == ref["choices"][0]["text"] and c.usage.completion_tokens == 12
    msgs = [{"role": "user", "content": "Tell me about the sea."}]
    ch = client.chat.completions.create(messages=msgs, **kw)
    ref = single.post("/v1/chat/completions", json={"messages": msgs, **kw}, headers=AUTH).json()
    assert ch.choices[0].message.content == ref["choices"][0]["message"]["content"]
    pieces = [
        e.choices[0].text
        for e in client.completions.create(prompt="Once upon a time", stream=True, **kw)
        if e.choices
    ]
    first = single.post(
        "/v1/completions", json={"prompt": "Once upon a time", **kw}, headers=AUTH
    ).json()["choices"][0]["text"]
    assert "".join(pieces) == first and len(pieces) > 1
    # the app's own validation and error bodies, through the proxy
    r = httpx.post(
        served + "/v1/completions",
        json={"model": "demo", "prompt": "x", "temperature": -1},
        headers=AUTH,
    )
    ref = single.post(
        "/v1/completions", json={"model": "demo", "prompt": "x", "temperature": -1}, headers=AUTH
    )
    assert r.status_code == ref.status_code == 400 and r.json() == ref.json()


def test_serve_auth_is_enforced(served, single):
    assert httpx.get(served + "/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(served + "/v1/models", headers=headers)
        ref = single.get("/v1/models", headers=headers)
        assert r.status_code == 401 and r.json() == ref.json()
    bad = openai.OpenAI(base_url=served + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="demo", prompt="x", max_tokens=1)


def test_serve_spreads_requests_over_both_replicas(served):
    seen, lock = [], threading.Lock()

    def one():
        r = httpx.post(
            served + "/v1/completions",
            headers=AUTH,
            timeout=60,
            json={"model": "demo", "prompt": "Hello", "max_tokens": 4},
        )
        assert r.status_code == 200
        with lock:
            seen.append(_replica(r))

    for _ in range(5):  # the proxy picks replicas at random: a few rounds until both served
        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if len(set(seen)) == 2:
            break
    assert len(set(seen)) == 2, seen
    # /v1/stats sums the replicas' counters (each publishes its own every STATS_EVERY s)
    deadline = time.monotonic() + 10
    while True:
        st = httpx.get(served + "/v1/stats", headers=AUTH).json()
        per = st["replicas"]
        if (
            len(per) == 2 and sum(p["requests_total"] for p in per) >= len(seen)
        ) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert {p["replica"] for p in per} == set(seen)
    assert st["requests_total"] == sum(p["requests_total"] for p in per) >= len(seen)
    assert st["engine"]["decode_tokens"] == sum(p["engine"]["decode_tokens"] for p in per)
    assert st["max_concurrent"] == 2 * per[0]["max_concurrent"]


def test_serve_state_made_on_one_replica_is_used_on_the_other(served, single):
    body = {"model": "demo", "id": "pirate", "prompt": "You are a pirate. Speak like one."}
    r = httpx.post(served + "/v1/states", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    maker = _replica(r)
    assert single.post("/v1/states", json=body, headers=AUTH).status_code == 200
    req = {"model": "demo", "prompt": "\nAhoy", "max_tokens": 8, "seed": 3, "state": "pirate"}
    ref = single.post("/v1/completions", json=req, headers=AUTH).json()["choices"][0]["text"]
    others = set()
    for _ in range(30):
        r = httpx.post(served + "/v1/completions", json=req, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == ref
        if _replica(r) != maker:
            others.add(_replica(r))
            break
    assert others, "no request landed on the other replica"
    # the bound is the cluster's: --max-states 3 saved states in all
    for i in range(2):
        assert (
            httpx.post(
                served + "/v1/states", headers=AUTH, timeout=60, json={**body, "id": f"s{i}"}
            ).status_code
            == 200
        )
    r = httpx.post(served + "/v1/states", json={**body, "id": "one-too-many"}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_states"
    listed = httpx.get(served + "/v1/states", headers=AUTH).json()["data"]
    assert sorted(s["id"] for s in listed) == ["pirate", "s0", "s1"]
    assert httpx.delete(served + "/v1/states/s0", headers=AUTH).status_code == 200
    for _ in range(4):  # gone for every replica
        assert httpx.get(served + "/v1/states/s0", headers=AUTH).status_code == 404


SYSTEM = (
    "You are the ship's log of the schooner Wanderer. Answer in the voice of an old sailor "
    "who has crossed every ocean twice, mentions the weather, the wind and the state of the "
    "rigging in every answer, and never uses more than three sentences. "
) * 3


def test_serve_session_goes_to_the_replica_that_caches_it(served):
    from rwkvpy.server.ray_router import home_replica

    alive, _ = _replicas_up()
    # two sessions whose home replicas differ
    sessions = {}
    for i in range(64):
        sessions.setdefault(home_replica(f"chat-{i}", sorted(alive)), f"chat-{i}")
    assert len(sessions) == 2
    for home, sid in sessions.items():
        msgs, before = [{"role": "system", "content": SYSTEM}], 0
        for turn in range(3):
            msgs.append({"role": "user", "content": f"Turn {turn}: how is the sea today?"})
            r = httpx.post(
                served + "/v1/chat/completions",
                headers={**AUTH, "X-Session-Id": sid},
                timeout=60,
                json={"model": "demo", "messages": msgs, "max_tokens": 8, "seed": turn},
            )
            assert r.status_code == 200, r.text
            assert _replica(r) == home, (sid, turn)
            usage = r.json()["usage"]
            cached = usage["prompt_tokens_details"]["cached_tokens"]
            # the conversation so far (at least the previous prompt) is read from the cache
            if turn:
                assert cached >= before > len(SYSTEM), (turn, usage)
            else:
                assert cached == 0, usage
            before = usage["prompt_tokens"]
            msgs.append(r.json()["choices"][0]["message"])


def _replica_pid(rid: str) -> int:
    """The process of the live replica ``rid`` (Ray's actor table: Serve names a replica's
    actor ``SERVE_REPLICA::APP#DEPLOYMENT#ID``)."""
    from ray._private.state import actors

    pids = [
        a["Pid"]
        for a in actors().values()
        if a["Name"].endswith("#" + rid) and a["State"] == "ALIVE"
    ]
    assert len(pids) == 1, f"replica {rid} is not one live actor: {pids}"
    return pids[0]


def _replicas_up() -> tuple[set, dict]:
    """(the ids of the deployment's live replica actors, Ray Serve's count of replicas by
    state)."""
    from ray import serve
    from ray._private.state import actors

    alive = {
        a["Name"].rsplit("#", 1)[1]
        for a in actors().values()
        if a["Name"].startswith("SERVE_REPLICA::rwkvpy#") and a["State"] == "ALIVE"
    }
    app = serve.status().applications["rwkvpy"]
    return alive, dict(app.deployments["rwkvpy"].replica_states)


# the last test of the module: it leaves the deployment with 2 replicas again, one of them new
def test_serve_replica_killed_mid_stream(served):
    req = {
        "model": "demo",
        "prompt": "Once upon a time",
        "max_tokens": 4000,
        "stream": True,
        "temperature": 1.0,
        "stop": [],
        "seed": 5,
    }
    events, outcome = 0, None
    t0 = time.monotonic()
    try:
        with httpx.stream(
            "POST",
            served + "/v1/completions",
            json=req,
            headers=AUTH,
            timeout=httpx.Timeout(60, read=20),
        ) as r:
            assert r.status_code == 200
            victim = _replica(r)
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    events += 1
                    if events == 3:
                        os.kill(_replica_pid(victim), signal.SIGKILL)
                        killed = time.monotonic()
                if line == "data: [DONE]":
                    outcome = "done"
            outcome = outcome or "ended"
    except httpx.ReadTimeout:
        outcome = "hang"
    except (httpx.RemoteProtocolError, httpx.ReadError) as e:
        outcome = f"error: {e!r}"
    assert events >= 3
    # the broken stream ends (closed or cut) soon after the kill, without its [DONE]
    assert outcome != "hang" and outcome != "done", outcome
    assert time.monotonic() - killed < 15, time.monotonic() - t0
    # the other replica serves right away
    for _ in range(4):
        r = httpx.post(
            served + "/v1/completions",
            headers=AUTH,
            timeout=30,
            json={"model": "demo", "prompt": "Hello", "max_tokens": 4},
        )
        assert r.status_code == 200, r.text
        assert _replica(r) != victim
    # and Ray Serve starts a new replica in the dead one's place
    deadline = time.monotonic() + 90
    while True:
        alive, states = _replicas_up()
        if len(alive) == 2 and victim not in alive and states == {"RUNNING": 2}:
            break
        assert time.monotonic() < deadline, (alive, states)
        time.sleep(0.5)
    print(f"stream: {outcome}; replica back after {time.monotonic() - killed:.1f} s")
