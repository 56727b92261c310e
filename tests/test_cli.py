"""The CLI, run for real in a subprocess."""

import json
import subprocess
import sys

from conftest import fixture_path


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "rwkvpy", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_info_bin():
    r = run("info", fixture_path("rwkv-cpp-tiny", "tiny-rwkv-5v2-730K-Q5_1.bin"))
    assert r.returncode == 0, r.stderr
    assert "RWKV v5.2" in r.stdout
    assert "n_embd 64, n_layer 12, vocab 256, ffn 256, 8 heads of 8" in r.stdout
    assert "Q5_1" in r.stdout and "F32" in r.stdout
    assert "tokenizer:   bytes (from the vocabulary size)" in r.stdout


def test_info_json_pth():
    r = run("info", "--json", fixture_path("reference-pth", "v7_c192_l2.pth"))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["version"] == "7" and info["n_head"] == 3 and info["head_size"] == 64
    assert info["tensor_types"] == {"BF16": 72}
    assert info["params"] == 1310592
    assert info["file_size"] == fixture_path("reference-pth", "v7_c192_l2.pth").stat().st_size


def test_user_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"hello world, not a model")
    for args in (["info", bad], ["info", tmp_path / "missing.bin"], ["info", tmp_path]):
        r = run(*args)
        assert r.returncode == 1
        assert "Traceback" not in r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rwkvpy: error: "), r.stderr


def test_console_script_entry_point():
    from importlib.metadata import entry_points

    eps = [e for e in entry_points(group="console_scripts") if e.name == "rwkvpy"]
    assert eps and eps[0].value == "rwkvpy.cli:main"


def test_bench_json():
    r = run(
        "bench",
        fixture_path("rwkv-cpp-tiny", "tiny-rwkv-7v0-834K-Q5_1.bin"),
        "--json",
        "--tokens",
        "30",
        "--prompt",
        "16",
        "--threads",
        "1",
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    for key in (
        "per_token_ms",
        "prompt_tokens_per_s",
        "load_s",
        "peak_rss_mb",
        "bandwidth_gbs",
        "bound_ms",
        "threads",
        "type",
    ):
        assert key in res
    assert res["type"] == "Q5_1" and res["threads"] == 1 and res["tokens_timed"] == 30
    assert res["bandwidth_gbs"] > 0 and res["bound_ms"] > 0
    # the CPU's bandwidth: the faster of two reads, both reported
    reads = res["bandwidth_by_read_gbs"]
    assert set(reads) == {"torch.sum", "4 streams"} and min(reads.values()) > 0
    assert res["bandwidth_gbs"] == max(reads.values())
    assert abs(res["bound_ms"] - res["bytes_per_token"] / res["bandwidth_gbs"] / 1e6) < 1e-2
    # bytes read per token: every projection + vectors + one embedding row, as stored
    assert 500_000 < res["bytes_per_token"] < 3_500_000


def test_model_reference_the_same_in_every_verb(tmp_path):
    """Every verb takes its model as -m MODEL or as the first positional argument, and 'demo'
    (the model shipped in the package) wherever a model is taken; the two forms give the same
    output, a model given both ways is one readable error."""
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x\n")
    forms = {
        "info": (["info", "demo"], ["info", "-m", "demo"]),
        "generate": (
            ["generate", "demo", "def", "--max-tokens", "6", "--seed", "1", "--quiet"],
            ["generate", "-m", "demo", "def", "--max-tokens", "6", "--seed", "1", "--quiet"],
        ),
        "tokenize": (["tokenize", "demo", text], ["tokenize", "-m", "demo", text]),
        "perplexity": (
            ["perplexity", "demo", text, "--json", "--quiet"],
            ["perplexity", "-m", "demo", text, "--json", "--quiet"],
        ),
    }
    for verb, (positional, option) in forms.items():
        a, b = run(*positional), run(*option)
        assert a.returncode == 0 and b.returncode == 0, (verb, a.stderr, b.stderr)
        if verb == "perplexity":  # the same numbers (the timing differs)
            ja, jb = json.loads(a.stdout), json.loads(b.stdout)
            assert ja["nll"] == jb["nll"] and ja["tokens"] == jb["tokens"]
        else:
            assert a.stdout == b.stdout and a.stdout, verb
    for verb, dst, extra in (("convert", "c.gguf", []), ("quantize", "q.gguf", ["q8_0"])):
        r = run(verb, "demo", tmp_path / dst, *extra, "--quiet")
        assert r.returncode == 0 and (tmp_path / dst).stat().st_size > 0, r.stderr
    r = run("info", "--json", tmp_path / "q.gguf")
    assert json.loads(r.stdout)["n_layer"] == 4
    for args, msg in (
        (["generate", "-m", "demo", "x", "y"], "the model is given twice"),
        (["bench"], "no model given: usage: rwkvpy bench [MODEL | -m MODEL]"),
        (["convert", "demo"], "no model given: usage: rwkvpy convert [MODEL | -m MODEL] DST"),
        (["info", "demo", "x"], "expected 0 or 1 arguments, got 2"),
    ):
        r = run(*args)
        assert r.returncode == 1 and "Traceback" not in r.stderr and msg in r.stderr, r.stderr


def test_version():
    from importlib.metadata import version

    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"rwkvpy {version('rwkvpy')}"
