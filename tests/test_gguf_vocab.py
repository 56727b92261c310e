"""The vocabulary in the GGUF files rwkvpy writes, from every source kind, against the keys and
values llama.cpp's converter (convert_hf_to_gguf.py, ``_set_vocab_rwkv_world`` of Rwkv6Model and
Rwkv7Model) writes for the same model; and rwkvpy reading the vocabulary a GGUF holds."""

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import rwkvpy
from rwkvpy.config import Version
from rwkvpy.convert import convert
from rwkvpy.formats import gguf as rgguf
from rwkvpy.formats.vocabulary import model_tokenizer
from rwkvpy.synth import save_random_model
from rwkvpy.tokenizers import (
    ByteTokenizer,
    NeoXTokenizer,
    TokenizerError,
    WorldTokenizer,
    default_world_vocab_path,
    tokenizer_for,
)

WORLD_V = 65536
TEXT = "Hello world! 你好 👋 def f(x): return x\n\n"
DEMO = Path(rwkvpy.__file__).parent / "data" / "demo-v7-192x4-q8_0.gguf"

# The keys llama.cpp's converter writes for an RWKV-7 World model (set_gguf_parameters and
# _set_vocab_rwkv_world), besides general.*.
LLAMA_CPP_V7_KEYS = {
    "rwkv7.context_length",
    "rwkv7.embedding_length",
    "rwkv7.block_count",
    "rwkv7.attention.layer_norm_epsilon",
    "rwkv7.wkv.head_size",
    "rwkv7.attention.decay_lora_rank",
    "rwkv7.attention.iclr_lora_rank",
    "rwkv7.attention.value_residual_mix_lora_rank",
    "rwkv7.attention.gate_lora_rank",
    "rwkv7.feed_forward_length",
    "general.file_type",
    "rwkv7.attention.head_count",
    "tokenizer.ggml.model",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.chat_template",
}


def llama_cpp_world_tokens(vocab_size=WORLD_V):
    """What llama.cpp's converter stores, computed here from the vocabulary file's lines:
    '<s>', then each line's token as the body of its Python bytes literal, then [PAD<id>]."""
    import ast

    texts, types = ["<s>"], [gguf.TokenType.CONTROL]
    for line in default_world_vocab_path().read_text(encoding="utf-8").splitlines():
        _, rest = line.split(" ", 1)
        lit, n = rest.rsplit(" ", 1)
        tok = ast.literal_eval(lit)
        tok = tok.encode() if isinstance(tok, str) else tok
        assert len(tok) == int(n)
        texts.append(repr(tok)[2:-1])
        types.append(gguf.TokenType.NORMAL)
    while len(texts) < vocab_size:
        texts.append(f"[PAD{len(texts)}]")
        types.append(gguf.TokenType.UNUSED)
    return texts, types


@pytest.fixture(scope="module")
def expected_world():
    return llama_cpp_world_tokens()


