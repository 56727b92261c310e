"""ChatSession on the tiny trained RWKV v7 byte model: the format, only new tokens processed per
turn, the same replies as a cold run, interrupted replies, regenerate, reset, save/load."""

import re

import pytest
import torch
from conftest import Spy, fixture_path

import rwkvpy
from rwkvpy.chat import ChatError, ChatSession, normalize_message, render_system, render_user
from rwkvpy.errors import StateError
from rwkvpy.generate import stream
from rwkvpy.prefix_cache import PrefixCache
from rwkvpy.sampling import SamplingParams
from rwkvpy.tokenizers import ByteTokenizer

# a little extra weight on "\n" makes the tiny model end its replies with a blank line
PARAMS = SamplingParams(seed=5, temperature=0.8, top_k=10, max_tokens=24, logit_bias={10: 2.0})


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return rwkvpy.load(fixture_path("rwkv-cpp-tiny", "tiny-rwkv-7v0-834K-FP32.bin"), threads=1)


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


def check_consistent(session, model, tok):
    """The tokens read are exactly the rendered transcript, and the state is theirs."""
    text = tok.decode(session.tokens)
    want = render_system(session.system) if session.system else ""
    assert text.startswith(want)
    pos = len(want)
    msgs = session.messages
    for user, asst in zip(msgs[::2], msgs[1::2]):
        assert (user["role"], asst["role"]) == ("user", "assistant")
        m = re.compile(
            re.escape(render_user(user["content"])) + r"\s*" + re.escape(asst["content"]) + "\n\n"
        ).match(text, pos)
        assert m, (text[pos:], user, asst)
        pos = m.end()
    assert pos == len(text)
    if session.tokens:
        ref_logits, ref = model.forward(session.tokens)
        assert session.state.n_tokens == len(session.tokens)
        assert torch.allclose(session.state.last_logits, ref_logits, atol=1e-4)
        probe = tok.encode("User:")
        assert torch.allclose(
            model.forward(probe, session.state)[0], model.forward(probe, ref)[0], atol=1e-4
        )


def test_normalize_message():
    assert normalize_message("  hi\r\n\r\n\n  there \n") == "hi\n  there"
    assert render_user("hi") == "User: hi\n\nAssistant:"
    assert render_system("be brief") == "System: be brief\n\n"
    with pytest.raises(ChatError):
        normalize_message(3)


def test_second_turn_only_new_tokens_and_same_as_cold(model, tok):
    spy = Spy(model)
    chat = ChatSession(spy, tok, PARAMS, system="Be brief.")
    first = "".join(chat.say("Hello there"))
    assert chat.messages == [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": first},
    ]
    check_consistent(chat, model, tok)
    history = chat.tokens
    spy.calls.clear()
    reply = chat.say("What is a cat?")
    second = "".join(reply)
    new = tok.encode(render_user("What is a cat?"))
    assert reply.result.finish_reason == "stop"  # ended by the blank line
    assert spy.calls == [len(new)] + [1] * len(reply.result.tokens)
    cold = stream(model, tok, history + new, chat.params)
    assert "".join(cold).lstrip() == second == chat.messages[-1]["content"]
    assert chat.tokens == history + new + cold.result.tokens
    check_consistent(chat, model, tok)


def test_shared_cache_reuses_the_system_prompt(model, tok):
    cache = PrefixCache(max_bytes=1 << 24, every=0)
    system = "You are a helpful assistant who answers in one short sentence."
    "".join(ChatSession(model, tok, PARAMS, system=system, cache=cache).say("Hi"))
    spy = Spy(model)
    other = ChatSession(spy, tok, PARAMS, system=system, cache=cache)
    "".join(other.say("Hello"))
    assert spy.calls[0] == len(tok.encode(render_user("Hello")))
    # reset: the system prompt's state comes back from the cache
    other.reset()
    assert other.messages == [] and other.tokens == tok.encode(render_system(system))
    spy.calls.clear()
    "".join(other.say("Good morning"))
    assert spy.calls[0] == len(tok.encode(render_user("Good morning")))
    check_consistent(other, model, tok)
    # the very same first message again: its whole prompt is cached, no prompt work at all
    other.reset()
    spy.calls.clear()
    "".join(other.say("Hello"))
    assert set(spy.calls) == {1}


