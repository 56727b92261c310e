"""Random-weight RWKV checkpoints with the names and shapes of BlinkDL's releases.

For benchmarks and tests: a model of a real size (e.g. v7 0.1B = 768 x 12, vocab 65536) can be
made on any machine without a download. The weights are random, so the text is noise, but the
work per token and the bytes read per token are those of the real model.
"""

from __future__ import annotations

import math

import torch

from .config import Version

# name -> (version, n_embd, n_layer, vocab): the shapes of released models
PRESETS = {
    "v4-169m": (Version.V4, 768, 12, 50277),
    "v5-0.4b": (Version.V5_2, 1024, 24, 65536),
    "v6-1.6b": (Version.V6, 2048, 24, 65536),
    "v7-0.1b": (Version.V7, 768, 12, 65536),
    "v7-0.4b": (Version.V7, 1024, 24, 65536),
    "v7-1.5b": (Version.V7, 2048, 24, 65536),
}


def _lora_dims_v7(C: int) -> tuple:
    # BlinkDL's formulas (RWKV-LM v7 train code): multiples of 32 around C^0.5 .. C^0.8
    def r32(x):
        return max(32, int(round(x / 32)) * 32)

    return r32(1.8 * C**0.5), r32(1.8 * C**0.5), r32(1.3 * C**0.5), r32(0.6 * C**0.8)


def random_state_dict(
    version: Version,
    n_embd: int,
    n_layer: int,
    vocab: int,
    head_size: int = 64,
    n_ffn: int | None = None,
    seed: int = 0,
    dtype=torch.bfloat16,
) -> dict:
    """A state dict in BlinkDL's layout with random weights of plausible scale."""
    g = torch.Generator().manual_seed(seed)
    C = n_embd
    H = C // head_size if version is not Version.V4 else 0
    N = head_size
    if n_ffn is None:
        n_ffn = (
            4 * C if version in (Version.V4, Version.V5_0, Version.V7) else int(C * 3.5) // 32 * 32
        )

    def randn(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    def uniform(*shape, lo=0.0, hi=1.0):
        return torch.rand(*shape, generator=g) * (hi - lo) + lo

    def mat(out, inp):
        return randn(out, inp, std=1.0 / math.sqrt(inp))

    def vec3(x):
        return x.reshape(1, 1, -1)

    sd = {
        "emb.weight": randn(vocab, C),
        "blocks.0.ln0.weight": uniform(C, lo=0.8, hi=1.2),
        "blocks.0.ln0.bias": randn(C, std=0.1),
    }
    for i in range(n_layer):
        p, a, f = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
        for ln in ("ln1", "ln2"):
            sd[p + ln + ".weight"] = uniform(C, lo=0.8, hi=1.2)
            sd[p + ln + ".bias"] = randn(C, std=0.1)
        for m in ("key", "value", "receptance", "output"):
            sd[a + m + ".weight"] = mat(C, C)
        sd[f + "key.weight"] = mat(n_ffn, C)
        sd[f + "value.weight"] = mat(C, n_ffn)
        if version is not Version.V7:
            sd[f + "receptance.weight"] = mat(C, C)
        if version in (Version.V4, Version.V5_0, Version.V5_2):
            for m in ("k", "v", "r") + (("g",) if version is Version.V5_2 else ()):
                sd[a + "time_mix_" + m] = vec3(uniform(C))
            sd[f + "time_mix_k"], sd[f + "time_mix_r"] = vec3(uniform(C)), vec3(uniform(C))
        if version is Version.V4:
            sd[a + "time_decay"] = uniform(C, lo=-3, hi=1)
            sd[a + "time_first"] = uniform(C, lo=-1, hi=1)
        elif version is Version.V5_0:
            sd[a + "time_decay"] = randn(H, std=0.5, mean=-1)
            sd[a + "time_first"] = uniform(H, lo=-1, hi=1)
        elif version is Version.V5_2:
            sd[a + "time_decay"] = randn(H, N, std=0.5, mean=-1)
            sd[a + "time_faaaa"] = uniform(H, N, lo=-1, hi=1)
            sd[a + "gate.weight"] = mat(C, C)
        elif version is Version.V6:
            D, D2 = (32, 64) if C < 4096 else (64, 128)
            for m in "xwkvrg":
                sd[a + "time_maa_" + m] = vec3(uniform(C))
            sd[a + "time_maa_w1"] = randn(C, 5 * D, std=0.1)
            sd[a + "time_maa_w2"] = randn(5, D, C, std=0.1)
            sd[a + "time_decay"] = vec3(randn(C, std=0.5, mean=-1))
            sd[a + "time_decay_w1"] = randn(C, D2, std=0.1)
            sd[a + "time_decay_w2"] = randn(D2, C, std=0.1)
            sd[a + "time_faaaa"] = uniform(H, N, lo=-1, hi=1)
            sd[a + "gate.weight"] = mat(C, C)
            sd[f + "time_maa_k"], sd[f + "time_maa_r"] = vec3(uniform(C)), vec3(uniform(C))
        if version in (Version.V5_0, Version.V5_2, Version.V6, Version.V7):
            sd[a + "ln_x.weight"] = uniform(C, lo=0.8, hi=1.2)
            sd[a + "ln_x.bias"] = randn(C, std=0.1)
        if version is Version.V7:
            dw, da, dv, dg = _lora_dims_v7(C)
            for m in "rwkvag":
                sd[a + "x_" + m] = vec3(uniform(C))
            sd[a + "w0"] = vec3(randn(C, std=0.5, mean=-1))
            sd[a + "w1"], sd[a + "w2"] = randn(C, dw, std=0.1), randn(dw, C, std=0.1)
            sd[a + "a0"] = vec3(randn(C, std=0.5))
            sd[a + "a1"], sd[a + "a2"] = randn(C, da, std=0.1), randn(da, C, std=0.1)
            sd[a + "v0"] = vec3(randn(C, std=0.5))
            sd[a + "v1"], sd[a + "v2"] = randn(C, dv, std=0.1), randn(dv, C, std=0.1)
            sd[a + "g1"], sd[a + "g2"] = randn(C, dg, std=0.1), randn(dg, C, std=0.1)
            sd[a + "k_k"] = vec3(uniform(C, lo=0.5, hi=1.0))
            sd[a + "k_a"] = vec3(uniform(C))
            sd[a + "r_k"] = randn(H, N, std=0.1)
            sd[f + "x_k"] = vec3(uniform(C))
    sd["ln_out.weight"] = uniform(C, lo=0.8, hi=1.2)
    sd["ln_out.bias"] = randn(C, std=0.1)
    sd["head.weight"] = mat(vocab, C)
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def save_random_model(
    path,
    preset: str | None = None,
    *,
    version: Version | None = None,
    n_embd: int = 0,
    n_layer: int = 0,
    vocab: int = 0,
    seed: int = 0,
    dtype=torch.bfloat16,
) -> str:
    """Write a random checkpoint as a BlinkDL .pth (atomically) and return its path."""
    from .formats.atomic import atomic_write

    if preset is not None:
        version, n_embd, n_layer, vocab = PRESETS[preset]
    sd = random_state_dict(version, n_embd, n_layer, vocab, seed=seed, dtype=dtype)
    with atomic_write(path) as f:
        torch.save(sd, f)
    return str(path)
