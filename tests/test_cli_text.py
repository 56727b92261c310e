"""The text commands (generate, chat, tokenize) and hf: model specs, run as the command line
runs them: ``rwkvpy.cli.main`` in a subprocess (and in-process where that is
enough), on the tiny trained RWKV byte models."""

import hashlib
import json
import os
import subprocess
import sys
import types

import pytest
import torch
from conftest import fixture_path

import rwkvpy
from rwkvpy.cli import main as main_for_tests
from rwkvpy.cli.text import _show_reply
from rwkvpy.generate import generate
from rwkvpy.hub import HubError, parse_hf_spec, resolve_model
from rwkvpy.sampling import SamplingParams
from rwkvpy.tokenizers import ByteTokenizer

MAIN = (
    "import sys; from rwkvpy.cli import main as main_for_tests; "
    "sys.exit(main_for_tests(sys.argv[1:]))"
)


@pytest.fixture(scope="module")
def v7():
    return str(fixture_path("rwkv-cpp-tiny", "tiny-rwkv-7v0-834K-FP32.bin"))


# Subprocesses run in --mode reference: the same results, without the seconds it takes to
# import numba and load the compiled kernels (in-process comparisons use the same mode).
def run_cli(*args, stdin="", env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-c", MAIN, *args],
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=timeout,
        check=False,
    )


