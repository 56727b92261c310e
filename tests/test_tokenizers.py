"""Tokenizers: World against BlinkDL's reference (rwkv 0.8.32), NeoX against the tokenizers
library, bytes, tokenizer_for, and streaming UTF-8-safe decoding."""

import random
import shutil
import unicodedata
from pathlib import Path

import pytest

from rwkvpy.errors import RwkvpyError
from rwkvpy.tokenizers import (
    ByteTokenizer,
    NeoXTokenizer,
    StreamDecoder,
    TokenizerError,
    WorldTokenizer,
    default_neox_path,
    default_world_vocab_path,
    tokenizer_for,
)
from rwkvpy.tokenizers import world as world_mod

# -- shared inputs -------------------------------------------------------------------------

pytestmark = pytest.mark.fast  # the fast tier: needs only the package (pyproject's markers)

ENGLISH = (
    "The quick brown fox jumps over the lazy dog. In the beginning, the model reads every "
    "byte of the prompt at once; afterwards it produces one token at a time, and the sampler "
    "decides which. Numbers like 3.14159, 2024-05-01 and 1,000,000 appear too, as do "
    "contractions (don't, it's, we'll) and \"quoted\" words.\n\n"
)
CHINESE = "我们今天去公园散步，天气非常好。人工智能正在改变世界：语言模型可以写诗、翻译和编程。\n"
JAPANESE_KOREAN = "東京は日本の首都です。ひらがなとカタカナ。한국어 문장도 있습니다.\n"
EMOJI = "Hi 👋🏽! Family: 👨‍👩‍👧‍👦, flags 🇫🇷🇯🇵, heart ❤️‍🔥, math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 😀😃😄\n"
CODE = '''def fib(n: int) -> int:
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

if __name__ == "__main__":
\tprint({k: fib(k) for k in range(10)})  # {0: 0, 1: 1, ...}
    x = [i ** 2 for i in range(100) if i % 3 == 0] ; y = "\\n\\t" + r"\\d+" + '\\x00'
'''
WHITESPACE = " " * 300 + "\t" * 20 + "\n" * 12 + "\r\n" + " \u3000 " + "#" * 100 + "-" * 90


