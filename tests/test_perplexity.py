"""Perplexity: the chunked sequence-mode scorer against token-by-token scoring through the API,
--ignore-first, chunk boundaries, and the ``rwkvpy perplexity`` command's output and errors
(run as the command line runs it: ``rwkvpy.cli.main`` in a subprocess)."""

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import fixture_path

import rwkvpy
from rwkvpy.cli import main as main_for_tests
from rwkvpy.errors import TokenError
from rwkvpy.perplexity import PerplexityError, perplexity

MAIN = (
    "import sys; from rwkvpy.cli import main as main_for_tests; "
    "sys.exit(main_for_tests(sys.argv[1:]))"
)

TEXT = (
    "In the beginning the quick brown fox jumps over the lazy dog. Beautiful is better than "
    "ugly. Explicit is better than implicit. Simple is better than complex. Readability "
    "counts, and the rest of the sentence goes on to the end of the line.\n"
)

# every tiny trained model; 6v0-3m exists only quantized
MODELS = {
    "4v0-660K": "FP32",
    "5v1-730K": "FP32",
    "5v2-730K": "FP32",
    "6v0-3m": "Q5_1",
    "7v0-834K": "FP32",
}


def tiny(name, kind=None):
    return str(fixture_path("rwkv-cpp-tiny", f"tiny-rwkv-{name}-{kind or MODELS[name]}.bin"))


@pytest.fixture(scope="module")
def tokens():
    return list(TEXT.encode("utf-8"))


@pytest.fixture(scope="module")
def v5(tokens):
    return rwkvpy.load(tiny("5v2-730K"), threads=1)


def token_by_token_nlls(model, toks):
    """NLL (nats) of toks[i+1] after toks[0..i], one model.forward call per token."""
    out, state = [], None
    for i in range(len(toks) - 1):
        logits, state = model.forward([toks[i]], state)
        out.append(-float(torch.log_softmax(logits.double(), -1)[toks[i + 1]]))
    return out


@pytest.fixture(scope="module")
def v5_nlls(v5, tokens):
    return token_by_token_nlls(v5, tokens)


# -- the library ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_equals_token_by_token(name, tokens):
    # exact mode: mode "fast" multiplies Q5 weights as int8 rows for one token and exactly for
    # chunks, so its two ways differ by that rounding (tests/test_fast_paths.py bounds it)
    model = rwkvpy.load(tiny(name), threads=1, mode="exact")
    toks = tokens[:100]
    nlls = token_by_token_nlls(model, toks)
    r = perplexity(model, toks, chunk=40)
    mean = sum(nlls) / len(nlls)
    assert r.tokens == len(toks) - 1 == len(nlls) and r.tokens_total == len(toks)
    assert abs(r.nll - mean) < 1e-4
    assert r.perplexity == pytest.approx(math.exp(r.nll), rel=1e-12)
    assert abs(math.log(r.perplexity) - mean) < 1e-4
    assert r.tokens_per_s > 0 and r.seconds > 0 and r.chunk == 40


@pytest.mark.parametrize("n", [0, 1, 2, 37, 100, len(TEXT) - 1])
def test_ignore_first(v5, tokens, v5_nlls, n):
    r = perplexity(v5, tokens, ignore_first=n)
    start = max(n, 1)  # token 0 never has a prediction
    assert r.tokens == len(tokens) - start and r.ignored == start
    want = v5_nlls[start - 1 :]  # v5_nlls[i] scores token i+1
    assert len(want) == r.tokens
    assert abs(r.nll - sum(want) / len(want)) < 1e-4
    assert r.nll_sum == pytest.approx(r.nll * r.tokens, rel=1e-12)


def test_chunk_boundaries_do_not_change_the_result(v5, tokens):
    toks = tokens[:120]
    runs = [
        perplexity(v5, toks, chunk=c, ignore_first=ig) for c in (1, 7, 64, 512) for ig in (0, 30)
    ]
    for ig in (0, 30):
        nlls = [r.nll for r in runs if r.ignored == max(ig, 1)]
        assert max(nlls) - min(nlls) < 1e-5, nlls
    assert {r.chunk for r in runs} == {1, 7, 64, 512}


def test_progress_callable_sees_every_fed_token(v5, tokens):
    seen = []
    perplexity(v5, tokens[:100], chunk=40, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(40, 99), (80, 99), (99, 99)]  # the last token is never fed


def test_tensor_and_array_tokens(v5, tokens):
    import numpy as np

    a = perplexity(v5, tokens[:60]).nll
    assert perplexity(v5, torch.tensor(tokens[:60])).nll == pytest.approx(a, abs=1e-9)
    assert perplexity(v5, np.array(tokens[:60], dtype=np.int32)).nll == pytest.approx(a, abs=1e-9)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tokens": []}, "no tokens"),
        ({"tokens": [5]}, "at least 2"),
        ({"tokens": [5, 6, 7], "ignore_first": 3}, "ignoring the first 3 leaves none"),
        ({"tokens": [5, 6, 7], "chunk": 0}, "chunk must be at least 1"),
        ({"tokens": [5, 6, 7], "ignore_first": -1}, "ignore_first must be at least 0"),
        ({"tokens": [[5, 6]]}, "1-D"),
        ({"tokens": [0.5, 1.0]}, "ints"),
    ],
)
def test_library_errors(v5, kwargs, match):
    with pytest.raises(PerplexityError, match=match):
        perplexity(v5, **kwargs)


