"""generate() and stream() on the tiny trained RWKV v7 byte model (vocab 256, token = byte)."""

import pytest
import torch
from conftest import TINY_V7, fixture_path

import rwkvpy
from rwkvpy.generate import GenerationError, GenerationResult, generate, stream
from rwkvpy.generation import held_back as _held_back
from rwkvpy.sampling import SamplingParams
from rwkvpy.tokenizers import ByteTokenizer, TokenizerError

PROMPT = "In the beginning"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return rwkvpy.load(fixture_path(*TINY_V7))


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


@pytest.fixture(scope="module")
def greedy_run(model, tok):
    """Greedy continuation of PROMPT, computed token by token with plain forward calls."""
    state = None
    for t in tok.encode(PROMPT):
        logits, state = model.forward([t], state)
    tokens = []
    for _ in range(40):
        t = int(torch.argmax(logits))
        tokens.append(t)
        logits, state = model.forward([t], state)
    return tokens, tok.decode(tokens)


class Spy:
    """A model that records the length of every forward call."""

    def __init__(self, model):
        self.model, self.config, self.calls = model, model.config, []

    def forward(self, tokens, state=None, all_logits=False):
        self.calls.append(len(tokens))
        return self.model.forward(tokens, state, all_logits=all_logits)


def test_greedy_equals_step_by_step_argmax(model, tok, greedy_run):
    tokens, text = greedy_run
    r = generate(model, tok, PROMPT, SamplingParams(greedy=True, max_tokens=40))
    assert isinstance(r, GenerationResult)
    assert r.tokens == tokens and r.text == text
    assert (r.finish_reason, r.prompt_tokens, r.completion_tokens) == ("length", 16, 40)
    assert r.timings.prompt_seconds > 0 and r.timings.tokens_per_second > 0
    r = generate(model, tok, PROMPT, SamplingParams(temperature=0, top_p=0.5, max_tokens=10))
    assert r.tokens == tokens[:10]


def test_prompt_in_one_forward_call(model, tok):
    spy = Spy(model)
    r = generate(spy, tok, PROMPT, SamplingParams(seed=1, max_tokens=5))
    assert spy.calls == [len(PROMPT)] + [1] * 5
    assert r.completion_tokens == 5


def test_same_seed_same_text(model, tok):
    params = SamplingParams(seed=1234, temperature=0.9, top_p=0.9, max_tokens=30)
    a = generate(model, tok, PROMPT, params)
    b = generate(model, tok, PROMPT, params)
    assert (a.text, a.tokens) == (b.text, b.tokens) and a.seed == b.seed == 1234
    c = generate(
        model, tok, PROMPT, SamplingParams(seed=4321, temperature=0.9, top_p=0.9, max_tokens=30)
    )
    assert c.tokens != a.tokens
    s = stream(model, tok, PROMPT, params)
    assert "".join(s) == a.text and s.result.tokens == a.tokens


def test_unseeded_run_reports_its_seed(model, tok):
    r = generate(model, tok, PROMPT, SamplingParams(max_tokens=10, temperature=1.5))
    again = generate(
        model, tok, PROMPT, SamplingParams(max_tokens=10, temperature=1.5, seed=r.seed)
    )
    assert again.tokens == r.tokens


def test_max_tokens(model, tok):
    r = generate(model, tok, PROMPT, SamplingParams(seed=3, max_tokens=7))
    assert len(r.tokens) == r.completion_tokens == 7 and r.finish_reason == "length"
    r = generate(model, tok, PROMPT, SamplingParams(max_tokens=0))
    assert (r.text, r.tokens, r.finish_reason, r.completion_tokens) == ("", [], "length", 0)


def test_stop_string_never_emitted(model, tok, greedy_run):
    _, text = greedy_run
    stop = text[6:9]
    at = text.find(stop)
    s = stream(model, tok, PROMPT, SamplingParams(greedy=True, max_tokens=40, stop=["zzz", stop]))
    pieces = list(s)
    r = s.result
    assert r.text == "".join(pieces) == text[:at]
    assert (r.finish_reason, r.stop) == ("stop", stop)
    assert all(stop not in p for p in pieces)
    # the tokens up to the one that completed the stop string were generated and consumed
    assert r.tokens == tok.encode(text[: at + len(stop)])


