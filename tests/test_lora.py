"""LoRA merge: W + B @ A * alpha / r in canonical form, for every version and output format."""

import subprocess
import sys

import pytest
import torch

import rwkvpy
from rwkvpy.config import Version
from rwkvpy.errors import ConversionError, OutputExistsError
from rwkvpy.formats import read, to_float32
from rwkvpy.lora import merge_lora
from rwkvpy.synth import random_state_dict

pytestmark = pytest.mark.fast  # the fast tier: needs only the package (pyproject's markers)


def make(tmp_path, version, r=4, seed=0):
    base = random_state_dict(version, 64, 2, 100, seed=seed, dtype=torch.float32)
    torch.save(base, tmp_path / "base.pth")
    g = torch.Generator().manual_seed(seed + 1)
    lora = {
        "blocks.0.att.key.lora_A.weight": torch.randn(r, 64, generator=g),  # with .weight
        "blocks.0.att.key.lora_B.weight": torch.randn(64, r, generator=g),
        "blocks.1.ffn.value.lora_A": torch.randn(
            r, base["blocks.1.ffn.value.weight"].shape[1], generator=g
        ),  # without
        "blocks.1.ffn.value.lora_B": torch.randn(64, r, generator=g),
        "blocks.1.ln1.weight": torch.randn(64, generator=g),  # replaced outright
    }
    torch.save(lora, tmp_path / "lora.pth")
    return base, lora


@pytest.mark.parametrize("version", list(Version))
def test_merge_formula_every_version(tmp_path, version):
    base, lora = make(tmp_path, version)
    report = merge_lora(
        tmp_path / "base.pth",
        tmp_path / "lora.pth",
        tmp_path / "m.gguf",
        alpha=8,
        type="f32",
        progress=False,
    )
    assert sorted(report["merged"]) == ["blocks.0.att.key.weight", "blocks.1.ffn.value.weight"]
    assert report["replaced"] == ["blocks.1.ln1.weight"] and report["unused"] == []
    got = {k: to_float32(v) for k, v in read(tmp_path / "m.gguf").tensors.items()}
    want = base["blocks.0.att.key.weight"] + lora["blocks.0.att.key.lora_B.weight"] @ lora[
        "blocks.0.att.key.lora_A.weight"
    ] * (8 / 4)
    assert torch.allclose(got["blocks.0.att.key.weight"], want, atol=1e-5)
    want = (
        base["blocks.1.ffn.value.weight"]
        + lora["blocks.1.ffn.value.lora_B"] @ lora["blocks.1.ffn.value.lora_A"] * 2
    )
    assert torch.allclose(got["blocks.1.ffn.value.weight"], want, atol=1e-5)
    assert torch.equal(got["blocks.1.ln1.weight"], lora["blocks.1.ln1.weight"])
    assert torch.equal(
        got["blocks.0.att.receptance.weight"], base["blocks.0.att.receptance.weight"]
    )


def test_merged_model_runs_like_manual_merge(tmp_path):
    base, lora = make(tmp_path, Version.V7)
    merge_lora(
        tmp_path / "base.pth",
        tmp_path / "lora.pth",
        tmp_path / "m.bin",
        alpha=8,
        type="f32",
        progress=False,
    )
    manual = dict(base)
    manual["blocks.0.att.key.weight"] = (
        base["blocks.0.att.key.weight"]
        + lora["blocks.0.att.key.lora_B.weight"] @ lora["blocks.0.att.key.lora_A.weight"] * 2
    )
    manual["blocks.1.ffn.value.weight"] = (
        base["blocks.1.ffn.value.weight"]
        + lora["blocks.1.ffn.value.lora_B"] @ lora["blocks.1.ffn.value.lora_A"] * 2
    )
    manual["blocks.1.ln1.weight"] = lora["blocks.1.ln1.weight"]
    torch.save(manual, tmp_path / "manual.pth")
    a, _ = rwkvpy.load(tmp_path / "m.bin", mode="reference").forward([1, 2, 3], all_logits=True)
    b, _ = rwkvpy.load(tmp_path / "manual.pth", mode="reference").forward(
        [1, 2, 3], all_logits=True
    )
    assert (a - b).abs().max() < 1e-4


def test_merge_errors(tmp_path):
    base, lora = make(tmp_path, Version.V6)
    torch.save(
        {
            "blocks.0.att.key.lora_A": torch.zeros(4, 10),
            "blocks.0.att.key.lora_B": torch.zeros(64, 4),
        },
        tmp_path / "bad.pth",
    )
    with pytest.raises(ConversionError, match=r"expected A \(r, 64\) and B \(64, r\)"):
        merge_lora(tmp_path / "base.pth", tmp_path / "bad.pth", tmp_path / "x.gguf", alpha=8)
    torch.save({"nothing.here": torch.zeros(2)}, tmp_path / "none.pth")
    with pytest.raises(ConversionError, match="no tensor of it matches the model"):
        merge_lora(tmp_path / "base.pth", tmp_path / "none.pth", tmp_path / "x.gguf", alpha=8)
    (tmp_path / "exists.gguf").write_bytes(b"x")
    with pytest.raises(OutputExistsError):
        merge_lora(tmp_path / "base.pth", tmp_path / "lora.pth", tmp_path / "exists.gguf", alpha=8)
    from rwkvpy.convert import convert

    convert(tmp_path / "base.pth", tmp_path / "q.gguf", type="q8_0", progress=False)
    with pytest.raises(ConversionError, match="merge a LoRA into a float model"):
        merge_lora(tmp_path / "q.gguf", tmp_path / "lora.pth", tmp_path / "y.gguf", alpha=8)
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


def test_merge_lora_cli(tmp_path):
    make(tmp_path, Version.V5_2)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "rwkvpy",
            "merge-lora",
            tmp_path / "base.pth",
            tmp_path / "lora.pth",
            tmp_path / "m.gguf",
            "--alpha",
            "16",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert rwkvpy.inspect(tmp_path / "m.gguf").version is Version.V5_2
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "rwkvpy",
            "merge-lora",
            tmp_path / "base.pth",
            tmp_path / "lora.pth",
            tmp_path / "m.gguf",
            "--alpha",
            "16",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        r.returncode == 1
        and r.stderr.startswith("rwkvpy: error: ")
        and "already exists" in r.stderr
    )
