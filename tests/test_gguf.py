"""GGUF: files rwkvpy writes, read back by the gguf library itself (as llama.cpp would see
them) and by rwkvpy; llama.cpp-style variants (rescaled layers, unfused lerps); bad files."""

import gguf
import numpy as np
import pytest
import torch
from conftest import REF_MODELS, fixture_path

import rwkvpy
from rwkvpy import errors
from rwkvpy.convert import convert
from rwkvpy.formats import gguf as rgguf

TOKENS = [0, 100, 511, 42]
C, V, HEAD = 192, 512, 64
F16_TOL = 1e-4  # max abs logit difference, .pth (bf16) vs F16 GGUF; measured <= 7e-6


def load(path):
    try:  # the float32 reference path; one thread: tiny models, and no oversubscription
        return rwkvpy.load(path, mode="reference", threads=1)
    except TypeError:  # a load() without these options
        return rwkvpy.load(path)


def logits(path):
    out, _ = load(path).forward(TOKENS, None, all_logits=True)
    return out


@pytest.fixture(scope="module")
def ref_logits():
    return {name: logits(fixture_path("reference-pth", f"{name}.pth")) for name in REF_MODELS}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(name, type) -> path of the GGUF converted from the reference .pth."""
    d = tmp_path_factory.mktemp("gguf")
    cache = {}

    def get(name, typ):
        if (name, typ) not in cache:
            p = d / f"{name}-{typ}.gguf"
            convert(fixture_path("reference-pth", f"{name}.pth"), p, type=typ, progress=False)
            cache[name, typ] = p
        return cache[name, typ]

    return get


def fields(reader):
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def ne(t):
    """A GGUF tensor's dims in ggml order, padded to 4 as llama.cpp compares them."""
    dims = [int(x) for x in t.shape]
    return tuple(dims + [1] * (4 - len(dims)))


def pad4(*dims):
    return tuple(list(dims) + [1] * (4 - len(dims)))


# -- what llama.cpp expects (src/llama-model.cpp, load_tensors for LLM_ARCH_RWKV6 / RWKV7) -----


