"""The demo model shipped in the package (trained by tools/train_demo.py)."""

import subprocess
import sys

import pytest

import rwkvpy
from rwkvpy.demo import demo_model_path, held_out_text
from rwkvpy.perplexity import perplexity

pytestmark = pytest.mark.fast  # the fast tier: needs only the package (pyproject's markers)

# Measured on 2026-12-06 (Python 3.11.7's pydoc_data): 2.503 per byte on the held-out 5 %
# (the documentation-only model before the chat fine-tune: 2.497). Byte-uniform guessing
# scores 256.
PPL_BOUND = 2.6


def test_demo_model_ships_and_loads():
    path = demo_model_path()
    assert path.endswith(".gguf")
    model = rwkvpy.load("demo", threads=1)
    assert model.info.version is rwkvpy.Version.V7 and model.config.vocab_size == 256
    assert model.info.file_meta["tokenizer"] == "bytes"


def test_demo_held_out_perplexity():
    model = rwkvpy.load("demo", threads=1)
    tokens = list(held_out_text().encode("utf-8"))
    r = perplexity(model, tokens)
    assert r.tokens == len(tokens) - 1
    assert r.perplexity < PPL_BOUND


def test_demo_generates_deterministically():
    model = rwkvpy.load("demo", threads=1)
    params = rwkvpy.SamplingParams(max_tokens=60, seed=3, temperature=0.8)
    a = model.generate("The for statement", params)
    assert a == model.generate("The for statement", params)
    assert len(a.encode("utf-8")) >= 30
    assert a != model.generate(
        "The for statement", rwkvpy.SamplingParams(max_tokens=60, seed=4, temperature=0.8)
    )


def test_generate_without_model_uses_demo():
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "rwkvpy",
            "generate",
            "The while loop",
            "--max-tokens",
            "20",
            "--seed",
            "1",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "using the built-in demo model" in r.stderr
    assert len(r.stdout) > 0
