"""The repack cache (kernels/cache.py): written once, reused while the model file is unchanged,
rebuilt when it changes or is unreadable, skipped when it cannot be written."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from conftest import TINY_V7, fixture_path, serial_logits

import rwkvpy
import rwkvpy.quant
from rwkvpy.convert import convert
from rwkvpy.kernels import cache as C
from rwkvpy.kernels import linear as L

TOKENS = [34, 105, 110, 32, 116, 104, 101]


#: the only repacking kernels are the integer ones (level avx2 and up, kernels/cpu.py)
pytestmark = pytest.mark.skipif(not L._int8_dot(), reason="the integer kernels need AVX2")


@pytest.fixture(autouse=True)
def user_cache(tmp_path_factory, monkeypatch):
    """The user cache folder (rwkvpy.paths) in a temporary folder of its own, for this process
    and the CLI's subprocesses."""
    folder = tmp_path_factory.mktemp("user-cache")
    monkeypatch.setenv("RWKVPY_CACHE_DIR", str(folder))
    return folder


@pytest.fixture()
def q5_model(tmp_path):
    dst = tmp_path / "tiny-Q5_1.bin"
    shutil.copy(fixture_path("rwkv-cpp-tiny", "tiny-rwkv-7v0-834K-Q5_1.bin"), dst)
    return dst


def logits_of(model):
    return serial_logits(model, TOKENS)[0]


def forbid(monkeypatch, module, name):
    def fail(*a, **k):
        raise AssertionError(f"{name} called: the cache was not used")

    monkeypatch.setattr(module, name, fail)


def written_then_hit(monkeypatch, path, cls, repacker):
    """The first load repacks into ``cls`` and writes the cache; the second reads it (the
    ``repacker`` function of kernels.linear may not run) and gives the same logits."""
    first = rwkvpy.load(path)
    assert first.repack_cache == "written"
    assert isinstance(first._net.lin["blocks.0.att.key.weight"], cls)
    forbid(monkeypatch, L, repacker)
    second = rwkvpy.load(path)
    assert second.repack_cache == "hit" and torch.equal(logits_of(first), logits_of(second))


def test_int8_dot_groups_cached(q5_model, monkeypatch):
    """With AVX2, mode "fast" reads Q4/Q5 through Int8DotLinear's interleaved groups: repacked
    at the first load, memory-mapped from the cache afterwards, same logits."""
    written_then_hit(monkeypatch, q5_model, L.Int8DotLinear, "repack_x8")
    assert os.path.exists(C.cache_path(q5_model))


def test_q4_0_groups_cached(tmp_path, monkeypatch):
    src = tmp_path / "m-q4_0.gguf"
    convert(
        fixture_path(*TINY_V7),
        src,
        type="q4_0",
        progress=False,
    )
    written_then_hit(monkeypatch, src, L.Int8DotLinear, "repack_x8")


def test_generic_level_repacks_nothing(q5_model):
    """The generic CPU level multiplies block formats as stored: nothing to cache."""
    model = rwkvpy.load(q5_model, cpu_capability="generic")
    assert model.repack_cache == "none" and not os.path.exists(C.cache_path(q5_model))
    assert isinstance(model._net.lin["blocks.0.att.key.weight"], L.BlockLinear)


