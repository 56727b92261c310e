"""``rwkvpy compare``: one row per type with every column, sorted by perplexity, each type's
perplexity equal to the library's on the converted file, JSON/CSV output, --out-dir/--reuse
checks and the plot. One real comparison (tiny model, 2 types, few tokens) is shared by the
tests; the rest runs on made-up results."""

import csv
import json
import math
import os

import pytest
from conftest import fixture_path

import rwkvpy
from rwkvpy import compare as cmp
from rwkvpy.cli import main as main_for_tests
from rwkvpy.perplexity import perplexity

TEXT = (
    "The quick brown fox jumps over the lazy dog. Beautiful is better than ugly. Explicit "
    "is better than implicit. Simple is better than complex. Flat is better than nested. "
    "Sparse is better than dense. Readability counts.\n"
) * 2

TYPES = ["q4_0", "f16"]


@pytest.fixture(scope="module")
def src():
    return str(fixture_path("rwkv-cpp-tiny", "tiny-rwkv-5v2-730K-FP32.bin"))


@pytest.fixture(scope="module")
def run(src, tmp_path_factory):
    """One comparison through the command (in this process; each type is measured in a
    subprocess of its own)."""
    d = tmp_path_factory.mktemp("compare")
    text = d / "eval.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = d / "models"
    out.mkdir()
    argv = [
        "compare",
        "-m",
        src,
        str(text),
        "--types",
        ",".join(TYPES),
        "--out-dir",
        str(out),
        "--max-tokens",
        "300",
        "--ignore-first",
        "20",
        "--threads",
        "1",
        "--bench-tokens",
        "4",
        "--prompt",
        "32",
        "--json",
        str(d / "r.json"),
        "--csv",
        str(d / "r.csv"),
        "--quiet",
    ]
    import io
    from contextlib import redirect_stderr, redirect_stdout

    so, se = io.StringIO(), io.StringIO()
    with redirect_stdout(so), redirect_stderr(se):
        rc = main_for_tests(argv)
    assert rc == 0, se.getvalue()
    return {
        "dir": d,
        "out": out,
        "text": text,
        "stdout": so.getvalue(),
        "stderr": se.getvalue(),
        "argv": argv,
    }


def test_one_row_per_type_with_every_column(run):
    d = json.loads((run["dir"] / "r.json").read_text())
    rows = d["rows"]
    assert sorted(r["type"] for r in rows) == sorted(TYPES)
    for r in rows:
        assert set(cmp.COLUMNS) <= set(r), set(cmp.COLUMNS) - set(r)
        assert r["tokens"] == 280 and r["threads"] == 1 and r["reused"] is False
        assert r["perplexity"] == pytest.approx(math.exp(r["nll"]))
        for k in (
            "file_size",
            "per_token_ms",
            "prompt_tokens_per_s",
            "eval_tokens_per_s",
            "rss_mb",
            "base_rss_mb",
            "load_s",
        ):
            assert r[k] > 0, k
        assert r["rss_mb"] >= r["base_rss_mb"]
        assert os.path.getsize(r["file"]) == r["file_size"]
        # what users feel beside the median, and the machine around the timing
        assert r["tokens_timed"] == 4
        assert r["per_token_min_ms"] <= r["per_token_ms"] <= r["per_token_p90_ms"]
        assert r["per_token_min_ms"] <= r["per_token_mean_ms"]
        assert r["decode_tokens_per_s"] == pytest.approx(1e3 / r["per_token_mean_ms"])
        assert r["cpus"] >= 1 and r["load_avg_start"] >= 0 and r["load_avg_end"] >= 0
        assert isinstance(r["busy"], bool) and r["busy"] == (r["busy_reason"] is not None)
    # sorted by quality; the difference is from the best
    assert [r["perplexity"] for r in rows] == sorted(r["perplexity"] for r in rows)
    assert rows[0]["delta_perplexity"] == 0 and rows[0]["delta_pct"] == 0
    gap = rows[1]["perplexity"] - rows[0]["perplexity"]
    assert rows[1]["delta_perplexity"] == pytest.approx(gap)
    assert rows[0]["type"] == "f16"  # 4-bit weights lose quality on this model
    size = {r["type"]: r["file_size"] for r in rows}
    assert size["q4_0"] < size["f16"]
    assert d["tokens"] == 300 and d["scored"] == 280 and d["ignore_first"] == 20


