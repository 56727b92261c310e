"""The demo model chats: its chat turns (rwkvpy.demo.chat_turns) are built deterministically,
and `rwkvpy chat` and the server's /v1/chat/completions get replies from it, not the empty
reply of a model that answers the stop string first."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from servers import openai_client, serving

import rwkvpy
import rwkvpy.demo as demo
from rwkvpy.chat import STOP, normalize_message, render_user
from rwkvpy.perplexity import perplexity

pytestmark = pytest.mark.fast  # the fast tier: needs only the package (pyproject's markers)

# Held-out chat turns (subjects whose answers were never trained on): perplexity per byte of
# their replies given the conversation before them. Measured on 2026-12-06 (Python 3.11.7):
# 2.500 for the shipped model, 4.285 for the documentation-only model it was fine-tuned from.
# Byte-uniform guessing scores 256.
CHAT_REPLY_PPL_BOUND = 2.6

QUESTIONS = ["What does len do?", "What is the for statement?", "Hi!"]


def test_chat_turns_are_deterministic():
    assert demo.chat_pairs() == demo.chat_pairs()
    here = demo.chat_info()
    code = "import json, rwkvpy.demo as d; print(json.dumps(d.chat_info()))"
    for seed in ("1", "2"):  # another process, another string hash seed: the same turns
        r = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == here


def test_chat_turns_ignore_replaced_builtins(monkeypatch):
    """A library that swaps a builtin in the running process (Ray's progress bars replace
    print) changes nothing: the turns are Python's own."""
    import builtins

    here = demo.chat_info()
    assert any(s == "builtin:print" for s, *_ in demo.chat_pairs())
    monkeypatch.setattr(builtins, "print", lambda *a, **k: None)
    assert demo.chat_info() == here


def test_chat_turns_follow_the_chat_format_and_hold_out_subjects():
    pairs = demo.chat_pairs()
    train, held = demo.chat_turns()
    assert len(train) > 500 and len(held) > 50
    assert len(train) + len(held) == sum(len(qs) for _, qs, _, _ in pairs)
    doc_held = " ".join(demo.held_out_text().split())
    for subject, qs, answer, held_out in pairs:
        assert answer and answer == answer.strip() and "\n" not in answer, subject
        for q in qs:
            assert normalize_message(q) == q
            turn = demo.render_turn(q, answer)
            assert turn == f"{render_user(q)} {answer}{STOP}"
            assert turn.count(STOP) == 2  # one after the message, one ending the reply
            assert turn in (held if held_out else train)
        if not held_out:  # chat training adds nothing of the held-out documentation
            assert answer[:-1] not in doc_held, subject
    # nor any held-out reply
    assert not ({a for _, _, a, h in pairs if h} & {a for _, _, a, h in pairs if not h})
    assert {s for s, *_ in pairs} == {
        s for s, *_ in pairs if s.startswith(("topic:", "builtin:", "method:", "self:"))
    }
    assert demo.held_out_chat_text() == "".join(held)


def test_demo_replies_to_held_out_chat():
    """Perplexity of the held-out replies, each given the conversation before it."""
    model = rwkvpy.load("demo", threads=1)
    held = demo.chat_turns()[1]
    tokens, scored = [], []
    for turn in held:
        prompt, reply = turn.split("\n\nAssistant:", 1)
        tokens += list((prompt + "\n\nAssistant:").encode())
        start = len(tokens)
        tokens += list(reply.encode())
        scored.append((start, len(tokens)))
    nll = torch.zeros(len(tokens) - 1, dtype=torch.float64)
    state = None
    for a in range(0, len(tokens) - 1, 1024):
        inp = tokens[a : a + 1024]
        tgt = torch.tensor(tokens[a + 1 : a + 1025])
        logits, state = model.forward(inp[: len(tgt)], state, all_logits=True)
        nll[a : a + len(tgt)] = torch.nn.functional.cross_entropy(
            logits.double(), tgt, reduction="none"
        )
    reply = torch.cat([nll[s - 1 : e - 1] for s, e in scored])
    assert float(reply.mean().exp()) < CHAT_REPLY_PPL_BOUND
    # the whole conversation scores as rwkvpy.perplexity does
    assert float(nll.mean().exp()) == pytest.approx(perplexity(model, tokens).perplexity, rel=1e-6)


def test_rwkvpy_chat_with_the_demo_replies():
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "rwkvpy",
            "chat",
            "-m",
            "demo",
            "--seed",
            "1",
            "--threads",
            "1",
            "--max-tokens",
            "200",
            "--quiet",
        ],
        input="\n".join(QUESTIONS) + "\n",
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr
    replies = [line for line in r.stdout.split("\n") if line.startswith("Assistant:")]
    assert len(replies) == len(QUESTIONS), r.stdout
    for line in replies:
        assert line[len("Assistant:") :].strip(), r.stdout


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("demo-server") / "server.log"
    with serving(["--no-access-log"], log, model="demo") as s:
        yield s


def test_openai_chat_completion_with_the_demo(demo_server):
    with openai_client(demo_server, timeout=120) as client:
        name = client.models.list().data[0].id
        assert name == "demo"
        for q in QUESTIONS:
            r = client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": q}], max_tokens=200, seed=1
            )
            content = r.choices[0].message.content
            assert content and content.strip(), (q, r)
            assert "\n\n" not in content
