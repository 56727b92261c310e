"""rwkvpy.convert: rwkv.cpp .bin output equal to rwkv.cpp's own converter and quantizer,
quantized GGUF equal to the .bin, safetensors and Hugging Face sources, safety (no overwrite,
no partial files), streaming, and the command line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REF_MODELS, ROOT, TINY, fixture_path

import rwkvpy
from rwkvpy import convert as convert_mod
from rwkvpy import errors
from rwkvpy.convert import convert
from rwkvpy.formats import QTensor, rwkvcpp
from rwkvpy.formats import gguf as rgguf

TOKENS = [0, 100, 511, 42]
QTYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
# Tensors rwkv.cpp's converter computes with exp(): torch's float32 exp may differ by 1 ulp
# between CPUs (the fixtures were made on another machine: 2 of 192 values of v4's layer-1
# time_decay, 4-5 of v5.2's). Every other byte of every file is compared exactly.
EXP_TENSORS = {
    "v4": ("att.time_decay",),
    "v5_0": ("att.time_decay", "att.time_first"),
    "v5_2": ("att.time_decay",),
}


def load(path):
    try:
        return rwkvpy.load(path, mode="reference", threads=1)
    except TypeError:
        return rwkvpy.load(path)


def logits(path):
    out, _ = load(path).forward(TOKENS, None, all_logits=True)
    return out


def bin_logits_blinkdl_eps(path):
    """Logits of an rwkv.cpp file computed with BlinkDL's group-norm eps (64e-5) like the
    GGUF, instead of rwkv.cpp's 1e-5 for v5 that the .bin reader keeps."""
    import dataclasses

    from rwkvpy.kernels.plan import choose

    ckpt, cfg = rwkvpy.model._read(path)
    cfg = dataclasses.replace(cfg, ln_x_eps=64e-5)
    model = rwkvpy.Model(ckpt, cfg, choose(cfg.n_layer, mode="reference"))
    torch.set_num_threads(1)
    return model.forward(TOKENS, None, all_logits=True)[0]


def pth(name):
    return fixture_path("reference-pth", f"{name}.pth")


def raw_bytes(t):
    return np.asarray(t.data).tobytes() if isinstance(t, QTensor) else t.numpy().tobytes()


def assert_bin_equal(ours, ref, name):
    if ours.read_bytes() == ref.read_bytes():
        return
    h1, t1, y1 = rwkvcpp.read_raw(ours)
    h2, t2, y2 = rwkvcpp.read_raw(ref)
    assert h1 == h2 and list(t1) == list(t2)
    exp = EXP_TENSORS.get(name.rsplit("_c", 1)[0], ())
    for k in t2:
        assert y1[k] == y2[k] and tuple(t1[k].shape) == tuple(t2[k].shape), k
        if k.endswith(exp):
            a, b = t1[k].numpy().view(np.int32), t2[k].numpy().view(np.int32)
            assert np.abs(a.astype(np.int64) - b).max() <= 1, k
        else:
            assert raw_bytes(t1[k]) == raw_bytes(t2[k]), k


# -- rwkv.cpp .bin -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REF_MODELS)
@pytest.mark.parametrize("typ", ["FP16", "Q5_1"])
def test_bin_equals_rwkvcpp_converter(tmp_path, name, typ):
    """.pth -> .bin equals rwkv.cpp's convert_pytorch_to_ggml.py output (FP16) and its quantizer
    run on that (Q5_1), tensor by tensor; byte for byte for v5.0, v6 and v7."""
    out = tmp_path / f"{name}.bin"
    convert(pth(name), out, type=typ.lower().replace("fp", "f"), progress=False)
    ref = fixture_path("reference-pth", "rwkvcpp", f"{name}-{typ}.bin")
    assert_bin_equal(out, ref, name)
    if name.startswith(("v5_0", "v6", "v7")):
        assert out.read_bytes() == ref.read_bytes()