def random_unicode(seed: int, n: int) -> str:
    rng = random.Random(seed)
    ranges = [
        (0x20, 0x7E),
        (0xA0, 0x2FFF),
        (0x3000, 0x9FFF),
        (0xAC00, 0xD7A3),
        (0xE000, 0xFFFD),
        (0x1F300, 0x1FAFF),
        (0x10000, 0x10FFFF),
        (0x0, 0x1F),
    ]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def random_bytes_text(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return bytes(rng.randrange(256) for _ in range(n)).decode("utf-8", errors="replace")


TEXTS = {
    "english": ENGLISH * 3,
    "chinese": CHINESE * 3,
    "japanese_korean": JAPANESE_KOREAN,
    "emoji": EMOJI,
    "code": CODE,
    "whitespace": WHITESPACE,
    "mixed": ENGLISH + CHINESE + EMOJI + CODE + JAPANESE_KOREAN,
    "random_unicode": random_unicode(1, 3000),
    "random_bytes": random_bytes_text(2, 4000),
    "single_chars": "a",
    "empty": "",
    "nul_and_controls": "\x00\x01\x02 \x7f\x1b[0m",
}


# -- World ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref_vocab():
    try:
        import rwkv
    except ImportError:
        pytest.fail(
            "the World tokenizer tests compare with BlinkDL's reference: pip install rwkv==0.8.32",
            pytrace=False,
        )
    p = Path(rwkv.__file__).resolve().parent / "rwkv_vocab_v20230424.txt"
    assert p.is_file(), p
    return p


@pytest.fixture(scope="module")
def ref(ref_vocab):
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    return TRIE_TOKENIZER(str(ref_vocab))


@pytest.fixture(scope="module")
def world(ref_vocab):
    return WorldTokenizer(ref_vocab)


def test_world_basics(world):
    assert world.name == "world"
    assert world.vocab_size == 65530  # ids 1..65529, 0 = end of text
    assert world.decode_bytes([0]) == b""
    assert world.encode("") == []


@pytest.mark.parametrize("name", list(TEXTS))
def test_world_encode_decode_match_reference(world, ref, name):
    text = TEXTS[name]
    ids = world.encode(text)
    assert ids == ref.encode(text)
    assert world.decode(ids) == text
    assert world.decode_bytes(ids) == ref.decodeBytes(ids) == text.encode("utf-8")
    if ids:
        assert world.decode(ids) == ref.decode(ids)


def test_world_random_texts_match_reference(world, ref):
    rng = random.Random(7)
    pool = list(TEXTS.values())
    for seed in range(40):
        parts = [rng.choice(pool)[rng.randrange(50) :][: rng.randrange(1, 400)] for _ in range(5)]
        parts.append(random_unicode(100 + seed, rng.randrange(1, 50)))
        text = "".join(rng.sample(parts, len(parts)))
        assert world.encode(text) == ref.encode(text), text


def test_world_very_long_text_matches_reference(world, ref):
    text = (ENGLISH * 200 + CHINESE * 100 + CODE * 50 + EMOJI * 50) * 2  # ~0.4 MB
    ids = world.encode(text)
    assert ids == ref.encode(text)
    assert world.decode(ids) == text


def test_world_raw_bytes_match_reference(world, ref):
    rng = random.Random(3)
    for n in (1, 2, 3, 17, 1000, 20000):
        data = bytes(rng.randrange(256) for _ in range(n))
        ids = world.encode_bytes(data)
        assert ids == ref.encodeBytes(data)
        assert world.decode_bytes(ids) == data


def test_world_every_token_decodes_as_reference(world, ref):
    ids = list(range(1, 65530))
    assert [world.decode_bytes([i]) for i in ids] == [ref.idx2token[i] for i in ids]
    rng = random.Random(5)
    seq = [rng.randrange(1, 65530) for _ in range(5000)]
    assert world.decode_bytes(seq) == ref.decodeBytes(seq)
    assert world.decode(seq) == ref.decodeBytes(seq).decode("utf-8", errors="replace")


def test_world_python_fallback_matches_kernel(world):
    data = (TEXTS["mixed"] + TEXTS["random_unicode"]).encode("utf-8")
    assert world._encode_python(data) == world.encode_bytes(data)


def test_world_decode_bad_ids(world):
    for bad in ([65530], [-1], [1, 2, 70000], ["a"], [1.5]):
        with pytest.raises(TokenizerError):
            world.decode(bad)
    with pytest.raises(TokenizerError, match="position 2"):
        world.decode([1, 2, 70000])


def test_world_encode_rejects_lone_surrogate(world):
    with pytest.raises(TokenizerError, match="surrogate"):
        world.encode("ab\ud800cd")


def test_world_vocab_shared_between_instances(ref_vocab, world):
    assert WorldTokenizer(ref_vocab)._trie is world._trie


@pytest.mark.parametrize(
    "line,match",
    [
        ("1 __import__('os').system('echo hacked') 1", "literal"),
        ("1 'ab' 3", "2 bytes"),
        ("1 123 3", "str or bytes"),
        ("x 'a' 1", "integers"),
        ("1'a'1", "expected"),
        ("1 '' 0", "empty"),
    ],
)
def test_world_vocab_malformed(tmp_path, line, match):
    p = tmp_path / "vocab.txt"
    p.write_text("2 'b' 1\n" + line + "\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=match) as e:
        WorldTokenizer(p)
    assert f"{p}:2" in str(e.value)


def test_world_vocab_duplicate_and_missing(tmp_path):
    p = tmp_path / "vocab.txt"
    p.write_text("1 'a' 1\n1 'b' 1\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match="twice"):
        WorldTokenizer(p)
    with pytest.raises(TokenizerError, match="not found"):
        WorldTokenizer(tmp_path / "nope.txt")


def test_world_small_vocab_without_every_byte(tmp_path):
    p = tmp_path / "vocab.txt"
    p.write_text("1 'a' 1\n2 'b' 1\n3 'ab' 2\n4 'abc' 3\n5 b'\\xff' 1\n", encoding="utf-8")
    tok = WorldTokenizer(p)
    assert tok.vocab_size == 6
    assert tok.encode("abcab") == [4, 3]
    assert tok.encode("aab") == [1, 3]
    assert tok.encode_bytes(b"b\xff") == [2, 5]
    assert tok._encode_python(b"abcab") == [4, 3]
    with pytest.raises(TokenizerError, match="0x63"):
        tok.encode("ac")  # 'c' alone is no token


def test_default_world_vocab_path(tmp_path, monkeypatch, ref_vocab):
    monkeypatch.setattr(world_mod, "DATA_DIR", tmp_path)
    with pytest.raises(TokenizerError, match="rwkv_vocab_v20230424.txt.*--vocab") as e:
        default_world_vocab_path()
    assert isinstance(e.value, RwkvpyError) and isinstance(e.value, ValueError)
    with pytest.raises(TokenizerError):
        WorldTokenizer()
    shutil.copy(ref_vocab, tmp_path / "rwkv_vocab_v20230424.txt")
    assert default_world_vocab_path() == tmp_path / "rwkv_vocab_v20230424.txt"
    assert WorldTokenizer().encode("Hello") == WorldTokenizer(ref_vocab).encode("Hello")


# -- the vocabularies rwkvpy ships ---------------------------------------------------------

SHIPPED_SHA256 = {  # as in src/rwkvpy/tokenizers/data/README.md
    "rwkv_vocab_v20230424.txt": "e6dee3d4e31b4d5c40ac99508ac6c701ceef4bed681bf2167ce9a908552bca89",
    "20B_tokenizer.json": "56ac4821e129d2c520fdaba60abd920fa852ada51b45c0dd52bbb6bd8c985ade",
}


def test_shipped_files(ref_vocab):
    import hashlib

    for path in (default_world_vocab_path(), default_neox_path()):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == SHIPPED_SHA256[path.name]
        assert path.name in (path.parent / "README.md").read_text(encoding="utf-8")
    # the rwkv package's copy differs only by its CRLF line ends
    assert default_world_vocab_path().read_bytes() == ref_vocab.read_bytes().replace(b"\r\n", b"\n")


def test_shipped_world_matches_reference(ref):
    tok = tokenizer_for(65536)
    assert isinstance(tok, WorldTokenizer) and tok.path == default_world_vocab_path()
    for name, text in TEXTS.items():
        ids = tok.encode(text)
        assert ids == ref.encode(text), name
        assert tok.decode(ids) == text, name
    # lone surrogates: the reference raises Python's UnicodeEncodeError, rwkvpy a TokenizerError
    # naming the position (documented in rwkvpy.tokenizers.world)
    with pytest.raises(UnicodeEncodeError):
        ref.encode("ab\udc80")
    with pytest.raises(TokenizerError, match="position 2"):
        tok.encode("ab\udc80")


def test_world_from_tokens_shares_the_file_trie():
    tok = tokenizer_for(65536)
    tokens = [tok.token_bytes(i) for i in range(tok.vocab_size)] + [b""] * 6
    t2 = WorldTokenizer(tokens=tokens, source="list")
    assert t2._trie is tok._trie and t2.vocab_size == tok.vocab_size == 65530
    with pytest.raises(TokenizerError, match="--vocab"):
        WorldTokenizer(tokens=[b"", b"a"]).encode("b")  # no token for byte 'b'


def test_shipped_neox_matches_tokenizers_library():
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(default_neox_path()))
    tok = tokenizer_for(50277)
    assert isinstance(tok, NeoXTokenizer) and tok.vocab_size == 50277
    assert isinstance(tokenizer_for(50304), NeoXTokenizer)
    for name, text in TEXTS.items():
        ids = tok.encode(text)
        assert ids == hf.encode(text).ids, name
        assert tok.decode(ids) == hf.decode(ids), name
        # the 20B tokenizer normalizes to NFC; otherwise the round trip is byte-exact
        assert tok.decode_bytes(ids) == unicodedata.normalize("NFC", text).encode(), name
    with pytest.raises(TokenizerError, match="surrogate"):
        tok.encode("a\ud800")


def test_vocabulary_errors_name_the_vocab_option(tmp_path):
    bad = tmp_path / "v.txt"
    bad.write_text("1 nope 1\n", encoding="utf-8")
    for make in (
        lambda: tokenizer_for(65536, path=tmp_path / "missing.txt"),
        lambda: tokenizer_for(65536, path=bad),
        lambda: tokenizer_for(50277, path=tmp_path / "missing.json"),
        lambda: tokenizer_for(50277, path=bad),
        lambda: tokenizer_for(1000),
    ):
        with pytest.raises(TokenizerError, match="--vocab"):
            make()


# -- bytes ---------------------------------------------------------------------------------


def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert (tok.name, tok.vocab_size) == ("bytes", 256)
    for text in TEXTS.values():
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    assert tok.decode_bytes([0, 255]) == b"\x00\xff"
    assert tok.decode([0xE4, 0xBD]) == "\ufffd"  # cut character: replaced, no exception
    with pytest.raises(TokenizerError, match="256"):
        tok.decode([256])
    with pytest.raises(TokenizerError, match="surrogate"):
        tok.encode("\udc80")


# -- NeoX (tokenizers library) -------------------------------------------------------------


@pytest.fixture(scope="module")
def neox_json(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([ENGLISH, CHINESE, CODE, EMOJI] * 20, trainer=trainer)
    tok.add_tokens(["    ", "  "])  # plain added tokens (the 20B tokenizer has runs of spaces)
    p = tmp_path_factory.mktemp("neox") / "tokenizer.json"
    tok.save(str(p))
    return p


def test_neox_matches_tokenizers_library(neox_json):
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(neox_json))
    tok = NeoXTokenizer(neox_json)
    assert tok.name == "neox"
    assert tok.vocab_size == hf.get_vocab_size(with_added_tokens=True)
    for name, text in TEXTS.items():
        ids = tok.encode(text)
        assert ids == hf.encode(text).ids, name
        assert tok.decode(ids) == hf.decode(ids) == text, name
        assert b"".join(tok.decode_bytes([i]) for i in ids) == text.encode("utf-8"), name
    eot = hf.token_to_id("<|endoftext|>")
    ids = tok.encode("hello") + [eot] + tok.encode(" world")
    assert tok.decode(ids) == hf.decode(ids) == "hello world"  # special tokens are skipped


def test_neox_errors(tmp_path, neox_json):
    with pytest.raises(TokenizerError, match="not found"):
        NeoXTokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="bad.json"):
        NeoXTokenizer(bad)
    tok = NeoXTokenizer(neox_json)
    with pytest.raises(TokenizerError):
        tok.decode([tok.vocab_size])
    with pytest.raises(TokenizerError, match="surrogate"):
        tok.encode("a\ud800")


# -- tokenizer_for -------------------------------------------------------------------------


def test_tokenizer_for_by_size_and_kind(ref_vocab, neox_json):
    assert isinstance(tokenizer_for(256), ByteTokenizer)
    assert isinstance(tokenizer_for(65536, path=ref_vocab), WorldTokenizer)
    assert isinstance(tokenizer_for(65536, kind="world", path=ref_vocab), WorldTokenizer)
    assert isinstance(tokenizer_for(50277, path=neox_json), NeoXTokenizer)
    assert isinstance(tokenizer_for(50304, kind="neox", path=neox_json), NeoXTokenizer)
    assert isinstance(tokenizer_for(65536, kind="bytes"), ByteTokenizer)


def test_tokenizer_for_mismatches(ref_vocab, neox_json):
    with pytest.raises(TokenizerError, match=r"65530.*50277"):
        tokenizer_for(50277, kind="world", path=ref_vocab)
    with pytest.raises(TokenizerError, match=r"65530.*50277"):
        tokenizer_for(50277, kind="world")  # fails on the sizes before looking for a file
    with pytest.raises(TokenizerError, match=r"256.*100"):
        tokenizer_for(100, kind="bytes")
    n = NeoXTokenizer(neox_json).vocab_size
    with pytest.raises(TokenizerError, match=rf"{n}.*512"):
        tokenizer_for(512, kind="neox", path=neox_json)
    with pytest.raises(TokenizerError, match="512"):
        tokenizer_for(512)  # no tokenizer known for this size
    with pytest.raises(TokenizerError, match="kind"):
        tokenizer_for(256, kind="gpt2")
    with pytest.raises(TokenizerError):
        tokenizer_for(0)


# -- StreamDecoder -------------------------------------------------------------------------


def test_stream_decoder_holds_back_incomplete_characters():
    d = StreamDecoder(ByteTokenizer())
    e = "é".encode()
    assert d.feed([e[0]]) == ""
    assert d.pending == e[:1]
    assert d.feed([e[1]]) == "é"
    smile = "😀".encode()
    assert [d.feed([b]) for b in smile] == ["", "", "", "😀"]
    assert d.feed(list(b"ok")) == "ok"
    assert d.flush() == ""


def test_stream_decoder_invalid_bytes_and_flush():
    d = StreamDecoder(ByteTokenizer())
    assert d.feed([0xFF]) == "\ufffd"  # can never start a character
    assert d.feed([0x80, ord("a")]) == "\ufffda"  # stray continuation byte
    assert d.feed([0xE4, 0xBD]) == ""  # incomplete, held back
    assert d.feed([ord("b")]) == "\ufffdb"  # broken by an ASCII byte
    assert d.feed([0xF0, 0x9F]) == ""
    assert d.flush() == "\ufffd"  # never completed
    assert d.flush() == ""


def test_stream_decoder_equals_whole_decode_on_random_splits():
    rng = random.Random(11)
    tok = ByteTokenizer()
    for _ in range(200):
        data = bytes(
            rng.choice([rng.randrange(256), *"aé😀中".encode()])
            for _ in range(rng.randrange(1, 60))
        )
        ids = list(data)
        d = StreamDecoder(tok)
        out, i = [], 0
        while i < len(ids):
            k = rng.randrange(1, 5)
            out.append(d.feed(ids[i : i + k]))
            i += k
        out.append(d.flush())
        assert "".join(out) == data.decode("utf-8", errors="replace")


def test_stream_decoder_with_world_tokens(world):
    text = EMOJI + CHINESE + TEXTS["random_unicode"][:500]
    d = StreamDecoder(world)
    pieces = [d.feed([t]) for t in world.encode(text)]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + d.flush() == text