def test_out_of_vocabulary_token_fails_before_any_work(v5):
    calls = []
    with pytest.raises(TokenError, match="token id 300"):
        perplexity(v5, [1, 2, 300], progress=lambda *a: calls.append(a))
    assert calls == []


# -- the command ----------------------------------------------------------------------------------
def run_cli(*args):
    return subprocess.Popen(
        [sys.executable, "-c", MAIN, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
    )


def finish(p, timeout=120):
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def test_cli_json_matches_the_library(tmp_path, v5, tokens):
    f = tmp_path / "t.txt"
    f.write_text(TEXT, encoding="utf-8")
    rc, out, err = finish(
        run_cli(
            "perplexity",
            "-m",
            tiny("5v2-730K"),
            str(f),
            "--json",
            "--ignore-first",
            "20",
            "--max-tokens",
            "150",
            "--chunk",
            "64",
            "--threads",
            "1",
        )
    )
    assert rc == 0, err
    assert err == ""  # --json: no progress bar
    assert out.count("\n") == 1
    d = json.loads(out)
    want = perplexity(v5, tokens[:150], ignore_first=20)
    assert d["tokens"] == 130 == want.tokens and d["tokens_total"] == 150
    assert abs(d["nll"] - want.nll) < 1e-5
    assert d["perplexity"] == pytest.approx(math.exp(d["nll"]))
    assert d["tokens_per_s"] > 0 and d["tokenizer"] == "bytes" and d["chunk"] == 64


def test_cli_report_and_quiet(tmp_path, capsys, v5, tokens):
    f = tmp_path / "t.txt"
    f.write_text(TEXT, encoding="utf-8")
    rc = main_for_tests(["perplexity", "-m", tiny("5v2-730K"), str(f), "--quiet", "--threads", "1"])
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""
    want = perplexity(v5, tokens)
    assert f"perplexity:  {want.perplexity:.4f}" in out
    assert f"scored:      {len(tokens) - 1} tokens" in out and "tokens/s" in out


def test_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good text, then \xff\xfe bad bytes")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    short = tmp_path / "short.txt"
    short.write_text("hello", encoding="utf-8")
    m = tiny("5v2-730K")
    cases = {  # run side by side: each is mostly interpreter start-up
        "utf8": (
            ["perplexity", "-m", m, str(bad)],
            f"{bad}: not a UTF-8 text file: invalid byte 0xff at byte offset 16",
        ),
        "empty": (["perplexity", "-m", m, str(empty)], f"{empty}: the file is empty"),
        "short": (
            ["perplexity", "-m", m, str(short), "--ignore-first", "10"],
            (
                f"{short} has 5 tokens; ignoring the first 10 leaves none to score "
                "(at least 11 tokens are needed)"
            ),
        ),
    }
    procs = {k: run_cli(*argv) for k, (argv, _) in cases.items()}
    for k, p in procs.items():
        rc, out, err = finish(p)
        assert rc == 1, (k, err)
        assert out == "" and err.count("\n") == 1 and err.startswith("rwkvpy: error: "), (k, err)
        assert cases[k][1] in err, (k, err)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-tokens", "1"], "{short} cut at --max-tokens 1 has 1 token; at least 2 are needed"),
        (["--ignore-first", "5"], "{short} has 5 tokens; ignoring the first 5 leaves none"),
        (["-m", "{tmp}/nope.bin"], "{tmp}/nope.bin: no such model file"),
        (
            ["--tokenizer", "world", "--vocab", "{tmp}/v.txt"],
            "does not fit a model with vocab size 256",
        ),
    ],
)
def test_cli_more_errors(tmp_path, capsys, argv, message):
    short = tmp_path / "short.txt"
    short.write_text("hello", encoding="utf-8")
    argv = [a.format(tmp=tmp_path) for a in argv]
    rc = main_for_tests(["perplexity", "-m", tiny("5v2-730K"), str(short), *argv])
    out, err = capsys.readouterr()
    assert rc == 1 and out == "" and err.count("\n") == 1, err
    assert err.startswith("rwkvpy: error: ") and message.format(short=short, tmp=tmp_path) in err


def test_cli_missing_text_file(tmp_path, capsys):
    rc = main_for_tests(["perplexity", "-m", tiny("5v2-730K"), str(tmp_path / "no.txt")])
    _, err = capsys.readouterr()
    assert rc == 1 and err == f"rwkvpy: error: {tmp_path / 'no.txt'}: no such file\n"
