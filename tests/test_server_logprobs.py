"""Log probabilities, echo scoring, /tokenize, /detokenize and /metrics on the real server
(a subprocess, tests/test_server.py's Server) through the official ``openai`` client and raw
HTTP; references computed in this process: ``rwkvpy.perplexity`` (per-token NLL within 1e-4),
``generate`` with the same seed, the model's logits."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from servers import http_client, openai_client, serving

import rwkvpy
from rwkvpy.config import Version
from rwkvpy.generate import generate
from rwkvpy.perplexity import perplexity
from rwkvpy.sampling import SamplingParams
from rwkvpy.synth import save_random_model

KEY = "logprobs-key"
TEXT = "The river runs to the sea. Straße, café: 東京 🙂!"


@pytest.fixture(scope="module")
def demo():
    before = torch.get_num_threads()
    m = rwkvpy.load("demo", threads=1)
    yield m, m.tokenizer()
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def api_key():
    return KEY


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("lp") / "server.log"
    with serving(["--api-key", KEY, "--no-access-log"], log, model="demo") as s:
        yield s


def reference_logprobs(model, ids) -> list:
    """log_softmax of the model's logits at each position, picked at the next token."""
    logits, _ = model.forward(ids, all_logits=True)
    lp = torch.log_softmax(logits.float(), dim=-1)
    return [float(lp[i, ids[i + 1]]) for i in range(len(ids) - 1)]


def check_scoring(client, model, tok, text):
    """echo + max_tokens 0 scores ``text``: per-token NLL equal to perplexity's."""
    r = client.completions.create(
        model=client.models.list().data[0].id, prompt=text, echo=True, max_tokens=0, logprobs=2
    )
    c = r.choices[0]
    ids = tok.encode(text)
    assert c.text == text and c.finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) == len(lp.token_logprobs) == len(lp.text_offset)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    got = lp.token_logprobs[1:]
    ppl = perplexity(model, ids)
    assert abs(-sum(got) / len(got) - ppl.nll) < 1e-4
    assert max(abs(a - b) for a, b in zip(got, reference_logprobs(model, ids))) < 1e-4
    for top in lp.top_logprobs[1:]:
        assert len(top) == 2 and list(top.values()) == sorted(top.values(), reverse=True)
    return lp


# -- completions ---------------------------------------------------------------------------------
def test_echo_scores_a_text_as_perplexity_does(client, demo):
    model, tok = demo
    lp = check_scoring(client, model, tok, TEXT)
    # byte tokens of a split character are written "bytes:\xNN"; whole ones are their text
    ss = TEXT.index("ß")
    assert lp.tokens[ss : ss + 2] == ["bytes:\\xc3", "bytes:\\x9f"]
    assert lp.text_offset[ss : ss + 3] == [ss, ss, ss + 1]
    assert "".join(lp.tokens[:ss]) == TEXT[:ss]
    # a long text is read in pieces (cache checkpoints, at most 512 tokens): the same numbers
    long = " ".join([TEXT] * 12)
    assert len(tok.encode(long)) > 600
    check_scoring(client, model, tok, long)


def test_echo_with_generation_streamed(http, demo):
    _, tok = demo
    n = len(tok.encode(TEXT))
    body = {"prompt": TEXT, "echo": True, "max_tokens": 4, "temperature": 0, "logprobs": 1}
    whole = http.post("/v1/completions", json=body).json()["choices"][0]
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        chunks = [
            json.loads(line[6:])["choices"][0]
            for line in r.iter_lines()
            if line.startswith("data: {")
        ]
    assert chunks[0]["text"] == TEXT and len(chunks[0]["logprobs"]["tokens"]) == n
    assert "".join(c["text"] for c in chunks) == whole["text"]
    offsets = [o for c in chunks if c["logprobs"] for o in c["logprobs"]["text_offset"]]
    assert offsets == whole["logprobs"]["text_offset"] and len(offsets) == n + 4
    assert offsets[n] == len(TEXT)