def test_closed_early_commits_what_was_shown(model, tok):
    chat = ChatSession(model, tok, SamplingParams(seed=1, temperature=0.7, top_k=5, max_tokens=40))
    reply = chat.say("Tell me about the sea")
    shown = next(reply) + next(reply)
    reply.close()
    assert reply.committed and reply.interrupted and reply.result is None
    assert chat.messages[-1] == {"role": "assistant", "content": shown.lstrip()}
    check_consistent(chat, model, tok)
    # the conversation goes on normally
    "".join(chat.say("More"))
    assert len(chat.messages) == 4
    check_consistent(chat, model, tok)


def test_keyboard_interrupt_inside_the_model(model, tok):
    spy = Spy(model, interrupt_at=6)  # the prompt, 4 tokens, then Ctrl-C
    chat = ChatSession(spy, tok, SamplingParams(seed=2, temperature=0.7, top_k=5, max_tokens=40))
    reply = chat.say("Tell me about the sea")
    pieces = []
    with pytest.raises(KeyboardInterrupt):
        for p in reply:
            pieces.append(p)
    assert reply.committed and chat.messages[-1]["content"] == "".join(pieces).lstrip()
    check_consistent(chat, model, tok)
    # Ctrl-C while the prompt is processed: the turn is dropped, nothing changes
    before = (chat.tokens, chat.messages)
    spy.interrupt_at = len(spy.calls) + 1
    reply = chat.say("Another question")
    with pytest.raises(KeyboardInterrupt):
        list(reply)
    assert not reply.committed and (chat.tokens, chat.messages) == before


def test_length_limit_closes_the_turn(model, tok):
    chat = ChatSession(model, tok, SamplingParams(greedy=True, max_tokens=6))
    reply = chat.say("Hi")
    text = "".join(reply)
    assert reply.result.finish_reason == "length" and chat.messages[-1]["content"] == text
    assert tok.decode(chat.tokens).endswith(text + "\n\n")
    check_consistent(chat, model, tok)


def test_regenerate(model, tok):
    spy = Spy(model)
    chat = ChatSession(spy, tok, PARAMS)
    with pytest.raises(ChatError, match="no reply"):
        chat.regenerate()
    first = "".join(chat.say("Hello there"))
    before_reply = len(tok.encode(render_user("Hello there")))
    spy.calls.clear()
    reply = chat.regenerate()
    again = "".join(reply)
    assert spy.calls[0] == 1  # started from the state before the reply: no prompt work
    assert again != first  # seed + 1
    assert len(chat.messages) == 2 and chat.messages[1]["content"] == again
    assert chat.tokens[:before_reply] == tok.encode(render_user("Hello there"))
    check_consistent(chat, model, tok)
    third = "".join(chat.regenerate())
    assert third != again and len(chat.messages) == 2
    check_consistent(chat, model, tok)


def test_close_reply_replaces_tokens_past_the_shown_text(model, tok):
    """Tokens generated past what was shown (here: the first byte of an unfinished character)
    are replaced by the blank line; the state is recomputed from the state before the reply."""
    chat = ChatSession(model, tok, PARAMS)
    _, pre = model.forward(tok.encode(render_user("Hi")))
    gen = tok.encode(" ok") + [0xE2]
    _, gen_state = model.forward(gen, pre)
    tokens, state = chat._close_reply(pre, gen, gen_state, " ok")
    assert tokens == tok.encode(" ok\n\n")
    ref_logits, _ = model.forward(tokens, pre)
    assert torch.allclose(state.last_logits, ref_logits, atol=1e-4)
    # all generated tokens fit: only the missing part of the blank line is added
    gen = tok.encode(" ok\n")
    _, gen_state = model.forward(gen, pre)
    tokens, state = chat._close_reply(pre, gen, gen_state, " ok")
    assert tokens == tok.encode(" ok\n\n") and state.n_tokens == pre.n_tokens + 5


