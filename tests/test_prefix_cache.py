"""PrefixCache: longest-prefix lookup, LRU eviction under a byte bound, roots, threads; and
generate/stream starting from cached prefixes (tiny trained RWKV v7 byte model)."""

import random
import threading

import pytest
import torch
from conftest import TINY_V7, Spy, fixture_path

import rwkvpy
from rwkvpy.generate import generate, stream
from rwkvpy.prefix_cache import PrefixCache, PrefixCacheError, cache_root, state_nbytes
from rwkvpy.sampling import SamplingParams
from rwkvpy.state import State
from rwkvpy.tokenizers import ByteTokenizer


def fake_state(tag: float = 0.0, size: int = 16):
    """A small State (v7 layout is not checked by the cache): 3 tensors of ``size`` floats."""
    z = torch.full((1, size), float(tag))
    return State(
        rwkvpy.Version.V7,
        z,
        z.clone(),
        z.clone().view(1, 1, 1, size),
        0,
        "",
        torch.full((4,), float(tag)),
    )


ONE = state_nbytes(fake_state())  # 3 * 64 + 16 = 208 bytes


# -- the data structure ----------------------------------------------------------------------
def test_longest_prefix():
    c = PrefixCache(max_bytes=1 << 20, every=0)
    a, b, d = fake_state(1), fake_state(2), fake_state(3)
    assert c.insert([1, 2, 3], a) and c.insert([1, 2, 3, 4, 5], b) and c.insert([1, 2, 9], d)
    assert c.lookup([7]) == (0, None, None)
    assert c.lookup([1, 2]) == (0, None, None)  # no state stored at [1, 2]
    n, s, logits = c.lookup([1, 2, 3, 4])
    assert (n, s) == (3, a) and logits is a.last_logits  # stored objects, not copies
    assert c.lookup([1, 2, 3, 4, 5, 6])[:2] == (5, b)
    assert c.lookup([1, 2, 3, 4, 5])[:2] == (5, b)
    assert c.lookup([1, 2, 9, 9])[:2] == (3, d)
    assert c.lookup(torch.tensor([1, 2, 3]))[:2] == (3, a)
    # replacing the state of a key
    e = fake_state(4)
    c.insert([1, 2, 3], e)
    assert c.lookup([1, 2, 3])[1] is e and len(c) == 3
    assert c.hits == 6 and c.misses == 2


def test_roots_are_separate():
    c = PrefixCache(max_bytes=1 << 20, every=0)
    a, b = fake_state(1), fake_state(2)
    c.insert([1, 2, 3], a, root="model A")
    c.insert([1, 2], b, root="model B")
    assert c.lookup([1, 2, 3]) == (0, None, None)
    assert c.lookup([1, 2, 3], root="model A")[:2] == (3, a)
    assert c.lookup([1, 2, 3], root="model B")[:2] == (2, b)


def test_lru_order_and_bound():
    key_bytes = 8 * 3
    c = PrefixCache(max_bytes=2 * (ONE + key_bytes), every=0)
    a, b, d = fake_state(1), fake_state(2), fake_state(3)
    c.insert([1, 2, 3], a)
    c.insert([4, 5, 6], b)
    assert len(c) == 2 and c.nbytes == 2 * (ONE + key_bytes)
    c.lookup([1, 2, 3, 7])  # a is now the most recently used
    c.insert([7, 8, 9], d)  # evicts b, the least recently used
    assert c.lookup([4, 5, 6]) == (0, None, None)
    assert c.lookup([1, 2, 3])[1] is a and c.lookup([7, 8, 9])[1] is d
    assert c.keys() == [[1, 2, 3], [7, 8, 9]] and c.evictions == 1
    assert c.nbytes <= c.max_bytes
    # a state larger than the whole budget is not stored (and evicts nothing)
    assert c.insert([5], fake_state(5, size=1000)) is False
    assert len(c) == 2


def test_eviction_keeps_memory_under_the_bound():
    rng = random.Random(0)
    c = PrefixCache(max_bytes=10 * ONE, every=0)
    for i in range(400):
        toks = [rng.randrange(4) for _ in range(rng.randrange(1, 12))]
        if rng.random() < 0.7:
            c.insert(toks, fake_state(i))
        else:
            c.lookup(toks)
        assert c.nbytes <= c.max_bytes
    assert 0 < len(c) < 10 and c.evictions > 0
    # the trie's key accounting matches what it holds after all the splits and merges
    keys = c.keys()
    assert all(c.lookup(k)[0] == len(k) for k in keys)
    c.clear()
    assert (len(c), c.nbytes) == (0, 0)


def test_removal_prunes_the_trie():
    c = PrefixCache(max_bytes=1 << 20, every=0)
    c.insert([1, 2, 3, 4], fake_state(1))
    c.insert([1, 2, 5, 6], fake_state(2))
    c.insert([1, 2], fake_state(3))
    assert c._key_tokens == 6  # [1 2] + [3 4] + [5 6]
    assert c.discard([1, 2]) and not c.discard([1, 2]) and not c.discard([1])
    assert c.discard([1, 2, 3, 4])
    assert c._key_tokens == 4 and c.keys() == [[1, 2, 5, 6]]  # merged back into one edge
    assert c.discard([1, 2, 5, 6]) and c._key_tokens == 0 and not c._roots