def test_generated_logprobs_match_generate_and_the_model(client, http, demo):
    model, tok = demo
    prompt = "Python lists"
    body = {
        "prompt": prompt,
        "max_tokens": 24,
        "logprobs": 3,
        "seed": 11,
        "temperature": 0.9,
        "presence_penalty": 0.3,
    }
    c = http.post("/v1/completions", json=body).json()["choices"][0]
    ref = generate(
        model,
        tok,
        prompt,
        SamplingParams(max_tokens=24, logprobs=3, seed=11, temperature=0.9, presence_penalty=0.3),
    )
    assert c["text"] == ref.text
    lp = c["logprobs"]
    assert [e.logprob for e in ref.logprobs] == pytest.approx(lp["token_logprobs"], abs=1e-6)
    assert lp["text_offset"] == [e.offset for e in ref.logprobs]
    assert all(len(t) == 3 for t in lp["top_logprobs"])
    # streamed: the same tokens and numbers, spread over the chunks
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for ch in chunks:
        got = ch["choices"][0]["logprobs"]
        for k in streamed:
            streamed[k] += got[k] if got else []
    assert streamed == {k: lp[k] for k in streamed}
    # greedy and no penalties: the model's own distribution (what perplexity scores)
    g = client.completions.create(
        model="demo", prompt=prompt, max_tokens=16, temperature=0, logprobs=1
    )
    ids = tok.encode(prompt) + tok.encode(g.choices[0].text)
    ref_lp = reference_logprobs(model, ids)[len(tok.encode(prompt)) - 1 :]
    assert max(abs(a - b) for a, b in zip(g.choices[0].logprobs.token_logprobs, ref_lp)) < 1e-4
    assert [list(t)[0] for t in g.choices[0].logprobs.top_logprobs] == g.choices[
        0
    ].logprobs.tokens  # greedy: the chosen token is the most probable


def test_logprobs_are_those_of_the_biased_logits(http, demo):
    model, tok = demo
    prompt = "Hello"
    raw, _ = model.forward(tok.encode(prompt))
    target = int(torch.argsort(raw, descending=True)[5])
    c = http.post(
        "/v1/completions",
        json={
            "prompt": prompt,
            "max_tokens": 1,
            "temperature": 0,
            "logit_bias": {str(target): 40},
            "logprobs": 0,
        },
    ).json()["choices"][0]
    biased = raw.float().clone()
    biased[target] += 40
    assert c["text"] == chr(target)
    assert c["logprobs"]["token_logprobs"][0] == pytest.approx(
        float(torch.log_softmax(biased, 0)[target]), abs=1e-5
    )


# -- chat ------------------------------------------------------------------------------------------
def test_chat_logprobs_in_the_chat_shape(client):
    msgs = [{"role": "user", "content": "What does print do?"}]
    r = client.chat.completions.create(
        model="demo", messages=msgs, max_tokens=20, seed=3, logprobs=True, top_logprobs=2
    )
    c = r.choices[0]
    content = c.logprobs.content
    assert len(content) <= r.usage.completion_tokens
    text = bytes(b for e in content for b in e.bytes).decode("utf-8", "replace")
    assert text.lstrip() == c.message.content
    for e in content:
        assert len(e.top_logprobs) == 2 and e.logprob <= 0
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
    s = client.chat.completions.create(
        model="demo",
        messages=msgs,
        max_tokens=20,
        seed=3,
        logprobs=True,
        top_logprobs=2,
        stream=True,
    )
    streamed = [
        e
        for ch in s
        for e in (
            (ch.choices[0].logprobs.content or []) if ch.choices and ch.choices[0].logprobs else []
        )
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


# -- tokenize, detokenize, metrics -----------------------------------------------------------------
def test_tokenize_and_detokenize(http, demo):
    _, tok = demo
    ids = http.post("/tokenize", json={"content": TEXT}).json()["tokens"]
    assert ids == tok.encode(TEXT)
    assert http.post("/tokenize", json={"prompt": "ab"}).json() == {"tokens": [97, 98], "count": 2}
    pieces = http.post("/tokenize", json={"content": "é", "with_pieces": True}).json()["tokens"]
    assert pieces == [{"id": 195, "piece": "bytes:\\xc3"}, {"id": 169, "piece": "bytes:\\xa9"}]
    back = http.post("/detokenize", json={"tokens": ids}).json()
    assert back == {"content": TEXT, "prompt": TEXT}
    assert http.post("/detokenize", json={"tokens": [1, 999]}).status_code == 400
    assert http.post("/tokenize", json={"content": 5}).status_code == 400
    assert httpx.post(str(http.base_url) + "/tokenize", json={"content": "a"}).status_code == 401


def scrape(http) -> dict:
    """{(sample name, labels as a sorted tuple): value} of GET /metrics."""
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(r.text)
        for s in fam.samples
    }