def fields(path, reader=None):
    """Every key's value, read with rwkvpy's GGUFReader (the gguf package's, with arrays parsed
    in one pass: the same fields, see test_pth_source) or ``reader``."""
    r = (reader or rgguf._reader_class())(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def check_world_gguf(path, expected, arch="rwkv7"):
    f = fields(path)
    missing = LLAMA_CPP_V7_KEYS - set(f) if arch == "rwkv7" else set()
    assert not missing, missing
    texts, types = expected
    assert f["tokenizer.ggml.model"] == "rwkv"
    assert f["tokenizer.ggml.tokens"] == texts
    assert f["tokenizer.ggml.token_type"] == [int(t) for t in types]
    assert (
        f["tokenizer.ggml.bos_token_id"],
        f["tokenizer.ggml.eos_token_id"],
        f["tokenizer.ggml.eot_token_id"],
    ) == (0, 0, 261)
    assert f["tokenizer.ggml.tokens"][261] == "\\n\\n"
    assert f["tokenizer.chat_template"] == rgguf.WORLD_CHAT_TEMPLATE
    assert f["rwkvpy.tokenizer"] == "world"
    assert f[f"{arch}.vocab_size"] == WORLD_V
    tok = model_tokenizer(path, WORLD_V)
    assert isinstance(tok, WorldTokenizer) and str(path) in str(tok.path)
    assert tok.encode(TEXT) == tokenizer_for(WORLD_V).encode(TEXT)
    return f


@pytest.fixture(scope="module")
def world_pth(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    return save_random_model(
        d / "w.pth", version=Version.V7, n_embd=64, n_layer=1, vocab=WORLD_V, seed=3
    )


@pytest.fixture(scope="module")
def world_gguf(world_pth, tmp_path_factory):
    p = tmp_path_factory.mktemp("wg") / "w.gguf"
    convert(world_pth, p, type="f16", progress=False)
    return p


# -- one test per source kind ---------------------------------------------------------------


def test_pth_source(world_gguf, expected_world):
    f = check_world_gguf(world_gguf, expected_world)
    assert fields(world_gguf, gguf.GGUFReader) == f  # the gguf package's own reader agrees


def test_rwkvcpp_bin_source(world_pth, tmp_path, expected_world):
    b = tmp_path / "w.bin"
    convert(world_pth, b, type="f16", progress=False)
    g = tmp_path / "w.gguf"
    convert(b, g, type="q8_0", progress=False)
    check_world_gguf(g, expected_world)


def test_safetensors_source(world_pth, tmp_path, expected_world):
    from safetensors.torch import save_file

    sd = torch.load(world_pth, weights_only=True)
    s = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, s)
    g = tmp_path / "w.gguf"
    convert(s, g, type="f16", progress=False)
    check_world_gguf(g, expected_world)


def test_hf_folder_source(world_pth, tmp_path, expected_world):
    from safetensors.torch import save_file

    sd = torch.load(world_pth, weights_only=True)
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(
        json.dumps({"architectures": ["RWKV7ForCausalLM"], "vocab_size": WORLD_V})
    )
    g = tmp_path / "plain.gguf"
    convert(folder, g, type="f16", progress=False)  # no vocabulary file: the shipped one
    check_world_gguf(g, expected_world)
    # the folder's own vocabulary file wins (here: the shipped one with token 2 changed)
    lines = default_world_vocab_path().read_text(encoding="utf-8").splitlines()
    assert lines[1].startswith("2 ")
    lines[1] = "2 'zqxzqx' 6"
    (folder / "rwkv_vocab_v20230424.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    g2 = tmp_path / "own.gguf"
    convert(folder, g2, type="f16", progress=False)
    texts = expected_world[0]
    assert fields(g2)["tokenizer.ggml.tokens"] == texts[:2] + ["zqxzqx"] + texts[3:]
    assert model_tokenizer(g2, WORLD_V).encode("zqxzqx") == [2]
    assert model_tokenizer(folder, WORLD_V).encode("zqxzqx") == [2]  # the folder itself


def test_gguf_to_gguf_source(world_gguf, tmp_path, expected_world):
    g = tmp_path / "again.gguf"
    convert(world_gguf, g, type="q8_0", progress=False)
    f = check_world_gguf(g, expected_world)
    assert f["tokenizer.ggml.tokens"][65530:] == [f"[PAD{i}]" for i in range(65530, 65536)]
    assert rgguf.read_tokens(g) == rgguf.read_tokens(world_gguf)


def _rewrite_keys(src, dst, drop=(), replace=None):
    """Copy a GGUF without the keys ``drop`` and with ``replace``'s values."""
    r = rgguf._reader_class()(src)
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents())
    replace = replace or {}
    for k, fld in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture" or k in drop:
            continue
        sub = fld.types[-1] if fld.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(k, replace.get(k, fld.contents()), fld.types[0], sub_type=sub)
    for t in r.tensors:
        w.add_tensor_info(
            t.name,
            [int(x) for x in reversed(t.shape)],
            np.dtype(np.float32),
            t.n_bytes,
            raw_dtype=t.tensor_type,
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in r.tensors:
        w.write_tensor_data(np.asarray(r.data[t.data_offset : t.data_offset + t.n_bytes]))
    w.close()


def test_llama_cpp_gguf_vocabulary_is_used(world_gguf, tmp_path, expected_world):
    """A GGUF as llama.cpp writes it (no rwkvpy key, its own chat template) is read with its
    own vocabulary, and a GGUF -> GGUF conversion keeps its template."""
    texts = list(expected_world[0])
    texts[2] = "zqxzqx"  # proves the file's vocabulary is used, not the shipped one
    src = tmp_path / "llama.gguf"
    _rewrite_keys(
        world_gguf,
        src,
        drop={"rwkvpy.tokenizer"},
        replace={"tokenizer.ggml.tokens": texts, "tokenizer.chat_template": "T"},
    )
    assert "rwkvpy.tokenizer" not in fields(src)
    tok = model_tokenizer(src, WORLD_V)
    assert isinstance(tok, WorldTokenizer) and tok.encode("zqxzqx") == [2]
    assert tok.encode(TEXT) == tokenizer_for(WORLD_V).encode(TEXT)
    m = rwkvpy.load(src, mode="reference", threads=1)
    assert m.tokenizer().encode("zqxzqx") == [2]
    assert m.tokenizer(path=default_world_vocab_path()).encode("zqxzqx") != [2]  # --vocab wins
    out = tmp_path / "out.gguf"
    convert(src, out, progress=False)
    f = fields(out)
    assert f["tokenizer.ggml.tokens"] == texts and f["tokenizer.chat_template"] == "T"
    assert f["rwkvpy.tokenizer"] == "world"


# -- other vocabularies ----------------------------------------------------------------------


def test_bytes_vocab_demo_model(tmp_path):
    g = tmp_path / "demo.gguf"
    convert(DEMO, g, type="f16", progress=False)
    f = fields(g)
    assert f["rwkvpy.tokenizer"] == "bytes" and f["tokenizer.ggml.model"] == "rwkv"
    assert f["tokenizer.ggml.tokens"] == [repr(bytes([i]))[2:-1] for i in range(256)]
    assert set(f["tokenizer.ggml.token_type"]) == {gguf.TokenType.NORMAL}
    assert len(set(f["tokenizer.ggml.tokens"])) == 256  # llama.cpp requires unique texts
    assert not any(k.endswith("_token_id") for k in f)
    assert isinstance(model_tokenizer(g, 256), ByteTokenizer)
    assert rgguf.read_tokens(g) == [bytes([i]) for i in range(256)]


def test_unknown_vocab_random_model(tmp_path):
    pth = save_random_model(
        tmp_path / "r.pth", version=Version.V7, n_embd=64, n_layer=1, vocab=1000
    )
    g = tmp_path / "r.gguf"
    convert(pth, g, progress=False)
    f = fields(g)
    assert f["tokenizer.ggml.model"] == "none" and "rwkvpy.tokenizer" not in f
    assert f["rwkv7.vocab_size"] == 1000 and "tokenizer.ggml.tokens" not in f
    with pytest.raises(TokenizerError, match="--vocab"):
        model_tokenizer(g, 1000)


def test_neox_vocab(tmp_path):
    pth = save_random_model(
        tmp_path / "n.pth", version=Version.V4, n_embd=64, n_layer=1, vocab=50304
    )
    g = tmp_path / "n.gguf"
    convert(pth, g, progress=False)
    f = fields(g)
    assert f["rwkvpy.tokenizer"] == "neox" and f["tokenizer.ggml.model"] == "gpt2"
    assert len(f["tokenizer.ggml.tokens"]) == 50304
    assert f["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|padding|>", "!"]
    assert f["tokenizer.ggml.tokens"][-1] == "[PAD50303]"
    types = f["tokenizer.ggml.token_type"]
    assert types[:3] == [gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, gguf.TokenType.NORMAL]
    assert types[50254] == gguf.TokenType.USER_DEFINED and types[-1] == gguf.TokenType.UNUSED
    assert len(f["tokenizer.ggml.merges"]) > 49000
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (0, 0)
    tok = model_tokenizer(g, 50304)
    assert isinstance(tok, NeoXTokenizer) and "tokenizer.huggingface.json" in str(tok.path)
    assert tok.encode(TEXT) == NeoXTokenizer().encode(TEXT)
    g2 = tmp_path / "n2.gguf"
    convert(g, g2, type="q8_0", progress=False)  # GGUF -> GGUF keeps it
    f2 = fields(g2)
    assert all(f2[k] == f[k] for k in f if k.startswith("tokenizer."))


def test_vocab_option_and_errors(world_pth, tmp_path):
    lines = default_world_vocab_path().read_text(encoding="utf-8").splitlines()
    lines[1] = "2 'zqxzqx' 6"
    v = tmp_path / "v.txt"
    v.write_text("\n".join(lines) + "\n", encoding="utf-8")
    g = tmp_path / "v.gguf"
    convert(world_pth, g, progress=False, vocab=v)
    assert fields(g)["tokenizer.ggml.tokens"][2] == "zqxzqx"
    bad = tmp_path / "bad.txt"
    bad.write_text("1 nope 1\n", encoding="utf-8")
    with pytest.raises(rwkvpy.errors.ConversionError, match="--vocab"):
        convert(world_pth, tmp_path / "x.gguf", progress=False, vocab=bad)
    with pytest.raises(rwkvpy.errors.ConversionError, match="--vocab"):
        rgguf.vocab_for_file("neox", 50277, vocab_file=bad)  # not a tokenizer.json
    with pytest.raises(TokenizerError, match="--vocab"):
        model_tokenizer(world_pth, WORLD_V, path=bad)
    with pytest.raises(TokenizerError, match="--vocab"):
        model_tokenizer(world_pth, WORLD_V, path=tmp_path / "missing.txt")


def test_cli_generate_converted_world_model_without_vocab(world_gguf):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "rwkvpy",
            "generate",
            "-m",
            str(world_gguf),
            "Hello",
            "--max-tokens",
            "3",
            "--temperature",
            "0",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "--vocab" not in r.stderr