def test_each_perplexity_is_the_librarys_on_the_converted_file(run):
    rows = json.loads((run["dir"] / "r.json").read_text())["rows"]
    toks = list(TEXT.encode())[:300]
    for r in rows:
        model = rwkvpy.load(r["file"], threads=1)
        assert abs(perplexity(model, toks, ignore_first=20).nll - r["nll"]) < 1e-5


def test_table_and_csv(run):
    lines = run["stdout"].splitlines()
    assert lines[0].startswith("model: ") and "280 tokens scored of 300" in lines[0]
    assert lines[1].split()[:2] == ["type", "perplexity"]
    body = [x for x in lines[3:] if not x.startswith("warning: the machine was busy")]
    assert len(body) == len(TYPES)
    assert body[0].split()[0] == "f16" and "best" in body[0]
    assert body[1].split()[0] == "q4_0" and "%)" in body[1]
    with open(run["dir"] / "r.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["type"] for r in rows] == ["f16", "q4_0"]
    assert list(rows[0]) == list(cmp.COLUMNS)
    # every column filled, but the reason of a busy machine only when it was busy
    assert all(rows[i][k] != "" for i in range(2) for k in cmp.COLUMNS if k != "busy_reason")
    assert all((r["busy"] == "True") == (r["busy_reason"] != "") for r in rows)
    assert run["stderr"] == ""  # --quiet


def test_existing_files_need_reuse(run, src, capsys):
    argv = [a for a in run["argv"] if a != "--quiet"]
    rc = main_for_tests(argv)
    _, err = capsys.readouterr()
    assert rc == 1 and err.count("\n") == 1
    assert "already exists; pass --reuse" in err


def test_reuse_checks_the_file_is_this_model(run, capsys, tmp_path):
    # a file of another model under a reused name
    other = str(fixture_path("rwkv-cpp-tiny", "tiny-rwkv-7v0-834K-Q5_1.bin"))
    src = str(fixture_path("rwkv-cpp-tiny", "tiny-rwkv-5v2-730K-FP32.bin"))
    os.symlink(other, tmp_path / cmp.type_file_name(src, "q5_1", ".bin"))
    rc = main_for_tests(
        [
            "compare",
            "-m",
            src,
            str(run["text"]),
            "--types",
            "q5_1",
            "--out-dir",
            str(tmp_path),
            "--reuse",
            "--quiet",
        ]
    )
    _, err = capsys.readouterr()
    assert rc == 1 and err.count("\n") == 1 and "is not a conversion of" in err, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--types", "f16,q3_k"], "unknown type 'q3_k'"),
        (["--types", ","], "no type to compare"),
        (["--types", "bf16"], "rwkv.cpp .bin files cannot hold bf16"),
        (["--reuse"], "--reuse needs --out-dir"),
        (["--out-dir", "{tmp}/nothere"], "nothere: no such folder"),
        (["--ignore-first", "1000"], "ignoring the first 1000 leaves none to score"),
    ],
)
def test_cli_errors(run, src, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    rc = main_for_tests(["compare", "-m", src, str(run["text"]), "--quiet", *argv])
    out, err = capsys.readouterr()
    assert rc == 1 and out == "" and err.count("\n") == 1 and message in err, err


def test_invalid_text_is_one_line_before_any_conversion(src, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xc3(")
    rc = main_for_tests(["compare", "-m", src, str(bad), "--out-dir", str(tmp_path)])
    _, err = capsys.readouterr()
    assert rc == 1 and "not a UTF-8 text file" in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["bad.txt"]


def fake_result(busy_type=None):
    rows = [
        {
            "type": t,
            "perplexity": p,
            "nll": math.log(p),
            "tokens": 100,
            "file_size": s,
            "per_token_ms": ms,
            "per_token_mean_ms": ms * 1.1,
            "per_token_p90_ms": ms * 1.2,
            "prompt_tokens_per_s": 1000.0,
            "eval_tokens_per_s": 900.0,
            "rss_mb": 300.0,
            "base_rss_mb": 200.0,
            "load_s": 0.1,
            "threads": 1,
            "file": None,
            "reused": False,
            "busy": t == busy_type,
            "busy_reason": "p90 9.00 ms vs median 2.00 ms" if t == busy_type else None,
        }
        for t, p, s, ms in (
            ("q4_0", 9.5, 500_000, 2.0),
            ("f16", 8.9, 1_500_000, 3.0),
            ("q8_0", 8.91, 800_000, 2.5),
        )
    ]
    cmp._rank(rows)
    return cmp.CompareResult(
        model="m.bin",
        tokens=101,
        scored=100,
        ignore_first=0,
        threads=1,
        mode="fast",
        date="2026-01-01",
        rows=rows,
    )


def test_rank_and_table():
    r = fake_result()
    assert [x["type"] for x in r.rows] == ["f16", "q8_0", "q4_0"]
    assert r.rows[1]["delta_pct"] == pytest.approx(100 * (8.91 / 8.9 - 1))
    table = cmp.format_table(r)
    assert "+0.0100 (+0.11%)" in table and "best" in table
    head = table.splitlines()[1]
    assert head.index("median ms") < head.index("mean ms") < head.index("p90 ms")
    assert table.splitlines()[3].split()[5:8] == ["3.00", "3.30", "3.60"]  # f16
    assert "warning" not in table


def test_busy_rows_get_one_warning_line_each():
    lines = cmp.format_table(fake_result(busy_type="q4_0")).splitlines()
    warnings = [x for x in lines if x.startswith("warning:")]
    assert warnings == [
        "warning: the machine was busy (q4_0: p90 9.00 ms vs median 2.00 ms): "
        "its speed figures are not this type's speed"
    ]
    assert lines[-1] == warnings[0]  # after the table


def test_csv_and_json_carry_the_new_fields(tmp_path):
    r = fake_result(busy_type="q4_0")
    cmp.write_csv(r, tmp_path / "r.csv")
    cmp.write_json(r, tmp_path / "r.json")
    with open(tmp_path / "r.csv", newline="") as f:
        rows = {x["type"]: x for x in csv.DictReader(f)}
    assert rows["f16"]["per_token_mean_ms"] == str(3.0 * 1.1)
    assert rows["q4_0"]["busy"] == "True" and rows["q4_0"]["busy_reason"].startswith("p90")
    assert rows["f16"]["busy"] == "False" and rows["f16"]["busy_reason"] == ""
    d = {x["type"]: x for x in json.loads((tmp_path / "r.json").read_text())["rows"]}
    assert d["q4_0"]["busy"] is True and d["f16"]["busy_reason"] is None
    assert d["q8_0"]["per_token_p90_ms"] == pytest.approx(3.0)


def test_plot(tmp_path):
    import matplotlib  # noqa: F401  (the test extra installs it; never skip)

    out = tmp_path / "p.png"
    cmp.plot(fake_result(), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, src, tmp_path, capsys):
    real = cmp.importlib.util.find_spec
    monkeypatch.setattr(
        cmp.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real(name, *a),
    )
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    rc = main_for_tests(["compare", "-m", src, str(text), "--plot", str(tmp_path / "p.png")])
    _, err = capsys.readouterr()
    assert rc == 1 and err.count("\n") == 1
    assert "--plot needs matplotlib" in err and "rwkvpy[plot]" in err
    assert sorted(os.listdir(tmp_path)) == ["t.txt"]  # failed before any work