def test_text_that_might_start_a_stop_string_is_held_then_released(model, tok, greedy_run):
    _, text = greedy_run
    stop = text[-2:] + "\x00"  # its first two characters end the output: held back until the end
    s = stream(model, tok, PROMPT, SamplingParams(greedy=True, max_tokens=40, stop=stop))
    pieces = list(s)
    assert "".join(pieces) == s.result.text == text and s.result.finish_reason == "length"
    assert pieces[-1].endswith(text[-2:])


def test_held_back():
    assert _held_back("hello wor", ["world"]) == 3
    assert _held_back("hello", ["world"]) == 0
    assert _held_back("ab", ["abc", "b"]) == 2
    assert _held_back("xa", ["aaa", "ab"]) == 1
    assert _held_back("", ["ab"]) == 0


def test_stop_token(model, tok, greedy_run):
    tokens, text = greedy_run
    stop_id = tokens[5]
    first = tokens.index(stop_id)
    r = generate(
        model, tok, PROMPT, SamplingParams(greedy=True, max_tokens=40, stop_tokens=[stop_id])
    )
    assert r.tokens == tokens[:first] and r.text == tok.decode(tokens[:first])
    assert (r.finish_reason, r.stop, r.completion_tokens) == ("stop", stop_id, first + 1)


def test_final_state_has_seen_prompt_and_tokens(model, tok):
    r = generate(model, tok, PROMPT, SamplingParams(seed=9, max_tokens=12))
    nxt = tok.encode(" and")
    cont, _ = model.forward(nxt, r.state)
    whole, _ = model.forward(tok.encode(PROMPT) + r.tokens + nxt, None)
    assert torch.allclose(cont, whole, atol=1e-4)
    # generation can continue from a state
    r2 = generate(model, tok, " and", SamplingParams(greedy=True, max_tokens=5), state=r.state)
    ref = generate(
        model, tok, tok.encode(PROMPT) + r.tokens + nxt, SamplingParams(greedy=True, max_tokens=5)
    )
    assert r2.tokens == ref.tokens


def test_presence_penalty_prevents_repeats(model, tok):
    r = generate(
        model,
        tok,
        PROMPT,
        SamplingParams(greedy=True, max_tokens=20, presence_penalty=100.0, penalty_decay=1.0),
    )
    assert len(set(r.tokens)) == len(r.tokens) == 20
    plain = generate(model, tok, PROMPT, SamplingParams(greedy=True, max_tokens=20))
    assert len(set(plain.tokens)) < 20


def test_stream_is_utf8_safe(model, tok):
    """Random bytes from a hot sampler: pieces are whole characters (or U+FFFD) and add up to
    decoding all tokens at once."""
    s = stream(model, tok, PROMPT, SamplingParams(seed=0, temperature=3.0, max_tokens=60))
    pieces = list(s)
    assert "".join(pieces) == tok.decode(s.result.tokens) == s.result.text
    assert all(p for p in pieces)


def test_bad_arguments(model, tok):
    with pytest.raises(GenerationError, match="empty"):
        generate(model, tok, "", SamplingParams())
    with pytest.raises(GenerationError, match="SamplingParams"):
        generate(model, tok, PROMPT, {"temperature": 1.0})
    with pytest.raises(GenerationError, match="stop token"):
        generate(model, tok, PROMPT, SamplingParams(stop_tokens=[300]))

    class Big(ByteTokenizer):
        vocab_size = 1000
        name = "big"

    with pytest.raises(TokenizerError, match=r"1000.*256"):
        generate(model, Big(), PROMPT)


def test_model_generate_and_stream_methods():
    """The Model's own text methods: tokenizer from the file, same text as generate()."""
    from conftest import fixture_path

    import rwkvpy
    from rwkvpy.generate import generate
    from rwkvpy.sampling import SamplingParams
    from rwkvpy.tokenizers import ByteTokenizer, TokenizerError

    model = rwkvpy.load(fixture_path(*TINY_V7), threads=1)
    assert isinstance(model.tokenizer(), ByteTokenizer)
    params = SamplingParams(max_tokens=12, seed=7)
    text = model.generate("The quick", params)
    assert text == generate(model, ByteTokenizer(), "The quick", params).text
    assert "".join(model.stream("The quick", params)) == text
    with pytest.raises(TokenizerError, match="does not fit a model with vocab size 256"):
        model.tokenizer("world")