def test_metrics_count_requests_and_tokens(http, demo):
    _, tok = demo
    assert httpx.get(str(http.base_url) + "/metrics").status_code == 401  # the key guards it
    before = scrape(http)
    prompts = ["metrics one", "metrics two, longer", "metrics three, the longest one"]
    usage = [
        http.post(
            "/v1/completions",
            json={"prompt": p, "max_tokens": 5, "temperature": 0, "logit_bias": {"10": -100}},
        ).json()["usage"]
        for p in prompts
    ]
    assert http.post("/v1/completions", json={"prompt": "x", "n": 0}).status_code == 400
    assert httpx.get(str(http.base_url) + "/v1/models").status_code == 401
    after = scrape(http)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    route = {"route": "/v1/completions"}
    assert delta("rwkvpy_requests_total", status="200", **route) == 3
    assert delta("rwkvpy_requests_total", status="400", **route) == 1
    assert delta("rwkvpy_requests_total", route="/v1/models", status="401") == 1
    assert delta("rwkvpy_requests_total", route="/metrics", status="200") == 1  # the first scrape
    assert delta("rwkvpy_prompt_tokens_total") == sum(len(tok.encode(p)) for p in prompts)
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usage)
    assert delta("rwkvpy_prefill_tokens_total") == delta("rwkvpy_prompt_tokens_total") - cached
    assert (
        delta("rwkvpy_generation_tokens_total") == 15 == sum(u["completion_tokens"] for u in usage)
    )
    assert delta("rwkvpy_sequences_total", outcome="finished") == 3
    assert delta("rwkvpy_batch_size_count") == 15 and delta("rwkvpy_batch_size_sum") == 15
    assert delta("rwkvpy_time_to_first_token_seconds_count") == 3
    assert delta("rwkvpy_time_per_output_token_seconds_count") == 12
    assert delta("rwkvpy_prefix_cache_hits_total") + delta("rwkvpy_prefix_cache_misses_total") == 3
    assert after[("rwkvpy_queue_length", ())] == 0 == after[("rwkvpy_running_sequences", ())]


def test_metrics_public_flag(tmp_path):
    """--metrics-public: /metrics answers without the key, the other routes still need it."""
    from starlette.testclient import TestClient

    from rwkvpy.engine import Engine
    from rwkvpy.server.app import ServerConfig, ServerState, build_app

    model = rwkvpy.load("demo", threads=1)
    tok = model.tokenizer()
    for public, status in ((True, 200), (False, 401)):
        server = ServerState(
            model,
            tok,
            Engine(model, tok),
            ServerConfig(model_name="demo", api_key=KEY, metrics_public=public),
        )
        with TestClient(build_app(server)) as c:
            assert c.get("/metrics").status_code == status
            assert c.get("/v1/models").status_code == 401


# -- a World-vocabulary model ----------------------------------------------------------------------
def test_world_vocab_scoring_equals_perplexity(tmp_path):
    path = save_random_model(
        tmp_path / "world.pth",
        version=Version.V7,
        n_embd=64,
        n_layer=2,
        vocab=65536,
        seed=5,
        dtype=torch.float32,
    )
    model = rwkvpy.load(path, threads=1)
    tok = model.tokenizer()
    with serving(["--api-key", KEY, "--no-access-log"], tmp_path / "world.log", model=path) as s:
        with openai_client(s, KEY) as c:
            lp = check_scoring(c, model, tok, TEXT)
            assert "".join(lp.tokens) == TEXT  # World tokens are whole characters here
        with http_client(s, KEY) as h:
            assert h.post("/tokenize", json={"content": TEXT}).json()["tokens"] == tok.encode(TEXT)