@pytest.mark.parametrize("name", REF_MODELS)
def test_bin_quantize_equals_rwkvcpp_quantizer(tmp_path, name):
    """.bin FP16 -> Q5_1 is rwkv.cpp's quantizer, byte for byte."""
    out = tmp_path / "q.bin"
    convert(
        fixture_path("reference-pth", "rwkvcpp", f"{name}-FP16.bin"),
        out,
        type="q5_1",
        progress=False,
    )
    assert (
        out.read_bytes()
        == fixture_path("reference-pth", "rwkvcpp", f"{name}-Q5_1.bin").read_bytes()
    )


@pytest.mark.parametrize("model", ["4v0-660K", "5v2-730K", "7v0-834K"])
def test_tiny_fp32_quantized_like_rwkvcpp(tmp_path, model):
    """rwkv.cpp's tiny test models: FP32 -> Q5_0 / Q5_1 byte for byte (emb/head stay FP32)."""
    for q in ("Q5_0", "Q5_1"):
        out = tmp_path / f"{q}.bin"
        convert(TINY / f"tiny-rwkv-{model}-FP32.bin", out, type=q, progress=False)
        assert out.read_bytes() == (TINY / f"tiny-rwkv-{model}-{q}.bin").read_bytes()


# -- quantized GGUF == quantized .bin ------------------------------------------------------------

_ROTATION = dict(zip(QTYPES, REF_MODELS))  # one version per type for the (slower) logits


@pytest.mark.parametrize("typ", QTYPES)
def test_quantized_gguf_equals_bin(tmp_path, typ):
    import gguf

    for name in REF_MODELS:
        g, b = tmp_path / f"{name}.gguf", tmp_path / f"{name}.bin"
        convert(pth(name), g, type=typ, progress=False)
        convert(pth(name), b, type=typ, progress=False)
        r = gguf.GGUFReader(g)
        gq = {
            t.name: (
                t.tensor_type.name,
                np.asarray(r.data[t.data_offset : t.data_offset + t.n_bytes]),
            )
            for t in r.tensors
            if t.tensor_type.name == typ.upper()
        }
        _, bt, by = rwkvcpp.read_raw(b)
        bq = {k: t for k, t in bt.items() if by[k] == typ.upper()}
        ckpt = rwkvpy.formats.read(pth(name))
        entries, _ = rgguf.gguf_entries(
            list(ckpt.tensors),
            ckpt.shapes,
            rwkvpy.models.detect_version(ckpt.shapes),
            rwkvpy.models.config_from_shapes(ckpt.shapes),
        )
        to_gguf = {
            e.inputs[0]: e.name for e in entries if len(e.inputs) == 1 and not e.extra.get("dummy")
        }
        assert len(gq) == len(bq) > 0, name
        for k, t in bq.items():  # the same quantized bytes under both names
            assert gq[to_gguf[k]][1].tobytes() == np.asarray(t.data).tobytes(), (name, k)
        if _ROTATION[typ] == name:
            a, c = logits(g), bin_logits_blinkdl_eps(b)
            if name.startswith(("v6", "v7")):
                assert torch.equal(a, c)
            else:  # the .bin stores exp(-exp(w)) / -exp(w): undone to ~1e-7 relative
                assert (a - c).abs().max() < 1e-4


