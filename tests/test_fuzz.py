"""The fuzzers' fast tier (issue 23, docs/reliability.md): every reader fed seeded mutants of its
seed corpus, and every input a fuzzer once found failing replayed.

Each input must end as a typed ``rwkvpy.errors`` exception or a successful load (with a forward,
or an encode and decode), never another exception, a hang or memory out of proportion. The
mutants run in a subprocess under the fuzz driver's limits (benchmarks/fuzz.py: address space,
per-input time and peak RSS); the corpus and the regressions run here, one test each.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks import fuzz_targets as ft  # noqa: E402

SEEDED = 60  # mutants per target: all eleven targets in about 15 s on 2 busy cores


def test_every_target_has_seeds():
    for name in ft.TARGETS:
        assert ft.seeds(name), name


def test_seeded_mutants_are_typed_or_load():
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.fuzz",
            "all",
            "--seeded",
            str(SEEDED),
            "--seed",
            "23",
            "--json",
            "--timeout",
            "20",
            "--hard-timeout",
            "120",
            "--findings",
            "/tmp/rwkvpy-fuzz-ci",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.stdout.strip(), r.stderr[-3000:]
    summaries = json.loads(r.stdout.strip().splitlines()[-1])
    assert [s["target"] for s in summaries] == list(ft.TARGETS)
    for s in summaries:
        assert s["inputs"] == SEEDED and s["typed"] + s["loaded"] == SEEDED, s
        assert s["typed"] > 0, s  # the mutants reach the readers' checks
        assert s["regressions"] == {"inputs": len(ft.regressions(s["target"])), "other": 0}, s
    assert sum(s["loaded"] for s in summaries) > SEEDED, summaries  # and often get through
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def ctx():
    return ft.Context()


def _cases(kind):
    out = []
    for name in ft.TARGETS:
        files = ft.seeds(name) if kind == "seed" else ft.regressions(name)
        out += [pytest.param(name, p, id=f"{name}/{p.name}") for p in files]
    return out


@pytest.mark.parametrize("name,path", _cases("seed"))
def test_seed_loads(ctx, name, path):
    ft.TARGETS[name].run(path.read_bytes(), ctx)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name,path", _cases("regression"))
def test_regression_is_typed_or_loads(ctx, name, path):
    """An input a fuzzer found failing (tests/fuzz_corpus/regressions/TARGET/): typed now."""
    from rwkvpy.errors import RwkvpyError

    try:
        ft.TARGETS[name].run(path.read_bytes(), ctx)
    except RwkvpyError:
        pass
