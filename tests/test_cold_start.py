"""A first run with an empty numba cache, as a fresh installation makes it: the compiled kernels go
to the user cache folder and nothing into the package's folder, a notice says that kernels are
being compiled (first run only), and the speeds leave the compiling out.

Each run is a subprocess with its own cache folders (nothing is shared with the test session's
or the user's), on a copy of the package in a folder of its own, as an installation would have
it (and out of reach of edits to the working tree while the test runs). The first run compiles
what the demo model needs (~30-60 s on 2 cores), the second loads it from the cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import rwkvpy
from rwkvpy.generate import Timings

PKG = Path(rwkvpy.__file__).resolve().parent

# the demo model's run, after imports that must compile nothing
RUN = textwrap.dedent("""
    import sys
    import rwkvpy
    import rwkvpy.kernels.decode, rwkvpy.kernels.wkv, rwkvpy.kernels.linear
    import rwkvpy.tokenizers._world_kernels
    from rwkvpy import compiling
    from rwkvpy import numba_cache
    print("package:", rwkvpy.__path__[0])
    print("compiled at import:", compiling.kernels_compiled())
    print("cache:", numba_cache.cache_dir())
    sys.stdout.flush()
    from rwkvpy.cli import main
    sys.exit(main(["generate", "-m", "demo", "Hello", "--max-tokens", "8", "--seed", "1",
                   "--threads", "2"] + sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A copy of the package (sources and data, no caches) in a folder of its own: the folder
    to put on PYTHONPATH."""
    site = tmp_path_factory.mktemp("site")
    shutil.copytree(
        PKG, site / "rwkvpy", ignore=shutil.ignore_patterns("__pycache__", "*.rwkvpy-cache")
    )
    return site


def _env(tmp: Path, site: Path | None = None, **extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NUMBA_CACHE_DIR", "RWKVPY_CACHE_DIR", "XDG_CACHE_HOME")
    }
    if site is not None:  # the copy first, before the installed package
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    env["XDG_CACHE_HOME"] = str(tmp)
    if not sys.platform.startswith("linux"):  # the platform's cache folder ignores XDG
        env["RWKVPY_CACHE_DIR"] = str(tmp / "rwkvpy")
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # Python's own .pyc files are not the question here
    env.update(extra)
    return env


def _snapshot(folder: Path) -> dict:
    """Every file below ``folder``: path -> (size, mtime)."""
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


def _run(env, *args, script=RUN, timeout=600):
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_first_run_compiles_into_the_user_cache(tmp_path, installed):
    pkg = installed / "rwkvpy"
    before = _snapshot(pkg)
    env = _env(tmp_path, installed)
    first = _run(env)
    assert first.returncode == 0, first.stderr
    assert f"package: {pkg}" in first.stdout
    assert "compiled at import: 0" in first.stdout  # importing compiles nothing
    cache = tmp_path / "rwkvpy" / "numba"
    assert f"cache: {cache}" in first.stdout
    index = list(cache.rglob("*.nbi"))
    assert index and list(cache.rglob("*.nbc"))
    # every compiled function is one of kernels/ (or its subpackages')
    assert {p.parent.name.split("_")[0] for p in index} <= {"kernels", "linear", "decode", "wkv"}
    assert "compiling kernels for this CPU (first run only)" in first.stderr
    assert "s of it compiling kernels (first run), not in the speeds" in first.stderr

    second = _run(env)
    assert second.returncode == 0, second.stderr
    assert "compiling kernels" not in second.stderr
    text = lambda p: p.stdout.split("\n", 3)[3]  # noqa: E731 - after the lines printed above
    assert text(second) == text(first)  # the cached kernels compute what the compiled ones did

    after = _snapshot(pkg)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))


def test_quiet_and_json_show_no_notice(tmp_path, installed):
    """--quiet and --json: nothing on stderr, also while compiling (a kernel that the demo run
    above does not need is compiled here: the tokenizer's)."""
    script = textwrap.dedent("""
        import sys
        from rwkvpy.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    vocab = installed / "rwkvpy" / "tokenizers" / "data" / "rwkv_vocab_v20230424.txt"
    args = ["tokenize", "-", "--tokenizer", "world"]
    if vocab.exists():
        args += ["--vocab", str(vocab)]
    p = subprocess.run(
        [sys.executable, "-c", script, *args, "--json"],
        input="Hello world",
        env=_env(tmp_path, installed),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    assert p.stderr == "" and p.stdout.startswith("[")
    assert list((tmp_path / "rwkvpy" / "numba").rglob("*.nbi"))  # it did compile


def test_numba_cache_dir_wins_and_an_unwritable_folder_is_skipped(tmp_path):
    """$NUMBA_CACHE_DIR, when set, is the cache; one that cannot be written (here: below a
    file) leaves the kernels compiled in a temporary folder, with a warning, and no failure."""
    script = textwrap.dedent("""
        import numpy as np
        from rwkvpy import numba_cache
        from rwkvpy.kernels.decode import glue
        x = np.arange(11, dtype=np.float32) / 4
        glue._vexp(x)
        print(numba_cache.cache_dir())
        print(glue._vexp._cache.cache_path)
    """)
    own = tmp_path / "own"
    p = _run(_env(tmp_path, NUMBA_CACHE_DIR=str(own)), script=script)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0] == str(own) and list(own.rglob("*.nbi"))
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    p = _run(_env(tmp_path, NUMBA_CACHE_DIR=str(blocked / "numba")), script=script)
    assert p.returncode == 0, p.stderr
    assert "cannot be written" in p.stderr and "compiling kernels" in p.stderr
    used = p.stdout.splitlines()[1]
    assert "rwkvpy-numba-" in used and not os.path.exists(used)  # removed at exit
    assert not (blocked.parent / "numba").exists()


def test_a_kernel_whose_cache_cannot_be_saved_still_runs(tmp_path):
    """A full disk while numba saves a compiled kernel (here: a 64-byte file size limit set
    after the cache folder was checked): the kernel runs, with one warning; numba alone
    raises OSError (EFBIG) out of the first call."""
    script = textwrap.dedent("""
        import resource, signal
        import numpy as np
        from rwkvpy.kernels.decode import glue
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))
        x = np.arange(11, dtype=np.float32) / 4
        glue._vexp(x)
        print(float(x[4]))
    """)
    p = _run(_env(tmp_path, NUMBA_CACHE_DIR=str(tmp_path / "own")), script=script)
    assert p.returncode == 0, p.stderr
    assert abs(float(p.stdout.split()[-1]) - 2.718281828) < 1e-5
    assert p.stderr.count("could not be saved in numba's cache") == 1, p.stderr


def test_locator_stamps():
    """Functions of the kernels folder carry the folder's stamp; the tokenizer's kernel its
    own file's hash (numba's rule); both are cached by rwkvpy's locator."""
    from rwkvpy import numba_cache
    from rwkvpy.kernels.decode import v7
    from rwkvpy.tokenizers import _world_kernels

    (locator,) = numba_cache.LOCATORS
    loc = v7._v7_block._cache._impl.locator
    assert isinstance(loc, locator) and loc.get_source_stamp() == numba_cache.sources_stamp()
    tok = _world_kernels.encode._cache._impl.locator
    with open(_world_kernels.__file__, "rb") as f:
        assert isinstance(tok, locator)
        assert tok.get_source_stamp() == hashlib.sha256(f.read()).digest()
    assert not loc.get_cache_path().startswith(str(PKG))


def test_speeds_leave_compiling_out():
    t = Timings(2.0, 4.0, prompt_tokens=10, completion_tokens=8, compile_seconds=30.0)
    assert t.total_seconds == 36.0
    assert t.prompt_tokens_per_second == 5.0 and t.tokens_per_second == 2.0