def test_tokenizer_named_by_the_file_wins(tmp_path):
    from conftest import fixture_path

    import rwkvpy
    from rwkvpy.convert import convert
    from rwkvpy.tokenizers import TokenizerError

    dst = tmp_path / "m.gguf"
    convert(
        fixture_path(*TINY_V7),
        dst,
        type="f16",
        progress=False,
    )
    model = rwkvpy.load(dst, threads=1)
    assert model.info.file_meta["tokenizer"] == "bytes"
    with pytest.raises(TokenizerError, match="names the bytes tokenizer, not neox"):
        model.tokenizer("neox")


def test_logprobs_follow_the_text_and_the_model(model, tok, greedy_run):
    """TokenLoop's log probabilities: the model's log_softmax at each chosen token (greedy, no
    bias), top-N sorted with the chosen one first, offsets into the text, and the tokens inside
    a stop string left out with it."""
    tokens, text = greedy_run
    stop = text[10:13]
    at = text.find(stop)
    r = generate(
        model, tok, PROMPT, SamplingParams(greedy=True, max_tokens=40, stop=stop, logprobs=3)
    )
    assert r.text == text[:at]
    ids = tok.encode(PROMPT) + tokens
    logits, _ = model.forward(ids, all_logits=True)
    ref = torch.log_softmax(logits, dim=-1)
    n = len(tok.encode(PROMPT))
    assert [e.token for e in r.logprobs] == tokens[:at]  # byte model: one token a character
    assert [e.offset for e in r.logprobs] == list(range(at))
    for i, e in enumerate(r.logprobs):
        assert e.logprob == pytest.approx(float(ref[n - 1 + i, e.token]), abs=1e-4)
        assert len(e.top) == 3 and e.top[0][0] == e.token
        assert [p for _, p in e.top] == sorted((p for _, p in e.top), reverse=True)
    assert generate(model, tok, PROMPT, SamplingParams(max_tokens=3)).logprobs is None


def test_logits_processor_hook(model, tok, greedy_run):
    """A LogitsProcessor masks each step's logits before the draw, is told each token taken,
    and ends the sequence with "stop" when it says it is finished."""
    from rwkvpy.processors import LogitsProcessor

    tokens, _ = greedy_run
    banned = tokens[0]

    class Ban(LogitsProcessor):
        def __init__(self):
            self.seen = []

        def __call__(self, logits):
            logits[banned] = -float("inf")
            return logits

        def accept(self, token):
            self.seen.append(token)

        def finished(self):
            return len(self.seen) == 5

    p = Ban()
    r = generate(
        model, tok, PROMPT, SamplingParams(greedy=True, max_tokens=20, logprobs=0), processors=[p]
    )
    assert banned not in r.tokens and p.seen == r.tokens and len(r.tokens) == 5
    assert r.finish_reason == "stop" and r.tokens[0] != tokens[0]
    # the logprobs are those of the masked logits the token was drawn from
    logits, _ = model.forward(tok.encode(PROMPT))
    masked = logits.clone()
    masked[banned] = -float("inf")
    assert r.logprobs[0].logprob == pytest.approx(
        float(torch.log_softmax(masked, 0)[r.tokens[0]]), abs=1e-5
    )


def test_ids_beyond_the_tokenizer_are_never_drawn():
    """A head wider than the tokenizer's vocabulary (World models: 65536 logits, 65530 tokens):
    the ids it cannot decode are never drawn, greedy or sampled, even when they lead."""
    from rwkvpy.generation import TokenLoop

    logits = torch.zeros(300)
    logits[256:] = 20.0  # ids the byte tokenizer cannot decode, far ahead
    logits[65] = 5.0
    greedy = TokenLoop(ByteTokenizer(), SamplingParams(greedy=True, max_tokens=5))
    assert greedy.choose(logits) == 65
    loop = TokenLoop(ByteTokenizer(), SamplingParams(seed=1, max_tokens=200, logprobs=1))
    drawn = set()
    for _ in range(200):
        t = loop.choose(logits)
        assert 0 <= t < 256
        drawn.add(t)
        loop.accept(t)  # decodes it
    assert len(drawn) > 1  # sampled, not only the leader
