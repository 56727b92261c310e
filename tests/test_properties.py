"""Property tests (issue 23, docs/reliability.md) of the promises rwkvpy makes, with Hypothesis:
tokenizers round-trip any text and any bytes, a streaming decode never splits a character, a
token sequence fed in any split gives the same logits and state, any SamplingParams is either
accepted (and the same seed gives the same tokens) or refused with a typed error, and a state
survives save and load exactly. Examples are bounded and derandomized (the same every run).
"""

from __future__ import annotations

import math
import unicodedata

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rwkvpy
from rwkvpy import SamplingParams, State, errors
from rwkvpy.tokenizers import (
    ByteTokenizer,
    NeoXTokenizer,
    StreamDecoder,
    TokenizerError,
    WorldTokenizer,
)

pytestmark = pytest.mark.fast  # the fast tier: needs only the package (pyproject's markers)

FAST = settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
MODEL = settings(FAST, max_examples=6)


@pytest.fixture(scope="module")
def demo():
    return rwkvpy.load("demo")


_TOKENIZERS = {}


def tokenizer(kind):
    if kind not in _TOKENIZERS:
        _TOKENIZERS[kind] = {
            "bytes": ByteTokenizer,
            "world": WorldTokenizer,
            "neox": NeoXTokenizer,
        }[kind]()
    return _TOKENIZERS[kind]


KINDS = ["bytes", "world", "neox"]
# any code point but the surrogates; a few scripts and emoji weighted in
TEXT = st.text(
    st.one_of(
        st.characters(exclude_categories=["Cs"]), st.sampled_from("aé你好😀\u0301\n \t\x00\ufffd")
    ),
    max_size=40,
)


def _normal(kind, text):
    # the 20B tokenizer.json normalizes to NFC (its "normalizer"); the others keep every byte
    return unicodedata.normalize("NFC", text) if kind == "neox" else text


# -- tokenizers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@FAST
@given(text=TEXT)
def test_encode_decode_round_trips(kind, text):
    tok = tokenizer(kind)
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == _normal(kind, text)
    assert tok.decode_bytes(ids) == _normal(kind, text).encode("utf-8")


@pytest.mark.parametrize("kind", KINDS)
@FAST
@given(before=TEXT, surrogate=st.integers(0xD800, 0xDFFF), after=TEXT)
def test_lone_surrogates_are_a_typed_error(kind, before, surrogate, after):
    text = before + chr(surrogate) + after
    with pytest.raises(TokenizerError, match=f"position {len(before)}"):
        tokenizer(kind).encode(text)


@pytest.mark.parametrize("kind", ["bytes", "world"])
@FAST
@given(data=st.binary(max_size=64))
def test_any_bytes_round_trip(kind, data):
    """Byte-level vocabularies encode any bytes, valid UTF-8 or not, and decode them back."""
    tok = tokenizer(kind)
    ids = list(data) if kind == "bytes" else tok.encode_bytes(data)
    assert tok.decode_bytes(ids) == data
    assert tok.decode(ids) == data.decode("utf-8", errors="replace")


@pytest.mark.parametrize("kind", KINDS)
@FAST
@given(data=st.data())
def test_decoding_any_ids_never_raises(kind, data):
    tok = tokenizer(kind)
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=30))
    text = tok.decode(ids)
    assert text == tok.decode_bytes(ids).decode("utf-8", errors="replace") or kind == "neox"
    with pytest.raises(TokenizerError):
        tok.decode(ids + [data.draw(st.sampled_from([-1, tok.vocab_size, 2**70]))])


@pytest.mark.parametrize("kind", KINDS)
@FAST
@given(text=TEXT, data=st.data())
def test_stream_decode_never_splits_a_character(kind, text, data):
    tok = tokenizer(kind)
    ids = tok.encode(text)
    dec = StreamDecoder(tok)
    pieces, i = [], 0
    while i < len(ids):
        n = data.draw(st.integers(1, 4))
        pieces.append(dec.feed(ids[i : i + n]))
        i += n
    pieces.append(dec.flush())
    assert "".join(pieces) == _normal(kind, text)
    if "\ufffd" not in text:
        assert not any("\ufffd" in p for p in pieces)  # no piece ends inside a character


@FAST
@given(data=st.binary(max_size=40), cuts=st.lists(st.integers(0, 40), max_size=6))
def test_stream_decode_of_invalid_bytes_matches_decode(data, cuts):
    tok = tokenizer("bytes")
    dec = StreamDecoder(tok)
    bounds = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    out = "".join(dec.feed(list(data[a:b])) for a, b in zip(bounds, bounds[1:])) + dec.flush()
    assert out == tok.decode(list(data))


# -- splits of a sequence --------------------------------------------------------------------------

TOKENS = st.lists(st.integers(0, 255), min_size=1, max_size=24)


def _split(tokens, cuts):
    bounds = sorted({c % len(tokens) for c in cuts} - {0})
    return [tokens[a:b] for a, b in zip([0] + bounds, bounds + [len(tokens)])]