def cli(capsys, *args):
    rc = main_for_tests(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


# -- generate -----------------------------------------------------------------------------
def test_generate_same_seed_same_text(v7, capsys):
    args = [
        "generate",
        "-m",
        v7,
        "In the beginning",
        "--seed",
        "7",
        "--max-tokens",
        "20",
        "--temperature",
        "0.9",
        "--mode",
        "reference",
        "--threads",
        "1",
    ]
    p = run_cli(*args, "--quiet")
    assert p.returncode == 0, p.stderr
    assert p.stderr == "" and p.stdout.endswith("\n") and len(p.stdout) > 1
    rc, out, err = cli(capsys, *args)
    assert rc == 0 and out == p.stdout
    assert "20 generated" in err and "finish: length" in err and "seed 7" in err
    rc, other, _ = cli(capsys, *args[:-6], "--seed", "8", "--max-tokens", "20", "--quiet")
    assert rc == 0 and other != out


def test_generate_json_and_stop(v7, capsys):
    model = rwkvpy.load(v7, threads=1)
    greedy = generate(model, ByteTokenizer(), "In the", SamplingParams(greedy=True, max_tokens=12))
    rc, out, _ = cli(
        capsys,
        "generate",
        "-m",
        v7,
        "In the",
        "--greedy",
        "--max-tokens",
        "12",
        "--json",
        "--threads",
        "1",
    )
    assert rc == 0
    obj = json.loads(out)
    assert set(obj) >= {
        "text",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "prompt_tokens_per_s",
        "tokens_per_s",
        "seconds",
    }
    assert (obj["text"], obj["finish_reason"], obj["prompt_tokens"], obj["completion_tokens"]) == (
        greedy.text,
        "length",
        6,
        12,
    )
    assert obj["tokens_per_s"] > 0 and obj["prompt_tokens_per_s"] > 0 and obj["seconds"] > 0
    stop = greedy.text[3:6]
    rc, out, _ = cli(
        capsys,
        "generate",
        "-m",
        v7,
        "In the",
        "--greedy",
        "--max-tokens",
        "12",
        "--json",
        "--threads",
        "1",
        "--stop",
        "zz",
        "--stop",
        stop,
    )
    obj = json.loads(out)
    assert (obj["text"], obj["finish_reason"]) == (greedy.text[: greedy.text.find(stop)], "stop")
    # escapes in --stop: "\n" is a newline
    rc, out, _ = cli(
        capsys,
        "generate",
        "-m",
        v7,
        "Hi",
        "--max-tokens",
        "10",
        "--json",
        "--threads",
        "1",
        "--seed",
        "1",
        "--stop",
        "\\n",
        "--temperature",
        "0.7",
        "--top-k",
        "3",
        "--top-p",
        "0.9",
        "--min-p",
        "0.01",
        "--presence-penalty",
        "0.1",
        "--frequency-penalty",
        "0.1",
        "--penalty-decay",
        "0.99",
    )
    assert rc == 0 and "\n" not in json.loads(out)["text"]


def test_generate_states(v7, capsys, tmp_path):
    model = rwkvpy.load(v7, threads=1)
    tok = ByteTokenizer()
    saved = tmp_path / "s.state"
    rc, out, _ = cli(
        capsys,
        "generate",
        "-m",
        v7,
        "The sea",
        "--greedy",
        "--max-tokens",
        "5",
        "--save-state",
        str(saved),
        "--quiet",
        "--threads",
        "1",
    )
    assert rc == 0 and saved.exists()
    first = generate(model, tok, "The sea", SamplingParams(greedy=True, max_tokens=5))
    assert out == first.text + "\n"
    rc, out, _ = cli(
        capsys,
        "generate",
        "-m",
        v7,
        " and",
        "--greedy",
        "--max-tokens",
        "5",
        "--state",
        str(saved),
        "--quiet",
        "--threads",
        "1",
    )
    cont = generate(
        model, tok, " and", SamplingParams(greedy=True, max_tokens=5), state=first.state
    )
    assert rc == 0 and out == cont.text + "\n"
    # a state of another model, a missing state file
    v4 = str(fixture_path("rwkv-cpp-tiny", "tiny-rwkv-4v0-660K-FP32.bin"))
    rc, _, err = cli(capsys, "generate", "-m", v4, "x", "--state", str(saved), "--threads", "1")
    assert rc == 1 and err.startswith("rwkvpy: error: ") and err.count("\n") == 1
    rc, _, err = cli(capsys, "generate", "-m", v7, "x", "--state", str(tmp_path / "nope"))
    assert rc == 1 and "no such state file" in err
    # a BlinkDL state-tuning file (v5.2): all zeros starts like a fresh state
    v5 = str(fixture_path("rwkv-cpp-tiny", "tiny-rwkv-5v2-730K-FP32.bin"))
    c = rwkvpy.load(v5, threads=1).config
    tuned = tmp_path / "tuned.pth"
    torch.save(
        {
            f"blocks.{i}.att.time_state": torch.zeros(c.n_head, c.head_size, c.head_size)
            for i in range(c.n_layer)
        },
        tuned,
    )
    args = [
        "generate",
        "-m",
        v5,
        "Hello",
        "--greedy",
        "--max-tokens",
        "5",
        "--quiet",
        "--threads",
        "1",
    ]
    rc, plain, _ = cli(capsys, *args)
    rc2, from_tuned, _ = cli(capsys, *args, "--state", str(tuned))
    assert rc == rc2 == 0 and plain == from_tuned


def test_generate_user_errors(v7, capsys, tmp_path, monkeypatch):
    for args, msg in [
        (["generate", "-m", v7, "x", "--temperature", "-1"], "temperature"),
        (["generate", "-m", v7, ""], "empty"),
        (["generate", "-m", str(tmp_path / "missing.bin"), "x"], "no such model file"),
        (["generate", "-m", v7, "x", "--tokenizer", "neox"], "does not fit"),
    ]:
        rc, out, err = cli(capsys, *args)
        assert rc == 1 and out == "" and err.startswith("rwkvpy: error: ") and msg in err, err
        assert err.count("\n") == 1
    # no -m and no demo module
    monkeypatch.setitem(sys.modules, "rwkvpy.demo", None)
    rc, _, err = cli(capsys, "generate", "x")
    assert rc == 1 and err == "rwkvpy: error: no model given: use -m MODEL\n"
    # no -m and a demo module: its model is used, and said so on stderr
    demo = types.ModuleType("rwkvpy.demo")
    demo.demo_model_path = lambda: v7
    monkeypatch.setitem(sys.modules, "rwkvpy.demo", demo)
    rc, out, err = cli(capsys, "generate", "In", "--greedy", "--max-tokens", "3", "--threads", "1")
    assert rc == 0 and err.splitlines()[0] == f"using the built-in demo model ({v7})"
    assert len(out) == 4


def test_prompt_from_stdin(v7, capsys, monkeypatch):
    import io

    stdin = io.TextIOWrapper(io.BytesIO(b"In the"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    rc, a, _ = cli(
        capsys,
        "generate",
        "-m",
        v7,
        "-",
        "--greedy",
        "--max-tokens",
        "4",
        "--quiet",
        "--threads",
        "1",
    )
    rc2, b, _ = cli(
        capsys,
        "generate",
        "-m",
        v7,
        "In the",
        "--greedy",
        "--max-tokens",
        "4",
        "--quiet",
        "--threads",
        "1",
    )
    assert rc == rc2 == 0 and a == b


# -- chat ---------------------------------------------------------------------------------
def test_chat_through_a_pipe(v7, tmp_path):
    conv = tmp_path / "conv.state"
    lines = [
        "Hello there",
        f"/save {conv}",
        "What now?",
        "/regen",
        f"/load {conv}",
        "",
        "/reset",
        "Again",
        "/quit",
        "never read",
    ]
    p = run_cli(
        "chat",
        "-m",
        v7,
        "--threads",
        "1",
        "--seed",
        "5",
        "--max-tokens",
        "24",
        "--mode",
        "reference",
        "--temperature",
        "0.8",
        "--top-k",
        "10",
        "--system",
        "Be brief.",
        stdin="\n".join(lines) + "\n",
    )
    assert p.returncode == 0, p.stderr
    replies = [ln for ln in p.stdout.split("\n\n") if ln]
    assert len(replies) == 4 and all(r.startswith("Assistant: ") for r in replies), p.stdout
    assert f"[saved the conversation to {conv}]" in p.stderr
    assert f"[loaded {conv}: 2 messages]" in p.stderr and "[conversation reset]" in p.stderr
    assert conv.exists() and not (tmp_path / "conv.state.chat.json").exists()
    doc = rwkvpy.State.load_with_extra(conv)[1]["chat"]  # one file: the transcript inside
    assert doc["system"] == "Be brief." and [m["role"] for m in doc["messages"]] == [
        "user",
        "assistant",
    ]
    assert doc["messages"][1]["content"] == replies[0][len("Assistant: ") :]


def test_chat_command_errors_do_not_end_the_chat(v7, tmp_path, capsys, monkeypatch):
    import io

    stdin = io.StringIO(f"/load {tmp_path / 'nope'}\n/regen\n/frobnicate\n/save\nHi\n")
    monkeypatch.setattr(sys, "stdin", stdin)
    rc, out, err = cli(capsys, "chat", "-m", v7, "--threads", "1", "--max-tokens", "3")
    assert rc == 1  # something failed
    errs = [ln for ln in err.splitlines() if ln.startswith("rwkvpy: error: ")]
    assert len(errs) == 4 and "cannot read" in errs[0] and "no reply" in errs[1]
    assert "unknown command /frobnicate" in errs[2] and "/save FILE" in errs[3]
    assert out.startswith("Assistant: ") and out.count("Assistant: ") == 1


def test_ctrl_c_during_a_reply_is_not_fatal():
    import io

    class Reply:
        closed = False

        def __iter__(self):
            yield "Hello"
            raise KeyboardInterrupt

        def close(self):
            self.closed = True

    out, r = io.StringIO(), Reply()
    _show_reply(r, out)
    assert r.closed and out.getvalue() == "Assistant: Hello\n\n"


# -- tokenize -----------------------------------------------------------------------------
def test_tokenize(v7, capsys, tmp_path):
    text = "héllo ✓ 𝄞\n"
    f = tmp_path / "t.txt"
    f.write_text(text, encoding="utf-8")
    want = list(text.encode("utf-8"))
    rc, out, _ = cli(capsys, "tokenize", "-m", v7, str(f), "--json")
    assert rc == 0 and json.loads(out) == want
    rc, out, _ = cli(capsys, "tokenize", "--tokenizer", "bytes", str(f))
    assert rc == 0 and out == " ".join(map(str, want)) + "\n"
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xc3\xa9 \xe2\x9c x")
    rc, out, err = cli(capsys, "tokenize", "--tokenizer", "bytes", str(bad), "--json")
    assert rc == 1 and out == ""
    assert err.startswith(f"rwkvpy: error: {bad}: invalid UTF-8 at byte offset 6")
    for args, msg in [
        (["tokenize", str(f)], "-m MODEL or --tokenizer"),
        (["tokenize", "--tokenizer", "bytes", str(tmp_path / "no.txt")], "no such"),
        (
            ["tokenize", "--tokenizer", "neox", "--vocab", str(tmp_path / "no.json"), str(f)],
            "--vocab",
        ),
    ]:
        rc, _, err = cli(capsys, *args)
        assert rc == 1 and msg in err and err.count("\n") == 1


# -- hf: specs ----------------------------------------------------------------------------
def test_hf_spec_parsing(monkeypatch, v7):
    assert parse_hf_spec("hf:owner/repo/file.bin") == ("owner/repo", "file.bin", None)
    assert parse_hf_spec("hf:owner/repo@v1/a/b.pth") == ("owner/repo", "a/b.pth", "v1")
    for bad in ("hf:owner/repo", "hf:owner//f", "hf:owner/@x/f"):
        with pytest.raises(HubError, match="expected hf:OWNER/REPO"):
            parse_hf_spec(bad)
    assert resolve_model(v7) == v7
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(HubError, match="pip install 'rwkvpy\\[hub\\]'"):
        resolve_model("hf:owner/repo/file.bin")


def test_hf_model_from_an_offline_cache(v7, tmp_path, capsys):
    import huggingface_hub  # noqa: F401  (the test extra installs it; never skip)

    with open(v7, "rb") as f:
        data = f.read()
    sha = hashlib.sha256(data).hexdigest()
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-owner--tiny-rwkv"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / sha).write_bytes(data)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit / "models"
    snap.mkdir(parents=True)
    os.symlink(os.path.join("..", "..", "..", "blobs", sha), snap / "tiny.bin")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    # one process, two commands (a process costs seconds): a cached file, then an uncached one
    script = (
        "import sys; from rwkvpy.cli import main as m\n"
        "a = m(['generate', '-m', 'hf:tiny-owner/tiny-rwkv/models/tiny.bin', 'In the', "
        "'--greedy', '--max-tokens', '8', '--threads', '1', '--json', '--mode', 'reference'])\n"
        "sys.stdout.flush(); sys.stderr.write('--\\n'); sys.stderr.flush()\n"
        f"b = m(['tokenize', '-m', 'hf:tiny-owner/tiny-rwkv/models/other.bin', {v7!r}])\n"
        "sys.exit(a * 10 + b)\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=120,
        check=False,
    )
    assert p.returncode == 1, p.stderr  # the first command succeeded, the second failed
    rc, out, _ = cli(
        capsys,
        "generate",
        "-m",
        v7,
        "In the",
        "--greedy",
        "--max-tokens",
        "8",
        "--threads",
        "1",
        "--json",
        "--mode",
        "reference",
    )
    assert rc == 0 and json.loads(p.stdout)["text"] == json.loads(out)["text"]
    err = p.stderr.split("--\n", 1)[1].strip()
    assert "\n" not in err and err.startswith(
        "rwkvpy: error: hf:tiny-owner/tiny-rwkv/models/"
        "other.bin: models/other.bin of tiny-owner/"
        "tiny-rwkv is not in the Hugging Face cache"
    )
    assert "HF_HUB_OFFLINE" in err
