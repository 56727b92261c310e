"""Faults in writing (issue 23, docs/reliability.md): each writer killed at the worst moment (its
temp file complete, not yet renamed), run into a full disk (RLIMIT_FSIZE) and into a folder it
may not write. The destination is absent or complete and valid, the next writer removes the
dead one's temp file, and errors are a FileWriteError naming the file and the cause.
benchmarks/write_faults.py kills each writer at 20 random moments (and each saver at 20 moments
of a loop of saves).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks import write_faults as wf  # noqa: E402


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """The writers' inputs; the kernels they run compiled here first, so that the children
    (under a file size limit) load them from numba's cache instead of writing it."""
    src = wf.inputs(tmp_path_factory.mktemp("in"))
    warm = tmp_path_factory.mktemp("warm")
    for name in ("state.save", "repack-cache"):
        wf.write(name, str(warm / wf.DEST[name]), src)
    return src


def _spawn(name, dst, src, **kw):
    import subprocess

    cmd = wf.child_command(name, dst, src, **kw)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def test_writers_killed_before_their_rename(src, tmp_path):
    """All at once (2 cores: the imports overlap): each child kills itself with SIGKILL at its
    first rename (the chat's save is one file: its only rename)."""
    runs = []
    for name in wf.WRITERS:
        folder = tmp_path / name
        folder.mkdir()
        dst = str(folder / wf.DEST[name])
        if name == "repack-cache":
            import shutil

            shutil.copy(src["q8"], dst)
        runs.append((name, folder, dst, _spawn(name, dst, src, kill_at_rename=1)))
    for name, folder, dst, p in runs:
        out = p.communicate(timeout=300)[0]
        assert p.returncode == -signal.SIGKILL, out
        left = wf.temps(folder)
        assert left, (name, os.listdir(folder))  # the dead writer's (merge-lora: and its .pth)
        assert wf.check(name, dst, src) == "absent", name
        wf.write(name, dst, src)  # the next writer of the same file
        assert wf.temps(folder) == [], (name, os.listdir(folder))
        assert wf.check(name, dst, src) == "valid"


def test_saves_killed_at_random_moments(src, tmp_path):
    """Processes that save in a loop, two conversations in turn (and one two states in turn),
    each killed with SIGKILL at a random moment of its loop, so inside a save: the file is one
    of the two, whole, and the next save removes the dead one's temp file."""
    import random
    import time

    rng = random.Random(23)
    runs = []
    for i, name in enumerate(["chat-save-loop"] * 4 + ["state.save-loop"]):
        folder = tmp_path / f"{i}"
        folder.mkdir()
        dst = str(folder / wf.DEST[name])
        runs.append((name, folder, dst, _spawn(name, dst, src)))
    for *_, p in runs:  # every one saving
        out = ""
        for line in p.stdout:
            out += line
            if line.strip() == "looping":
                break
        assert out.endswith("looping\n"), out
    t0 = time.monotonic()
    for at, p in sorted((rng.uniform(0.01, 0.3), r[3]) for r in runs):
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        p.kill()
    seen = set()
    for name, folder, dst, p in runs:
        assert p.wait(60) == -signal.SIGKILL
        p.stdout.close()
        if name == "chat-save-loop":
            seen.add(wf.saved_chat(dst, src))  # one of the two conversations, whole
        else:
            assert wf.check(name, dst, src) == "valid"  # a state of 39 or 40 tokens
        single = name.removesuffix("-loop")
        wf.write(single, dst, src)  # the next writer of the same file
        assert wf.temps(folder) == [], (name, os.listdir(folder))
        assert sorted(os.listdir(folder)) == [wf.DEST[name]]
        assert wf.check(single, dst, src) == "valid"
    assert seen <= set(wf.CHATS)


def test_writers_on_a_full_disk(src, tmp_path):
    """Every file write beyond 2,000 bytes fails with EFBIG: a FileWriteError naming the
    destination and 'File too large'; nothing left behind (the repack cache is skipped)."""
    names, dsts = [], []
    for name in wf.WRITERS:
        folder = tmp_path / name
        folder.mkdir()
        dst = str(folder / wf.DEST[name])
        if name == "repack-cache":
            import shutil

            shutil.copy(src["q8"], dst)
        names.append(name)
        dsts.append(dst)
    p = _spawn(",".join(names), ",".join(dsts), src, fsize=2000)
    out = p.communicate(timeout=300)[0]
    lines = {ln.split(" ", 1)[0]: ln for ln in out.splitlines() if ln.split(" ", 1)[0] in names}
    assert set(lines) == set(names), out
    for name, dst in zip(names, dsts):
        if name == "repack-cache":
            assert lines[name] == "repack-cache ok", out
            assert not os.path.exists(wf.written(name, dst))
        else:
            assert "error FileWriteError" in lines[name] and "File too large" in lines[name], out
            assert f": {dst}: " in lines[name] or lines[name].split(": ", 1)[1].startswith(dst), (
                lines[name]
            )
            assert wf.check(name, dst, src) == "absent"
        assert wf.temps(Path(dst).parent) == [], os.listdir(Path(dst).parent)
    assert "Traceback" not in out, out


def test_writers_into_a_read_only_folder(src, tmp_path):
    from rwkvpy.errors import FileWriteError

    ro = tmp_path / "ro"
    ro.mkdir()
    import shutil

    shutil.copy(src["q8"], ro / "model.gguf")
    ro.chmod(0o555)
    try:
        # root writes into a 0555 folder: it is refused creating files in /sys instead
        where = ro if os.geteuid() != 0 else Path("/sys")
        for name in wf.WRITERS:
            if name == "repack-cache":  # skipped, not an error: the model still loads
                wf.write(name, str(ro / "model.gguf"), src)
                assert not os.path.exists(ro / ("model.gguf" + ".rwkvpy-cache"))
                continue
            dst = str(where / wf.DEST[name])
            with pytest.raises(FileWriteError) as e:
                wf.write(name, dst, src)
            assert str(e.value).startswith(dst) and "Permission denied" in str(e.value), str(
                e.value
            )
            assert not os.path.exists(dst)
        assert sorted(os.listdir(ro)) == ["model.gguf"]
    finally:
        ro.chmod(0o755)


def test_generate_checks_the_state_destination_first(tmp_path):
    """--save-state into a missing folder fails before the model is loaded and anything is
    generated (100,000 tokens would take minutes): one line, no text."""
    import subprocess

    dst = tmp_path / "missing" / "x.state"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "rwkvpy",
            "generate",
            "demo",
            "Hi",
            "--max-tokens",
            "100000",
            "--save-state",
            str(dst),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and r.stdout == "", (r.stdout[:200], r.stderr)
    assert r.stderr.strip() == (
        f"rwkvpy: error: {dst}: cannot create a file in {dst.parent}: it does not exist"
    ), r.stderr