def _run(model, chunks):
    state = None
    for c in chunks:
        lg, state = model.forward(c, state)
    return lg, state


@pytest.fixture(scope="module")
def float_models():
    """A float16 v7 model (the fuzz corpus's base) in mode fast and in mode reference."""
    from conftest import ROOT

    path = ROOT / "tests" / "fuzz_corpus" / "_context" / "base.pth"
    return rwkvpy.load(path, cache=False), rwkvpy.load(path, mode="reference")


@MODEL
@given(tokens=TOKENS, cuts=st.lists(st.integers(1, 23), max_size=5))
def test_any_split_gives_the_same_logits_and_state(float_models, tokens, cuts):
    """docs/accuracy.md: for float files mode fast is within 1e-4 (max abs of the logits) of
    mode reference, the sequence in one call or in any split."""
    fast, ref = float_models
    want, want_state = _run(ref, [tokens])
    for chunks in ([tokens], _split(tokens, cuts), [[t] for t in tokens]):
        lg, state = _run(fast, chunks)
        assert (lg - want).abs().max().item() <= 1e-4, chunks
        assert state.n_tokens == len(tokens)
        for a, b in (
            (state.att_x, want_state.att_x),
            (state.ffn_x, want_state.ffn_x),
            (state.wkv, want_state.wkv),
        ):
            assert (a - b).abs().max().item() <= 1e-4, chunks


# -- sampling parameters ------------------------------------------------------------------------------

ODD = st.sampled_from(
    [
        math.nan,
        math.inf,
        -math.inf,
        -1,
        -1e-300,
        0,
        1e-300,
        1,
        2,
        1e300,
        2**70,
        -(2**70),
        True,
        "1",
        None,
    ]
)


def _maybe(good):
    return st.one_of(good, ODD)


PARAMS = st.fixed_dictionaries(
    {},
    optional={
        "temperature": _maybe(st.floats(0, 3)),
        "top_p": _maybe(st.floats(0, 1)),
        "top_k": _maybe(st.integers(0, 300)),
        "min_p": _maybe(st.floats(0, 1)),
        "presence_penalty": _maybe(st.floats(-2, 2)),
        "frequency_penalty": _maybe(st.floats(-2, 2)),
        "penalty_decay": _maybe(st.floats(0, 1)),
        "logit_bias": st.one_of(
            st.dictionaries(_maybe(st.integers(0, 255)), _maybe(st.floats(-100, 100)), max_size=3),
            ODD,
        ),
        "banned_tokens": st.one_of(st.lists(_maybe(st.integers(0, 300)), max_size=3), ODD),
        "stop_tokens": st.one_of(st.lists(_maybe(st.integers(0, 300)), max_size=3), ODD),
        "stop": st.one_of(st.lists(st.text(max_size=3), max_size=2), ODD),
        "max_tokens": _maybe(st.integers(0, 4)),
        "seed": _maybe(st.integers(0, 2**64)),
        "greedy": _maybe(st.booleans()),
        "logprobs": _maybe(st.integers(0, 5)),
    },
)


@settings(FAST, max_examples=30)
@given(kw=PARAMS)
def test_any_sampling_params_are_used_or_refused(demo, kw):
    tok = ByteTokenizer()
    try:
        params = SamplingParams(**kw)
    except errors.RwkvpyError:
        return
    if params.max_tokens > 4:  # huge limits are accepted; a run here stays short
        import dataclasses

        params = dataclasses.replace(params, max_tokens=4)
    from rwkvpy.generate import generate

    try:
        first = generate(demo, tok, "Hi", params)
    except errors.RwkvpyError:
        return
    assert len(first.tokens) <= params.max_tokens
    if params.seed is not None or params.is_greedy:
        again = generate(demo, tok, "Hi", params)
        assert again.tokens == first.tokens and again.text == first.text


# -- states ---------------------------------------------------------------------------------------------


@MODEL
@given(tokens=TOKENS, data=st.data())
def test_state_save_load_round_trips_exactly(demo, tmp_path_factory, tokens, data):
    _, state = demo.forward(tokens)
    scale = data.draw(st.sampled_from([1.0, 1e-30, 1e30, -3.5]))
    state = State(
        state.version,
        state.att_x * scale,
        state.ffn_x,
        state.wkv * scale,
        state.n_tokens,
        state.model_fingerprint,
        state.last_logits,
    )
    path = tmp_path_factory.mktemp("s") / "x.state"
    state.save(path)
    back = State.load(path, demo)
    for name in ("att_x", "ffn_x", "wkv", "last_logits"):
        a, b = getattr(state, name), getattr(back, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert (back.n_tokens, back.model_fingerprint, back.version) == (
        state.n_tokens,
        state.model_fingerprint,
        state.version,
    )
    torch.testing.assert_close(
        demo.forward([5], back)[0], demo.forward([5], state)[0], rtol=0, atol=0, equal_nan=True
    )  # 1e30 states overflow to NaN