def test_save_load(model, tok, tmp_path):
    chat = ChatSession(model, tok, PARAMS, system="Be brief.")
    "".join(chat.say("Hello there"))
    path = tmp_path / "conv.state"
    chat.save(path)
    # one file: a state file (generate --state reads it) holding the transcript
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv.state"]
    st = rwkvpy.State.load(path, model)
    assert st.n_tokens == len(chat.tokens)
    assert torch.equal(st.wkv, chat.state.wkv)
    cont = "".join(chat.say("And you?"))
    regen = "".join(chat.regenerate())

    spy = Spy(model)
    other = ChatSession(spy, tok, PARAMS)
    other.load(path)
    assert other.system == "Be brief." and len(other.messages) == 2
    assert "".join(other.say("And you?")) == cont
    assert spy.calls[0] == len(tok.encode(render_user("And you?")))
    assert "".join(other.regenerate()) == regen
    check_consistent(other, model, tok)

    # another model's state is refused
    v4 = rwkvpy.load(fixture_path("rwkv-cpp-tiny", "tiny-rwkv-4v0-660K-FP32.bin"), threads=1)
    with pytest.raises((ChatError, StateError)):
        ChatSession(v4, tok, PARAMS).load(path)
    # a plain state file is not a chat
    st.save(tmp_path / "plain.state")
    with pytest.raises(ChatError, match="without a chat transcript"):
        other.load(tmp_path / "plain.state")
    with pytest.raises(ChatError, match="cannot read"):
        other.load(tmp_path / "missing.state")
    # a transcript field of the wrong type is a ChatError naming the file
    for bad in ({"tokens": "abc"}, {"last_turn": 5}, {"system": 3}, {"version": 7}):
        doc = {**chat_doc(other), **bad}
        st.save(tmp_path / "bad.state", extra={"chat": doc})
        with pytest.raises(ChatError, match=re.escape(str(tmp_path / "bad.state"))):
            other.load(tmp_path / "bad.state")


def chat_doc(session) -> dict:
    """The transcript of ``session`` as save() writes it (version 2)."""
    return {
        "format": "rwkvpy-chat",
        "version": 2,
        "model_fingerprint": session.model.fingerprint,
        "tokenizer": session.tokenizer.name,
        "system": session.system,
        "messages": session.messages,
        "tokens": session.tokens,
        "last_turn": None,
    }


def legacy_save(session, path) -> None:
    """The older two-file layout: a state file and PATH.chat.json recording its SHA-256."""
    import hashlib
    import json

    session.state.save(path)
    doc = {**chat_doc(session), "version": 1}
    doc["state_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (path.parent / (path.name + ".chat.json")).write_text(json.dumps(doc))


def test_load_older_two_file_saves(model, tok, tmp_path):
    chat = ChatSession(model, tok, PARAMS, system="Be brief.")
    "".join(chat.say("Hello there"))
    path, side = tmp_path / "old.state", tmp_path / "old.state.chat.json"
    legacy_save(chat, path)
    other = ChatSession(model, tok, PARAMS)
    other.load(path)
    assert other.messages == chat.messages and other.tokens == chat.tokens
    check_consistent(other, model, tok)
    # a transcript that does not go with the state is refused
    good = side.read_bytes()
    "".join(other.say("More"))
    legacy_save(other, tmp_path / "later.state")
    side.write_bytes((tmp_path / "later.state.chat.json").read_bytes())
    with pytest.raises(ChatError, match="does not match"):
        other.load(path)
    side.write_text("{not json")
    with pytest.raises(ChatError, match="not an rwkvpy chat"):
        other.load(path)
    # saving over an older save leaves one file, the stale transcript removed
    side.write_bytes(good)
    other.load(path)
    other.save(path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("old")) == ["old.state"]
    again = ChatSession(model, tok, PARAMS)
    again.load(path)
    assert again.messages == chat.messages


def test_save_before_any_turn(model, tok, tmp_path):
    chat = ChatSession(model, tok, PARAMS)
    chat.save(tmp_path / "empty")
    other = ChatSession(model, tok, PARAMS, system="ignored")
    other.load(tmp_path / "empty")
    assert other.tokens == [] and other.messages == [] and other.system is None


def test_empty_message(model, tok):
    with pytest.raises(ChatError, match="empty"):
        ChatSession(model, tok, PARAMS).say(" \n\n ")


def test_a_new_turn_settles_the_open_reply(model, tok):
    chat = ChatSession(model, tok, PARAMS)
    chat.say("never read")  # not iterated: dropped when the next turn starts
    started = chat.say("Hello")
    shown = next(started)
    "".join(chat.say("Next"))  # the started reply is committed as far as it got
    assert [m["content"] for m in chat.messages[:2]] == ["Hello", shown.lstrip()]
    assert len(chat.messages) == 4
    check_consistent(chat, model, tok)