def test_checkpoint_positions():
    c = PrefixCache(max_bytes=1000, every=8)
    assert c.checkpoints(0, 20) == [8, 16]
    assert c.checkpoints(8, 17) == [16]
    assert c.checkpoints(5, 8) == []
    assert PrefixCache(max_bytes=1000, every=0).checkpoints(0, 100) == []


def test_bad_arguments():
    with pytest.raises(PrefixCacheError):
        PrefixCache(max_bytes=0)
    with pytest.raises(PrefixCacheError):
        PrefixCache(every=-1)
    c = PrefixCache()
    with pytest.raises(PrefixCacheError, match="empty"):
        c.insert([], fake_state())
    with pytest.raises(PrefixCacheError, match="token ids"):
        c.lookup("abc")
    with pytest.raises(PrefixCacheError, match="State"):
        c.insert([1], None)


def test_threads():
    c = PrefixCache(max_bytes=20 * ONE, every=0)
    errors = []

    def work(seed):
        rng = random.Random(seed)
        try:
            for i in range(300):
                toks = [rng.randrange(3) for _ in range(rng.randrange(1, 10))]
                if i % 2:
                    c.insert(toks, fake_state(i))
                else:
                    n, s, _ = c.lookup(toks)
                    assert (n == 0) == (s is None) and n <= len(toks)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and c.nbytes <= c.max_bytes
    assert all(c.lookup(k)[0] == len(k) for k in c.keys())


# -- with generate ---------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return rwkvpy.load(fixture_path(*TINY_V7), threads=1)


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


PARAMS = SamplingParams(seed=11, temperature=0.8, top_k=20, max_tokens=10)


def test_second_turn_processes_only_new_tokens(model, tok):
    spy = Spy(model)
    cache = PrefixCache(max_bytes=1 << 24, every=0)
    p1 = tok.encode("User: Tell me a story.\n\nAssistant:")
    r1 = generate(spy, tok, p1, PARAMS, cache=cache)
    assert spy.calls[0] == len(p1) and r1.cached_tokens == 0
    new = tok.encode("\n\nUser: And then?\n\nAssistant:")
    p2 = p1 + r1.tokens + new
    spy.calls.clear()
    s = stream(spy, tok, p2, PARAMS, cache=cache)
    warm_pieces = list(s)
    warm = s.result
    assert spy.calls == [len(new)] + [1] * len(warm.tokens)
    assert warm.cached_tokens == len(p1) + len(r1.tokens) and warm.prompt_tokens == len(p2)
    assert warm.timings.prompt_tokens == len(new)
    cold = generate(model, tok, p2, PARAMS)  # no cache: the whole prompt in one call
    assert (warm.text, warm.tokens) == (cold.text, cold.tokens)
    assert "".join(warm_pieces) == cold.text
    # the state after prompt + reply was stored; so was the state after the prompt
    assert cache.lookup(p2 + warm.tokens, root=cache_root(model))[0] == len(p2) + len(warm.tokens)
    assert cache.lookup(p2, root=cache_root(model))[0] == len(p2)


def test_whole_prompt_cached_runs_no_prompt_forward(model, tok):
    spy = Spy(model)
    cache = PrefixCache(max_bytes=1 << 24, every=0)
    p = tok.encode("Once upon a time")
    first = generate(spy, tok, p, PARAMS, cache=cache)
    spy.calls.clear()
    again = generate(spy, tok, p, PARAMS, cache=cache)
    assert spy.calls == [1] * len(again.tokens)  # the stored logits were used
    assert (again.text, again.cached_tokens) == (first.text, len(p))


def test_checkpoints_share_a_common_beginning(model, tok):
    spy = Spy(model)
    cache = PrefixCache(max_bytes=1 << 24, every=8)
    a = tok.encode("System: be brief.\n\nUser: hi")  # 27 tokens
    generate(spy, tok, a, SamplingParams(greedy=True, max_tokens=2), cache=cache)
    assert spy.calls[:4] == [8, 8, 8, 3]  # checkpoints at 8, 16, 24, then the prompt's end
    b = tok.encode("System: be brief.\n\nUser: hello there")
    spy.calls.clear()
    r = generate(spy, tok, b, SamplingParams(greedy=True, max_tokens=4), cache=cache)
    assert r.cached_tokens == 24 and spy.calls[:2] == [8, len(b) - 32]  # and a checkpoint at 32
    cold = generate(model, tok, b, SamplingParams(greedy=True, max_tokens=4))
    assert r.tokens == cold.tokens


def test_start_state_is_part_of_the_key(model, tok):
    cache = PrefixCache(max_bytes=1 << 24, every=0)
    p = tok.encode("The cat")
    generate(model, tok, p, SamplingParams(greedy=True, max_tokens=2), cache=cache)
    _, other = model.forward(tok.encode("Dogs."))
    spy = Spy(model)
    r = generate(spy, tok, p, SamplingParams(greedy=True, max_tokens=2), state=other, cache=cache)
    assert spy.calls[0] == len(p) and r.cached_tokens == 0
    ref = generate(model, tok, p, SamplingParams(greedy=True, max_tokens=2), state=other)
    assert r.tokens == ref.tokens