def test_type_policy(tmp_path):
    """What stays float: rwkv.cpp's rules, and quantize_head."""
    g = tmp_path / "v7.gguf"
    convert(pth("v7_c192_l2"), g, type="q4_0", progress=False)
    types = rwkvpy.formats.read(g).file_types
    assert types["emb.weight"] == types["head.weight"] == "F16"
    assert types["blocks.1.att.key.weight"] == types["blocks.1.ffn.value.weight"] == "Q4_0"
    for k in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"):
        assert types[f"blocks.1.att.{k}"] == "F16", k
    for k in ("x_r", "w0", "k_k", "k_a", "r_k", "ln_x.weight"):
        assert types[f"blocks.1.att.{k}"] == "F32", k
    h = tmp_path / "v6h.gguf"
    convert(pth("v6_c192_l2"), h, type="q8_0", quantize_head=True, progress=False)
    types = rwkvpy.formats.read(h).file_types
    assert types["head.weight"] == "Q8_0" and types["emb.weight"] == "F16"
    assert types["blocks.0.att.time_maa_w1"] == "Q8_0"  # 2-D in rwkv.cpp's layout: quantized
    assert types["blocks.0.att.time_maa_w2"] == types["blocks.0.att.time_faaaa"] == "F32"
    f = tmp_path / "f32.gguf"
    convert(pth("v6_c192_l2"), f, type="f32", progress=False)
    assert set(rwkvpy.formats.read(f).file_types.values()) == {"F32"}


@pytest.mark.parametrize("name", ["v6_c192_l2", "v7_c192_l2"])
def test_bin_gguf_cross_conversions(tmp_path, name):
    """rwkv.cpp .bin -> GGUF -> .bin: the same model, and the same .bin."""
    src = fixture_path("reference-pth", "rwkvcpp", f"{name}-Q5_1.bin")
    g, b = tmp_path / "x.gguf", tmp_path / "x.bin"
    convert(src, g, type="q5_1", progress=False)
    convert(g, b, type="q5_1", progress=False)
    assert torch.equal(logits(g), logits(src))
    assert b.read_bytes() == src.read_bytes()


# -- safetensors and Hugging Face folders ----------------------------------------------------------


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import save_file

    for name in ("v5_2_c192_l2", "v7_c192_l2"):
        sd = torch.load(pth(name), weights_only=True)
        st = tmp_path / f"{name}.st"
        save_file({k: v.contiguous() for k, v in sd.items()}, st)
        ckpt = rwkvpy.formats.read(st)
        assert ckpt.format == "safetensors" and ckpt.file_types["emb.weight"] == "BF16"
        ref = logits(pth(name))
        assert torch.equal(logits(st), ref)
        g = tmp_path / f"{name}.gguf"
        convert(st, g, type="f32", progress=False)
        assert torch.equal(logits(g), ref)


def _hf_rwkv4_names(sd):
    out = {}
    leaf = {
        "time_mix_k": "time_mix_key",
        "time_mix_v": "time_mix_value",
        "time_mix_r": "time_mix_receptance",
    }
    for k, v in sd.items():
        if k == "head.weight":
            out[k] = v
            continue
        k = k.replace("emb.", "embeddings.").replace("blocks.0.ln0.", "blocks.0.pre_ln.")
        k = k.replace(".att.", ".attention.").replace(".ffn.", ".feed_forward.")
        head, _, last = k.rpartition(".")
        out["rwkv." + (f"{head}.{leaf.get(last, last)}" if head else k)] = v
    return out


def test_hf_transformers_rwkv4_folder(tmp_path):
    from safetensors.torch import save_file

    sd = torch.load(pth("v4_c192_l2"), weights_only=True)
    folder = tmp_path / "rwkv-4-hf"
    folder.mkdir()
    save_file(_hf_rwkv4_names(sd), folder / "model.safetensors")
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["RwkvForCausalLM"],
                "model_type": "rwkv",
                "hidden_size": 192,
                "num_hidden_layers": 2,
                "vocab_size": 512,
                "rescale_every": 6,
            }
        )
    )
    ckpt = rwkvpy.formats.read(folder)
    assert ckpt.format == "hf" and ckpt.meta["rescale_every"] == 6
    assert ckpt.meta["naming"] == "transformers"
    assert set(ckpt.tensors) == set(sd)
    assert torch.equal(logits(folder), logits(pth("v4_c192_l2")))