def llama_cpp_v6(n_layer, F, extra=32, decay_extra=64):
    t = {
        "token_embd.weight": pad4(C, V),
        "token_embd_norm.weight": pad4(C),
        "token_embd_norm.bias": pad4(C),
        "output_norm.weight": pad4(C),
        "output_norm.bias": pad4(C),
        "output.weight": pad4(C, V),
    }
    for i in range(n_layer):
        p = f"blk.{i}."
        t.update(
            {
                p + "attn_norm.weight": pad4(C),
                p + "attn_norm.bias": pad4(C),
                p + "attn_norm_2.weight": pad4(C),
                p + "attn_norm_2.bias": pad4(C),
                p + "time_mix_w1.weight": pad4(C, extra * 5),
                p + "time_mix_w2.weight": pad4(extra, C, 5),
                p + "time_mix_lerp_x.weight": pad4(C, 1, 1),
                p + "time_mix_lerp_fused.weight": pad4(C, 1, 1, 5),
                p + "time_mix_first.weight": pad4(HEAD, C // HEAD),
                p + "time_mix_decay.weight": pad4(C),
                p + "time_mix_decay_w1.weight": pad4(C, decay_extra),
                p + "time_mix_decay_w2.weight": pad4(decay_extra, C),
                p + "time_mix_key.weight": pad4(C, C),
                p + "time_mix_value.weight": pad4(C, C),
                p + "time_mix_receptance.weight": pad4(C, C),
                p + "time_mix_gate.weight": pad4(C, C),
                p + "time_mix_ln.weight": pad4(C),
                p + "time_mix_ln.bias": pad4(C),
                p + "time_mix_output.weight": pad4(C, C),
                p + "channel_mix_lerp_k.weight": pad4(C, 1, 1),
                p + "channel_mix_lerp_r.weight": pad4(C, 1, 1),
                p + "channel_mix_key.weight": pad4(C, F),
                p + "channel_mix_value.weight": pad4(F, C),
                p + "channel_mix_receptance.weight": pad4(C, C),
            }
        )
    return t


def llama_cpp_v7(n_layer, F, decay=64, iclr=64, vres=32, gate=128):
    t = {
        "token_embd.weight": pad4(C, V),
        "token_embd_norm.weight": pad4(C),
        "token_embd_norm.bias": pad4(C),
        "output_norm.weight": pad4(C),
        "output_norm.bias": pad4(C),
        "output.weight": pad4(C, V),
    }
    for i in range(n_layer):
        p = f"blk.{i}."
        v = iclr if i == 0 else vres
        t.update(
            {
                p + "attn_norm.weight": pad4(C),
                p + "attn_norm.bias": pad4(C),
                p + "attn_norm_2.weight": pad4(C),
                p + "attn_norm_2.bias": pad4(C),
                p + "time_mix_w0.weight": pad4(C),
                p + "time_mix_w1.weight": pad4(C, decay),
                p + "time_mix_w2.weight": pad4(decay, C),
                p + "time_mix_a0.weight": pad4(C),
                p + "time_mix_a1.weight": pad4(C, iclr),
                p + "time_mix_a2.weight": pad4(iclr, C),
                p + "time_mix_v0.weight": pad4(C),
                p + "time_mix_v1.weight": pad4(C, v),
                p + "time_mix_v2.weight": pad4(v, C),
                p + "time_mix_g1.weight": pad4(C, gate),
                p + "time_mix_g2.weight": pad4(gate, C),
                p + "time_mix_lerp_fused.weight": pad4(C, 1, 1, 6),
                p + "time_mix_k_k.weight": pad4(C),
                p + "time_mix_k_a.weight": pad4(C),
                p + "time_mix_r_k.weight": pad4(C),
                p + "time_mix_key.weight": pad4(C, C),
                p + "time_mix_value.weight": pad4(C, C),
                p + "time_mix_receptance.weight": pad4(C, C),
                p + "time_mix_ln.weight": pad4(C),
                p + "time_mix_ln.bias": pad4(C),
                p + "time_mix_output.weight": pad4(C, C),
                p + "channel_mix_lerp_k.weight": pad4(C, 1, 1),
                p + "channel_mix_key.weight": pad4(C, F),
                p + "channel_mix_value.weight": pad4(F, C),
            }
        )
    return t


@pytest.mark.parametrize(
    "name,typ",
    [("v6_c192_l2", "f16"), ("v6_c192_l2", "q5_1"), ("v7_c192_l2", "f16"), ("v7_c192_l2", "q8_0")],
)
def test_gguf_library_sees_llama_cpp_layout(converted, name, typ):
    r = gguf.GGUFReader(converted(name, typ))
    f = fields(r)
    arch = "rwkv6" if name.startswith("v6") else "rwkv7"
    F = 672 if arch == "rwkv6" else 768
    assert f["general.architecture"] == arch
    assert f[f"{arch}.context_length"] == 1048576
    assert f[f"{arch}.embedding_length"] == C and f[f"{arch}.block_count"] == 2
    assert f[f"{arch}.feed_forward_length"] == F and f[f"{arch}.wkv.head_size"] == HEAD
    assert f[f"{arch}.attention.head_count"] == 0
    assert f[f"{arch}.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert f[f"{arch}.vocab_size"] == V
    assert f["general.file_type"] == {"f16": 1, "q5_1": 9, "q8_0": 7}[typ]
    assert f["tokenizer.ggml.model"] == "none"
    if arch == "rwkv6":
        assert f["rwkv6.time_mix_extra_dim"] == 32 and f["rwkv6.time_decay_extra_dim"] == 64
        assert f["rwkv6.rescale_every_n_layers"] == 0
        expected = llama_cpp_v6(2, F)
    else:
        assert (
            f["rwkv7.attention.decay_lora_rank"],
            f["rwkv7.attention.iclr_lora_rank"],
            f["rwkv7.attention.value_residual_mix_lora_rank"],
            f["rwkv7.attention.gate_lora_rank"],
        ) == (64, 64, 32, 128)
        expected = llama_cpp_v7(2, F)
    got = {t.name: t for t in r.tensors}
    assert set(got) == set(expected)  # llama.cpp refuses files with tensors it does not create
    for n, t in got.items():
        assert ne(t) == expected[n], n
        kind = t.tensor_type.name
        if len([d for d in t.shape if d != 1]) <= 1 or "lerp" in n or "first" in n:
            assert kind == "F32", n
        if n in ("token_embd.weight", "output.weight"):
            assert kind == "F16", n
        if n.endswith(("time_mix_key.weight", "channel_mix_value.weight")):
            assert kind == typ.upper(), n
    # v7 layer 0: llama.cpp's converter writes copies of a0/a1/a2 as v0/v1/v2
    if arch == "rwkv7":
        for k in "012":
            a, v = got[f"blk.0.time_mix_a{k}.weight"], got[f"blk.0.time_mix_v{k}.weight"]
            assert np.array_equal(np.asarray(a.data), np.asarray(v.data))


@pytest.mark.parametrize(
    "name,arch,version",
    [
        ("v4_c192_l2", "rwkv4", "4"),
        ("v5_0_c192_l2", "rwkv5", "5.0"),
        ("v5_2_c192_l2", "rwkv5", "5.2"),
    ],
)
def test_v4_v5_architectures(converted, name, arch, version):
    r = gguf.GGUFReader(converted(name, "f16"))
    f = fields(r)
    assert f["general.architecture"] == arch and f[f"{arch}.version"] == version
    got = {t.name: ne(t) for t in r.tensors}
    assert got["token_embd.weight"] == pad4(C, V) and got["output.weight"] == pad4(C, V)
    assert got["blk.1.time_mix_lerp_k.weight"] == pad4(C)
    decay = {"4": pad4(C), "5.0": pad4(3), "5.2": pad4(HEAD, 3)}[version]
    assert got["blk.1.time_mix_decay.weight"] == decay
    assert got["blk.1.time_mix_first.weight"] == decay
    assert ("blk.0.time_mix_gate.weight" in got) == (version == "5.2")
    if arch == "rwkv5":
        assert f["rwkv5.wkv.head_size"] == HEAD


@pytest.mark.parametrize("name", REF_MODELS)
@pytest.mark.parametrize("typ", ["f32", "bf16", "f16"])
def test_pth_to_gguf_round_trip_logits(converted, ref_logits, name, typ):
    """F32 exactly; BF16 exactly too (the source is bf16); F16 within F16_TOL."""
    path = converted(name, typ)
    ckpt = rwkvpy.formats.read(path)
    assert ckpt.format == "gguf" and ckpt.meta["architecture"].startswith("rwkv")
    got = logits(path)
    if typ == "f16":
        assert (got - ref_logits[name]).abs().max() < F16_TOL
    else:
        assert torch.equal(got, ref_logits[name])


def test_raw_parameters_survive(converted):
    """GGUF readers give back BlinkDL's raw values (no exp, no transposes) for every tensor."""
    for name in REF_MODELS:
        pth = rwkvpy.formats.read(fixture_path("reference-pth", f"{name}.pth"))
        g = rwkvpy.formats.read(converted(name, "f32"))
        for k, t in pth.tensors.items():
            if name.startswith("v7") and k in (
                "blocks.0.att.v0",
                "blocks.0.att.v1",
                "blocks.0.att.v2",
            ):
                assert k not in g.tensors  # unused; llama.cpp's dummies are dropped on read
                continue
            a = t.float().reshape(-1)
            b = g.tensors[k].float().reshape(-1)
            assert torch.equal(a, b), (name, k)
            assert g.tensors[k].shape == t.shape or g.tensors[k].numel() == t.numel()


def _mapped_file(address):
    with open("/proc/self/maps") as f:
        for line in f:
            fields_ = line.split()
            lo, hi = (int(x, 16) for x in fields_[0].split("-"))
            if lo <= address < hi:
                return fields_[5] if len(fields_) > 5 else None
    return None


def test_gguf_weights_are_memory_mapped(converted):
    path = converted("v6_c192_l2", "q5_1")
    ckpt = rwkvpy.formats.read(path)
    q = ckpt.tensors["blocks.0.att.key.weight"]
    assert isinstance(q, rwkvpy.formats.QTensor) and q.fmt == "Q5_1"
    assert _mapped_file(q.data.ctypes.data) == str(path)
    emb = ckpt.tensors["emb.weight"]
    assert emb.dtype == torch.float16 and _mapped_file(emb.data_ptr()) == str(path)
    ln = ckpt.tensors["blocks.0.ln1.weight"]
    assert _mapped_file(ln.data_ptr()) == str(path)


def test_tokenizer_metadata_and_tokens(tmp_path):
    src = fixture_path("reference-pth", "v4_c192_l2.pth")
    tokens = [b""] + [bytes([i % 256]) * (1 + i // 256) for i in range(1, 300)]
    tokens[5:9] = [b"it's", b'say "hi"', b"a\\b\n", "ü€".encode()]
    p = tmp_path / "w.gguf"
    convert(src, p, progress=False, tokenizer="world", tokens=tokens)
    f = fields(gguf.GGUFReader(p))
    assert f["rwkvpy.tokenizer"] == "world" and f["rwkv4.vocab_size"] == V
    assert f["tokenizer.ggml.model"] == "rwkv"
    assert len(f["tokenizer.ggml.tokens"]) == V  # padded with [PAD<id>] as llama.cpp's converter
    assert f["tokenizer.ggml.tokens"][0] == "<s>" and f["tokenizer.ggml.tokens"][-1] == "[PAD511]"
    back = rgguf.read_tokens(p)
    assert back[:300] == [b""] + tokens[1:] and back[300:] == [b""] * (V - 300)
    meta = rwkvpy.formats.read(p).meta
    assert meta["tokenizer"] == "world" and meta["n_tokens"] == V
    # GGUF -> GGUF keeps the vocabulary
    p2 = tmp_path / "w2.gguf"
    convert(p, p2, type="q8_0", progress=False)
    assert rgguf.read_tokens(p2) == back
    # bytes: the 256 single bytes as an RWKV vocabulary, padded to the model's size
    p3 = tmp_path / "b.gguf"
    convert(src, p3, progress=False, tokenizer="bytes")
    f3 = fields(gguf.GGUFReader(p3))
    assert f3["rwkvpy.tokenizer"] == "bytes" and f3["tokenizer.ggml.model"] == "rwkv"
    assert rgguf.read_tokens(p3) == [bytes([i]) for i in range(256)] + [b""] * (V - 256)


# -- GGUFs as llama.cpp's converter makes them from HF models ------------------------------------


def _rewrite(src, dst, kv=None, tensors=None):
    """Copy a GGUF, replacing metadata values and tensors (name -> (type, ggml-order dims,
    data array) or None to drop; extra names are added)."""
    r = gguf.GGUFReader(src)
    arch = fields(r)["general.architecture"]
    w = gguf.GGUFWriter(dst, arch)
    kv = kv or {}
    for k, fld in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        val = kv.get(k, fld.contents())
        sub = fld.types[-1] if fld.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(k, val, fld.types[0], sub_type=sub)
    out = {}
    for t in r.tensors:
        out[t.name] = (
            t.tensor_type,
            [int(x) for x in t.shape],
            np.asarray(r.data[t.data_offset : t.data_offset + t.n_bytes]),
        )
    for k, v in (tensors or {}).items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    for name, (typ, dims, data) in out.items():
        w.add_tensor_info(
            name, list(reversed(dims)), np.dtype(np.float32), data.nbytes, raw_dtype=typ
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _typ, _dims, data in out.values():
        w.write_tensor_data(np.ascontiguousarray(data).view(np.uint8).reshape(-1))
    w.close()


@pytest.mark.parametrize("typ", ["f32", "q5_1"])
def test_llama_cpp_rescaled_v6_is_undone(converted, tmp_path, typ):
    """rescale_every_n_layers=1 with layer N's output/value weights divided by 2**N, the lerps
    unfused (llama.cpp loads both forms): the same model."""
    src = converted("v6_c192_l2", typ)
    r = gguf.GGUFReader(src)
    repl = {}
    qt = gguf.GGMLQuantizationType
    for t in r.tensors:
        raw = np.array(r.data[t.data_offset : t.data_offset + t.n_bytes])
        if t.name == "blk.1.time_mix_output.weight" or t.name == "blk.1.channel_mix_value.weight":
            if t.tensor_type == qt.F32:
                raw = (raw.view(np.float32) / np.float32(2)).view(np.uint8)
            else:
                fmt = rwkvpy.quant.get_format(t.tensor_type.name)
                rec = raw.view(fmt.block_dtype)
                rec["d"] = rec["d"] / np.float16(2)
                if "m" in rec.dtype.names:
                    rec["m"] = rec["m"] / np.float16(2)
            repl[t.name] = (t.tensor_type, [int(x) for x in t.shape], raw)
        if t.name.endswith("time_mix_lerp_fused.weight"):
            layer = t.name.rsplit(".", 2)[0]
            f32 = raw.view(np.float32).reshape(5, -1)
            repl[t.name] = None
            for j, c in enumerate("wkvrg"):
                repl[f"{layer}.time_mix_lerp_{c}.weight"] = (qt.F32, [C, 1, 1], f32[j].copy())
    dst = tmp_path / "llama.gguf"
    _rewrite(src, dst, kv={"rwkv6.rescale_every_n_layers": 1}, tensors=repl)
    ckpt = rwkvpy.formats.read(dst)
    assert ckpt.meta["rescale_every_n_layers"] == 1
    if typ != "f32":  # block scales multiplied back: still quantized
        assert isinstance(ckpt.tensors["blocks.1.att.output.weight"], rwkvpy.formats.QTensor)
    assert torch.equal(logits(dst), logits(src))


# -- bad files -----------------------------------------------------------------------------------


def _tiny_gguf(path, arch="rwkv7", ttype=gguf.GGMLQuantizationType.F32, nbytes=16, n=4):
    w = gguf.GGUFWriter(path, arch)
    w.add_tensor_info("token_embd.weight", [n], np.dtype(np.float32), nbytes, raw_dtype=ttype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.write_tensor_data(np.zeros(nbytes, dtype=np.uint8))
    w.close()


def test_gguf_not_rwkv(tmp_path):
    _tiny_gguf(tmp_path / "l.gguf", arch="llama")
    with pytest.raises(errors.UnsupportedVersionError, match="architecture 'llama' is not one"):
        rwkvpy.load(tmp_path / "l.gguf")


def test_gguf_unsupported_tensor_type(tmp_path):
    _tiny_gguf(tmp_path / "k.gguf", ttype=gguf.GGMLQuantizationType.IQ2_XXS, nbytes=66, n=256)
    with pytest.raises(
        errors.UnsupportedTensorTypeError, match=r"'token_embd.weight' has type IQ2_XXS"
    ):
        rwkvpy.formats.read(tmp_path / "k.gguf")


def test_gguf_truncated(converted, tmp_path):
    data = converted("v7_c192_l2", "q5_1").read_bytes()
    for size in (len(data) - 100, 200, 10):
        p = tmp_path / f"t{size}.gguf"
        p.write_bytes(data[:size])
        with pytest.raises(errors.ModelFileError) as e:
            rwkvpy.load(p)
        assert str(p) in str(e.value)
        assert isinstance(e.value, (errors.TruncatedFileError, errors.UnknownFormatError))
