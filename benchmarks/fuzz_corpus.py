"""Make the fuzzers' seed corpus (tests/fuzz_corpus/): small valid files of every kind of input,
from rwkvpy.synth's random models and rwkvpy's own writers, and the context files the targets
read besides their input (``_context``: the base model, a saved chat's state, an HF folder's
weights). Run once; the files are committed (about 1 MB in all).

    python -m benchmarks.fuzz_corpus
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from benchmarks.fuzz_targets import CONTEXT, CORPUS


def _pth(path, version, n_embd=32, vocab=16, dtype=None, head_size=16, seed=1):
    import torch

    from rwkvpy.synth import random_state_dict

    sd = random_state_dict(
        version, n_embd, 1, vocab, head_size=head_size, seed=seed, dtype=dtype or torch.float16
    )
    torch.save(sd, path)
    return sd


def _world_lines(n_extra=60):
    from rwkvpy.tokenizers import default_world_vocab_path

    lines = default_world_vocab_path().read_text(encoding="utf-8").split("\n")
    keep = lines[:256]  # the single bytes
    multi = [ln for ln in lines[256:] if ln.strip()]
    keep += multi[:: len(multi) // n_extra][:n_extra]  # a spread of longer tokens
    return keep


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["Hello, world! The quick brown fox jumps over the lazy dog. 你好，世界。"] * 20
    tok.train_from_iterator(text, trainer)
    return tok.to_str()


def _kv_gguf(path, vocab):
    import gguf

    from rwkvpy.formats.gguf import _add_vocab

    w = gguf.GGUFWriter(str(path), "rwkv7")
    _add_vocab(w, vocab)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make_corpus():
    import torch
    from safetensors.torch import save_file

    import rwkvpy
    from rwkvpy import Version
    from rwkvpy.chat import ChatSession
    from rwkvpy.convert import convert
    from rwkvpy.formats import gguf as rg
    from rwkvpy.sampling import SamplingParams
    from rwkvpy.tokenizers import ByteTokenizer

    def out(target, name):
        d = CORPUS / target
        d.mkdir(parents=True, exist_ok=True)
        return d / name

    CONTEXT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp())
    try:
        base_sd = _pth(CONTEXT / "base.pth", Version.V7, vocab=256)
        save_file(
            {
                k: v.contiguous()
                for k, v in torch.load(CONTEXT / "base.pth", weights_only=True).items()
            },
            str(CONTEXT / "model.safetensors"),
        )
        model = rwkvpy.load(CONTEXT / "base.pth", cache=False)
        # models: each format, a few versions and tensor types
        for v, tag in (
            (Version.V4, "v4"),
            (Version.V5_2, "v5"),
            (Version.V6, "v6"),
            (Version.V7, "v7"),
        ):
            _pth(tmp / f"{tag}.pth", v)
        shutil.copy(tmp / "v6.pth", out("pth", "v6-f16.pth"))
        _pth(out("pth", "v7-bf16.pth"), Version.V7, dtype=torch.bfloat16)
        torch.save(
            torch.load(tmp / "v4.pth", weights_only=True),
            out("pth", "v4-legacy.pth"),
            _use_new_zipfile_serialization=False,
        )  # the pre-zip format
        convert(tmp / "v7.pth", out("gguf", "v7-q8_0.gguf"), type="q8_0", progress=False)
        convert(tmp / "v5.pth", out("gguf", "v5-f16.gguf"), type="f16", progress=False)
        convert(tmp / "v4.pth", out("bin", "v4-f16.bin"), type="f16", progress=False)
        convert(tmp / "v7.pth", out("bin", "v7-q5_1.bin"), type="q5_1", progress=False)
        sd = torch.load(tmp / "v6.pth", weights_only=True)
        save_file(
            {k: v.contiguous() for k, v in sd.items()}, str(out("safetensors", "v6.safetensors"))
        )
        # an HF folder's config.json (the weights are the context's)
        out("hf-config", "rwkv7.json").write_text(
            json.dumps(
                {
                    "architectures": ["RWKV7ForCausalLM"],
                    "model_type": "rwkv7",
                    "vocab_size": 256,
                    "hidden_size": 32,
                    "num_hidden_layers": 1,
                    "head_dim": 16,
                    "rescale_every": 0,
                    "tie_word_embeddings": False,
                },
                indent=2,
            )
        )
        # a saved state and a saved chat of the base model
        model.forward([1, 2, 3])[1].save(out("state", "v7.state"))
        session = ChatSession(
            model, ByteTokenizer(), SamplingParams(max_tokens=4, seed=1, temperature=1.0)
        )
        "".join(session.say("hi"))  # the reply, read to its end (so committed)
        session.save(out("chat", "chat.state"))  # one file: the state holding the transcript
        # the older two-file layout (still read): a plain state and its transcript
        session.state.save(CONTEXT / "chat.state")
        legacy = {
            "format": "rwkvpy-chat",
            "version": 1,
            "model_fingerprint": model.fingerprint,
            "tokenizer": "bytes",
            "system": None,
            "messages": session.messages,
            "tokens": session.tokens,
            "last_turn": None,
            "state_sha256": hashlib.sha256((CONTEXT / "chat.state").read_bytes()).hexdigest(),
        }
        out("chat", "chat.json").write_text(json.dumps(legacy))
        # a LoRA checkpoint for the base model: a low-rank pair and a replaced vector
        g = torch.Generator().manual_seed(2)
        lora = {
            "blocks.0.att.receptance.lora_A.weight": torch.randn(4, 32, generator=g),
            "blocks.0.att.receptance.lora_B.weight": torch.randn(32, 4, generator=g) * 0.1,
            "blocks.0.ffn.key.lora_A": torch.randn(4, 32, generator=g).half(),
            "blocks.0.ffn.key.lora_B": torch.randn(128, 4, generator=g).half(),
            "blocks.0.ln1.weight": base_sd["blocks.0.ln1.weight"].float() * 1.1,
        }
        torch.save(lora, out("lora", "lora.pth"))
        # vocabularies
        lines = _world_lines()
        out("world-vocab", "vocab.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        js = _tokenizer_json()
        out("tokenizer-json", "tokenizer.json").write_text(js, encoding="utf-8")
        from rwkvpy.tokenizers.world import read_world_vocab

        v = read_world_vocab(out("world-vocab", "vocab.txt"))
        tokens = [b""] * (max(v) + 1)
        for i, t in v.items():
            tokens[i] = t
        # the ids of the spread reach far: renumber them densely for a 512-token model
        dense = [b""] + [t for t in tokens[1:] if t][:400]
        _kv_gguf(out("gguf-vocab", "world.gguf"), rg.world_vocab(dense, 512))
        _kv_gguf(out("gguf-vocab", "neox.gguf"), rg.neox_vocab(js, 512))
        _kv_gguf(out("gguf-vocab", "bytes.gguf"), rg.bytes_vocab(512))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file())
    print(f"corpus written to {CORPUS}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    os.environ.setdefault("RWKVPY_CACHE_DIR", tempfile.mkdtemp())
    make_corpus()