def _fla_rwkv7_names(sd):
    out = {}
    for k, v in sd.items():
        if k == "emb.weight":
            out["model.embeddings.weight"] = v
        elif k.startswith("ln_out."):
            out["model.norm." + k.split(".")[-1]] = v
        elif k == "head.weight":
            out["lm_head.weight"] = v
        else:
            _, i, rest = k.split(".", 2)
            p = f"model.layers.{i}."
            if rest.startswith(("ln0.", "ln1.", "ln2.")):
                ln = {"ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}[rest[:3]]
                out[p + ln + rest[3:]] = v
            elif rest.startswith("att."):
                leaf = rest[4:]
                proj = {
                    "receptance.weight": "r_proj",
                    "key.weight": "k_proj",
                    "value.weight": "v_proj",
                    "output.weight": "o_proj",
                }
                if leaf in proj:
                    out[p + f"attn.{proj[leaf]}.weight"] = v
                elif leaf.startswith("ln_x."):
                    out[p + "attn.g_norm." + leaf[5:]] = v
                elif leaf[0] in "wavg" and leaf[1:] in ("0", "1", "2"):
                    if i == "0" and leaf[0] == "v":
                        continue  # fla has no v_lora on layer 0
                    part = {"1": "lora.0.weight", "2": "lora.2.weight", "0": "lora.2.bias"}[leaf[1]]
                    out[p + f"attn.{leaf[0]}_lora.{part}"] = (
                        v.reshape(-1) if leaf[1] == "0" else v.t().contiguous()
                    )
                elif leaf in ("k_k", "k_a"):
                    out[p + f"attn.{leaf}"] = v.reshape(-1)
                else:  # x_r..x_g (1,1,C), r_k (H,N)
                    out[p + f"attn.{leaf}"] = v
            else:
                out[p + "ffn." + rest[4:]] = v.reshape(-1) if rest == "ffn.x_k" else v
    return out


def test_hf_fla_rwkv7_folder(tmp_path):
    from safetensors.torch import save_file

    sd = torch.load(pth("v7_c192_l2"), weights_only=True)
    folder = tmp_path / "rwkv7-fla"
    folder.mkdir()
    names = _fla_rwkv7_names(sd)
    half = len(names) // 2  # sharded, as large models are
    keys = list(names)
    save_file({k: names[k] for k in keys[:half]}, folder / "model-00001-of-00002.safetensors")
    save_file({k: names[k] for k in keys[half:]}, folder / "model-00002-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    k: f"model-0000{1 if i < half else 2}-of-00002.safetensors"
                    for i, k in enumerate(keys)
                }
            }
        )
    )
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["RWKV7ForCausalLM"],
                "model_type": "rwkv7",
                "hidden_size": 192,
                "head_dim": 64,
                "num_hidden_layers": 2,
                "vocab_size": 512,
                "norm_first": True,
            }
        )
    )
    ckpt = rwkvpy.formats.read(folder)
    assert ckpt.meta["naming"] == "fla"
    assert set(ckpt.tensors) == set(sd) - {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}
    ref = logits(pth("v7_c192_l2"))
    assert torch.equal(logits(folder), ref)
    g = tmp_path / "fla.gguf"
    convert(folder, g, type="f32", progress=False)
    assert torch.equal(logits(g), ref)