def test_changed_model_file_rebuilds(q5_model):
    rwkvpy.load(q5_model)
    st = os.stat(q5_model)
    os.utime(q5_model, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched
    assert rwkvpy.load(q5_model).repack_cache == "written"
    # same size and modification time, other bytes: the hash of the file's ends tells
    st = os.stat(q5_model)
    raw = bytearray(q5_model.read_bytes())
    raw[-100] ^= 0x01
    q5_model.write_bytes(bytes(raw))
    os.utime(q5_model, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(q5_model).st_size == st.st_size
    assert rwkvpy.load(q5_model).repack_cache == "written"
    assert rwkvpy.load(q5_model).repack_cache == "hit"


def test_unreadable_cache_is_rebuilt(q5_model):
    os.makedirs(C.folder())
    with open(C.cache_path(q5_model), "wb") as f:
        f.write(b"not a cache at all")
    m = rwkvpy.load(q5_model)
    assert m.repack_cache == "written"
    assert torch.equal(logits_of(m), logits_of(rwkvpy.load(q5_model, cache=False)))


def test_unwritable_folder_is_skipped(q5_model, monkeypatch):
    import rwkvpy.formats.atomic as atomic

    def refuse(path, mode="wb"):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(atomic, "atomic_write", refuse)
    m = rwkvpy.load(q5_model)
    assert m.repack_cache.startswith("not written: Permission denied")
    assert not os.path.exists(C.cache_path(q5_model))
    assert logits_of(m).shape == (len(TOKENS), 256)


def test_off_and_not_needed(q5_model, tmp_path):
    assert rwkvpy.load(q5_model, cache=False).repack_cache == "off"
    assert rwkvpy.load(q5_model, mode="exact").repack_cache == "off"
    assert not os.path.exists(C.cache_path(q5_model))
    f32 = tmp_path / "f32.bin"
    shutil.copy(fixture_path(*TINY_V7), f32)
    assert rwkvpy.load(f32).repack_cache == "none" and not os.path.exists(C.cache_path(f32))


def test_read_only_folder_is_respected(tmp_path):
    """By default nothing is written beside the model; asked to (cache="beside"), a read-only
    folder is respected even by root."""
    folder = tmp_path / "ro"
    folder.mkdir()
    shutil.copy(fixture_path("rwkv-cpp-tiny", "tiny-rwkv-7v0-834K-Q5_1.bin"), folder / "m.bin")
    folder.chmod(0o555)
    try:
        assert rwkvpy.load(folder / "m.bin").repack_cache == "written"
        m = rwkvpy.load(folder / "m.bin", cache="beside")
        assert m.repack_cache == "not written: the model's folder is read-only"
        assert os.listdir(folder) == ["m.bin"]
    finally:
        folder.chmod(0o755)


def test_user_folder_by_default_beside_when_asked(q5_model, user_cache):
    """The cache goes to the user cache folder, keyed by the model file, never beside the model
    unless asked; "beside" writes MODEL.rwkvpy-cache and reads it back."""
    assert rwkvpy.load(q5_model).repack_cache == "written"
    assert os.listdir(q5_model.parent) == [q5_model.name]
    assert os.path.dirname(C.cache_path(q5_model)) == str(user_cache / "repack")
    assert [e["model"] for e in C.entries()] == [os.path.abspath(q5_model)]
    assert rwkvpy.load(q5_model, cache="beside").repack_cache == "written"
    assert os.path.exists(str(q5_model) + C.SUFFIX)
    assert rwkvpy.load(q5_model, cache="beside").repack_cache == "hit"
    with pytest.raises(rwkvpy.errors.RwkvpyError, match="cache must be True, False or 'beside'"):
        rwkvpy.load(q5_model, cache="yes")


def test_size_limit_keeps_the_most_recent(q5_model, tmp_path, monkeypatch):
    """Over the limit, the least recently used entries go first; the one just written stays."""
    other = tmp_path / "other.bin"
    shutil.copy(q5_model, other)
    assert rwkvpy.load(q5_model).repack_cache == "written"
    first = C.cache_path(q5_model)
    size = os.path.getsize(first)
    os.utime(first, (1, 1))  # used long ago
    monkeypatch.setenv(C.MAX_ENV, str(1.5 * size / 1e9))  # room for one entry
    assert rwkvpy.load(other).repack_cache == "written"
    assert not os.path.exists(first) and os.path.exists(C.cache_path(other))


def test_cli_cache_list_and_clear(q5_model):
    import json
    import subprocess
    import sys

    rwkvpy.load(q5_model)

    def cli(*args):
        r = subprocess.run(
            [sys.executable, "-m", "rwkvpy", "cache", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        return r.stdout

    listed = json.loads(cli("list", "--json"))
    assert listed["folder"] == C.folder() and len(listed["entries"]) == 1
    assert listed["entries"][0]["model"] == os.path.abspath(q5_model)
    assert listed["bytes"] == os.path.getsize(C.cache_path(q5_model))
    assert str(q5_model) in cli("list")
    assert "removed 1 repack cache files" in cli("clear")
    assert C.entries() == [] and json.loads(cli("list", "--json"))["entries"] == []


def test_cli_bench_reports_and_no_cache_skips(q5_model):
    import json
    import subprocess
    import sys

    def bench(*extra):
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "rwkvpy",
                "bench",
                str(q5_model),
                "--tokens",
                "4",
                "--prompt",
                "8",
                "--threads",
                "1",
                "--json",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    assert bench("--no-cache")["repack_cache"] == "off"
    assert not os.path.exists(C.cache_path(q5_model))
    assert bench()["repack_cache"] == "written" and os.path.exists(C.cache_path(q5_model))
    assert bench()["repack_cache"] == "hit"