def test_hf_world_vocabulary_goes_into_gguf(tmp_path):
    from safetensors.torch import save_file

    sd = torch.load(pth("v4_c192_l2"), weights_only=True)
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(_hf_rwkv4_names(sd), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"architectures": ["RwkvForCausalLM"]}))
    lines = [
        f"{i} {repr(t)} {len(t.encode() if isinstance(t, str) else t)}"
        for i, t in [(1, "\x00"), (2, "a"), (3, "it's"), (4, b"\xff\xfe"), (5, "ü")]
    ]
    (folder / "rwkv_vocab_v20230424.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    g = tmp_path / "w.gguf"
    convert(folder, g, progress=False)
    toks = rgguf.read_tokens(g)
    assert toks[:6] == [b"", b"\x00", b"a", b"it's", b"\xff\xfe", "ü".encode()]
    assert rwkvpy.formats.read(g).meta["tokenizer"] == "world"


# -- safety ----------------------------------------------------------------------------------------


def test_overwrite_refused(tmp_path):
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(errors.OutputExistsError, match="already exists; use force=True"):
        convert(pth("v4_c192_l2"), out, progress=False)
    assert out.read_bytes() == b"keep me"
    convert(pth("v4_c192_l2"), out, progress=False, force=True)
    assert rwkvpy.formats.sniff(out) == "gguf"
    with pytest.raises(errors.ConversionError, match="is the source file itself"):
        convert(out, out, progress=False, force=True)


@pytest.mark.parametrize(
    "dst,typ,needle",
    [
        ("x.bin", "bf16", "rwkv.cpp .bin files cannot hold BF16"),
        ("x.safetensors", "f16", "unknown output extension '.safetensors'"),
        ("x.gguf", "q3_k", "unknown type 'q3_k'; expected one of f32, f16, bf16"),
    ],
)
def test_bad_requests(tmp_path, dst, typ, needle):
    with pytest.raises(errors.ConversionError, match=needle):
        convert(pth("v4_c192_l2"), tmp_path / dst, type=typ, progress=False)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("ext", [".gguf", ".bin"])
@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch, ext, existing):
    out = tmp_path / f"x{ext}"
    if existing:
        out.write_bytes(b"old")
    real, calls = convert_mod._encode, []

    def failing(fmt, x):
        calls.append(fmt)
        if len(calls) == 10:
            raise RuntimeError("disk on fire")
        return real(fmt, x)

    monkeypatch.setattr(convert_mod, "_encode", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert(pth("v6_c192_l2"), out, type="q5_1", progress=False, force=True)
    assert len(calls) == 10
    assert os.listdir(tmp_path) == (["x" + ext] if existing else [])  # no temp file left
    if existing:
        assert out.read_bytes() == b"old"


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def test_conversion_streams(tmp_path, monkeypatch):
    """A 64 MiB float32 model converts with well under its size in extra memory: only the
    tensor (or row chunk) being written is ever in memory."""
    from safetensors.torch import save_file

    C, L, Vv = 512, 4, 4096
    g = torch.Generator().manual_seed(0)
    sd = {
        "emb.weight": torch.randn(Vv, C, generator=g),
        "head.weight": torch.randn(Vv, C, generator=g),
        "blocks.0.ln0.weight": torch.ones(C),
        "blocks.0.ln0.bias": torch.zeros(C),
        "ln_out.weight": torch.ones(C),
        "ln_out.bias": torch.zeros(C),
    }
    for i in range(L):
        p = f"blocks.{i}."
        sd.update(
            {
                p + "ln1.weight": torch.ones(C),
                p + "ln1.bias": torch.zeros(C),
                p + "ln2.weight": torch.ones(C),
                p + "ln2.bias": torch.zeros(C),
                p + "att.time_decay": torch.randn(C),
                p + "att.time_first": torch.randn(C),
                p + "att.time_mix_k": torch.rand(1, 1, C),
                p + "att.time_mix_v": torch.rand(1, 1, C),
                p + "att.time_mix_r": torch.rand(1, 1, C),
                p + "ffn.time_mix_k": torch.rand(1, 1, C),
                p + "ffn.time_mix_r": torch.rand(1, 1, C),
            }
        )
        for k in ("key", "value", "receptance", "output"):
            sd[p + f"att.{k}.weight"] = torch.randn(C, C, generator=g)
        sd[p + "ffn.key.weight"] = torch.randn(4 * C, C, generator=g)
        sd[p + "ffn.value.weight"] = torch.randn(C, 4 * C, generator=g)
        sd[p + "ffn.receptance.weight"] = torch.randn(C, C, generator=g)
    src = tmp_path / "big.safetensors"
    save_file(sd, src)
    size = sum(t.numel() * 4 for t in sd.values())
    del sd
    monkeypatch.setattr(convert_mod, "CHUNK_ELEMENTS", 1 << 18)
    real, peak = convert_mod._encode, [0]

    def sampling(fmt, x):
        out = real(fmt, x)
        peak[0] = max(peak[0], _rss_anon())
        return out

    monkeypatch.setattr(convert_mod, "_encode", sampling)
    base = _rss_anon()
    for dst, typ in (("big.gguf", "f16"), ("big.bin", "q8_0")):
        convert(src, tmp_path / dst, type=typ, progress=False)
        assert peak[0] - base < size / 4, (dst, (peak[0] - base) >> 20, size >> 20)


# -- command line ------------------------------------------------------------------------------------


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run(
        [sys.executable, "-m", "rwkvpy", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_subprocess(tmp_path):
    out = tmp_path / "m.gguf"
    r = run_cli("convert", pth("v5_2_c192_l2"), out, "--type", "q8_0", "--quiet")
    assert r.returncode == 0 and r.stdout == "" and out.exists(), r.stderr
    assert rwkvpy.formats.read(out).file_types["blocks.0.att.key.weight"] == "Q8_0"
    # errors: one line, exit 1
    r = run_cli("quantize", pth("v5_2_c192_l2"), out, "q4_0")
    assert r.returncode == 1 and r.stderr == (
        f"rwkvpy: error: {out}: already exists; use force=True (--force) to overwrite it\n"
    )


def test_cli_in_process(tmp_path, capsys):
    from rwkvpy.cli import main

    src, b = pth("v6_c192_l2"), tmp_path / "m.bin"
    assert main(["quantize", str(src), str(b), "q5_1", "--quiet"]) == 0
    assert rwkvpy.formats.read(b).file_types["blocks.0.att.key.weight"] == "Q5_1"
    assert main(["quantize", str(src), str(b), "Q4_0", "--force", "--quantize-head"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {b} (rwkv.cpp, Q4_0,") and "Q4_0" in out
    assert rwkvpy.formats.read(b).file_types["head.weight"] == "Q4_0"
    g = tmp_path / "m.gguf"
    assert main(["convert", str(b), str(g), "--type", "bf16", "--tokenizer", "bytes"]) == 0
    assert rwkvpy.formats.read(g).meta["tokenizer"] == "bytes"
    capsys.readouterr()
    for argv, needle in [
        (
            ["convert", str(src), str(tmp_path / "n.gguf"), "--type", "q3_k"],
            "rwkvpy: error: unknown type 'q3_k'; expected one of f32, f16, bf16, q4_0, q4_1, "
            "q5_0, q5_1, q8_0, q4_k, q5_k, q6_k, q4_k_m, q5_k_m\n",
        ),
        (
            ["convert", str(src), str(tmp_path / "n.bin"), "--type", "bf16"],
            f"rwkvpy: error: {tmp_path / 'n.bin'}: rwkv.cpp .bin files cannot hold BF16; use f16 "
            "or f32, or write a .gguf\n",
        ),
        (
            ["convert", str(tmp_path / "missing.pth"), str(tmp_path / "n.gguf")],
            f"rwkvpy: error: {tmp_path / 'missing.pth'}: no such file\n",
        ),
        (
            ["convert", str(src), str(tmp_path / "n.gguf"), "--tokenizer", "sentencepiece"],
            "rwkvpy: error: unknown tokenizer 'sentencepiece'; expected one of world, neox, "
            "bytes\n",
        ),
    ]:
        assert main(argv) == 1
        assert capsys.readouterr().err == needle
    assert sorted(os.listdir(tmp_path)) == ["m.bin", "m.gguf"]
