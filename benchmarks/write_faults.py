"""Faults in writing (issue 23, docs/reliability.md): every writer of rwkvpy killed with SIGKILL
at random moments, run into a full disk (``RLIMIT_FSIZE``) and into a folder it may not write.

After a kill the destination must be absent, or the previous complete file, or a complete
valid new one; the killed writer's temp file may remain until the next writer of the same file
runs, which must remove it and succeed. A full disk or a read-only folder must end in a
``FileWriteError`` naming the file and the cause (the repack cache, a best-effort cache, is
skipped instead), with no temp file left and the destination untouched.

    python -m benchmarks.write_faults --kills 20          # 20 random kills per writer
    python -m benchmarks.write_faults --kills 20 --json

Writers: convert (GGUF Q8_0), quantize (rwkv.cpp .bin Q5_1), merge-lora (GGUF F16),
state.save, the chat's /save (ChatSession.save: one state file holding the transcript) and the
repack cache (``load(cache="beside")``, the model file touched before each run so that the
cache is stale and written again). The source model is the fuzz corpus's base (v7, 32 wide) or,
with ``--big``, a random v7 512 x 4 (vocab 8192) so that kills land inside long writes.

A kill at a random moment of a whole run mostly lands in its imports and compute, before or
after the short write; ``state.save-loop`` and ``chat-save-loop`` kill a process that saves
in a loop (two different conversations, or states, one after the other), so that every kill
lands inside a save: the file must then be one of the two, whole.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONTEXT = ROOT / "tests" / "fuzz_corpus" / "_context"
WRITERS = ["convert", "quantize", "merge-lora", "state.save", "chat-save", "repack-cache"]
#: writers that save in a loop until killed: every kill lands inside a save
LOOPS = ["state.save-loop", "chat-save-loop"]
DEST = {
    "convert": "out.gguf",
    "quantize": "out.bin",
    "merge-lora": "merged.gguf",
    "state.save": "s.state",
    "chat-save": "chat.state",
    "repack-cache": "model.gguf",
    "state.save-loop": "s.state",
    "chat-save-loop": "chat.state",
}
#: the two conversations (first user messages) that chat-save-loop saves in turn
CHATS = ("Hello there", "Good morning")


def inputs(folder: Path, big: bool = False) -> dict:
    """The files the writers read, made in ``folder`` (once)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    base = folder / "base.pth"
    if not base.exists():
        if big:
            from rwkvpy import Version
            from rwkvpy.synth import save_random_model

            save_random_model(
                base,
                version=Version.V7,
                n_embd=512,
                n_layer=4,
                vocab=8192,
                seed=3,
                dtype=torch.float16,
            )
        else:
            shutil.copy(CONTEXT / "base.pth", base)
        g = torch.Generator().manual_seed(2)
        C = 512 if big else 32
        torch.save(
            {
                "blocks.0.att.receptance.lora_A.weight": torch.randn(8, C, generator=g),
                "blocks.0.att.receptance.lora_B.weight": torch.randn(C, 8, generator=g),
            },
            folder / "lora.pth",
        )
        from rwkvpy.convert import convert

        convert(base, folder / "model.gguf", type="q8_0", progress=False)
    return {"base": str(base), "lora": str(folder / "lora.pth"), "q8": str(folder / "model.gguf")}


def write(name: str, dst: str, src: dict) -> None:
    """Run writer ``name`` to ``dst`` (for the repack cache: the model whose cache is written
    beside it)."""
    import rwkvpy

    if name == "convert":
        from rwkvpy.convert import convert

        convert(src["base"], dst, type="q8_0", force=True, progress=False)
    elif name == "quantize":
        from rwkvpy.convert import quantize

        quantize(src["base"], dst, "q5_1", force=True, progress=False)
    elif name == "merge-lora":
        from rwkvpy.lora import merge_lora

        merge_lora(src["base"], src["lora"], dst, alpha=8, type="f16", force=True, progress=False)
    elif name in ("state.save", "chat-save"):
        _savers(name, src)[0](dst)
    elif name in LOOPS:
        saves = _savers(name.removesuffix("-loop"), src)
        saves[0](dst)
        print("looping", flush=True)
        i = 1
        while True:  # until killed
            saves[i % 2](dst)
            i += 1
    elif name == "repack-cache":
        if not os.path.exists(dst):
            shutil.copy(src["q8"], dst)
        rwkvpy.load(dst, cache="beside").forward([1])
    else:
        raise ValueError(name)


def _savers(name: str, src: dict) -> list:
    """Two functions that save different content of writer ``name`` (state.save: the states
    after 39 and 40 tokens; chat-save: the conversations of CHATS) to a path."""
    import rwkvpy

    model = rwkvpy.load(src["base"], cache=False)
    if name == "state.save":
        states = [model.forward(list(range(1, n)))[1] for n in (40, 41)]
        return [s.save for s in states]
    from rwkvpy.chat import ChatSession
    from rwkvpy.sampling import SamplingParams
    from rwkvpy.tokenizers import ByteTokenizer

    sessions = []
    for text in CHATS:
        session = ChatSession(model, ByteTokenizer(), SamplingParams(max_tokens=4, seed=1))
        "".join(session.say(text))  # the reply, read to its end (so committed)
        sessions.append(session)
    return [s.save for s in sessions]


def written(name: str, dst: str) -> str:
    return dst + ".rwkvpy-cache" if name == "repack-cache" else dst


def stamp(path):
    """(inode, mtime) of ``path``, None when absent: a rename puts a new inode in place."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def check(name: str, dst: str, src: dict, previous=None) -> str:
    """'absent' or 'valid' (the written file read back and used); raises when it is neither.
    ``previous``: the file's stamp before the run; a repack cache that is still that file
    may be stale (written before the model file was touched), but must be whole."""
    import rwkvpy

    path = written(name, dst)
    if not os.path.exists(path):
        return "absent"
    if name.startswith("chat-save"):
        saved_chat(dst, src)
    elif name.startswith("state.save"):
        from rwkvpy import State

        st = State.load(path, rwkvpy.load(src["base"], cache=False))
        assert st.n_tokens in (39, 40), st.n_tokens
    elif name == "repack-cache":
        import torch

        from rwkvpy.kernels.cache import RepackCache

        data = torch.load(path, weights_only=True, mmap=True)  # whole: raises otherwise
        assert isinstance(data, dict) and data.get("tensors"), "an empty cache file"
        if previous is None or stamp(path) != previous:  # a new file: for this model
            assert RepackCache(dst, "fast", beside=True)._cached, "the cache does not match"
    else:
        lg, _ = rwkvpy.load(path, cache=False).forward([1, 2])
        assert bool(lg.isfinite().all()), "non-finite logits"
    return "valid"


def saved_chat(dst: str, src: dict) -> str:
    """The first user message of the chat saved at ``dst`` (one of CHATS), loaded whole."""
    import rwkvpy
    from rwkvpy.chat import ChatSession
    from rwkvpy.tokenizers import ByteTokenizer

    session = ChatSession(rwkvpy.load(src["base"], cache=False), ByteTokenizer())
    session.load(dst)
    first = session.messages[0]["content"]
    assert first in CHATS and len(session.messages) == 2, session.messages
    return first


def temps(folder) -> list:
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp"))


# -- the child process: one write, maybe killed by itself at its n-th rename ----------------------


def child(argv):
    p = argparse.ArgumentParser()
    p.add_argument("name", help="a writer, or several separated by commas")
    p.add_argument("dst", help="its destination (as many, separated by commas)")
    p.add_argument("src")
    p.add_argument("--kill-at-rename", type=int, default=0)
    p.add_argument("--fsize", type=int, default=0)
    a = p.parse_args(argv)
    if a.kill_at_rename:
        real, count = os.replace, [0]

        folder = os.path.dirname(os.path.abspath(a.dst.split(",")[0]))

        def replace(s, d, *args, **kw):  # the writer's renames, not numba's cache writes
            count[0] += os.path.dirname(os.path.abspath(d)) == folder
            if count[0] == a.kill_at_rename:  # the temp complete, not yet renamed
                os.kill(os.getpid(), signal.SIGKILL)
            return real(s, d, *args, **kw)

        os.replace = replace
    if a.fsize:
        import resource

        # numba saves each kernel into its cache as it compiles it: compile them first, so the
        # limit meets the writers' own files whatever the state of numba's cache
        import rwkvpy

        src = json.loads(a.src)
        for key in ("base", "q8"):
            if key in src:
                m = rwkvpy.load(src[key], cache=False)
                m.forward([1, 2])
                m.forward([1])

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (a.fsize, a.fsize))
    from rwkvpy.errors import RwkvpyError

    print("started", flush=True)
    failed = 0
    for name, dst in zip(a.name.split(","), a.dst.split(",")):  # several: one after another
        try:
            write(name, dst, json.loads(a.src))
        except RwkvpyError as e:
            print(f"{name} error {type(e).__name__}: {e}", flush=True)
            failed = 1
        else:
            print(f"{name} ok", flush=True)
    return failed


def child_command(name, dst, src, *, kill_at_rename=0, fsize=0) -> list:
    """The command line of one child run (see :func:`child`)."""
    return [
        sys.executable,
        "-m",
        "benchmarks.write_faults",
        "--child",
        name,
        dst,
        json.dumps(src),
        "--kill-at-rename",
        str(kill_at_rename),
        "--fsize",
        str(fsize),
    ]


def run_child(name, dst, src, *, kill_after=None, kill_at_rename=0, fsize=0, timeout=600):
    """Run one write in a subprocess: killed ``kill_after`` seconds after it reports that it
    started (its imports done; a loop writer: its first save done, its loop begun), or by
    itself at its ``kill_at_rename``-th rename. Returns (returncode, output, seconds from its
    start to its end)."""
    cmd = child_command(name, dst, src, kill_at_rename=kill_at_rename, fsize=fsize)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    marker = "looping" if name in LOOPS else "started"
    try:
        first = ""  # the output up to the marker (warnings on stderr may come first)
        while True:
            line = p.stdout.readline()
            first += line
            if not line or line.strip() == marker:
                break
        started = time.monotonic()
        if kill_after is not None and line:
            time.sleep(kill_after)
            p.send_signal(signal.SIGKILL)
        out = first + p.stdout.read()
        p.wait(timeout)
    finally:  # never left running: a loop writer ends only when killed
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
    return p.returncode, out, time.monotonic() - started


def kills(name, src, folder: Path, n: int, rng: random.Random, loop_s: float = 0.5) -> dict:
    """``n`` writes of ``name`` killed at random moments within the time a whole write takes
    (a loop writer: within ``loop_s`` of saving); after each, the destination's state and the
    next writer's cleanup are checked."""
    folder.mkdir(parents=True, exist_ok=True)
    dst = str(folder / DEST[name])
    single = name.removesuffix("-loop")
    rc, out, whole = run_child(single, dst, src)
    assert rc == 0, out
    outcomes = {
        "absent": 0,
        "new, valid": 0,
        "kept previous": 0,
        "bad": 0,
        "temps left": 0,
        "temps after next write": 0,
    }
    for i in range(n):
        if name not in LOOPS and rng.random() < 0.5 and os.path.exists(written(name, dst)):
            os.unlink(written(name, dst))  # half the runs write a new file, half replace one
        if name == "repack-cache":  # the cache made stale: the run writes it again
            st = os.stat(dst)
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        before = stamp(written(name, dst))
        run_child(name, dst, src, kill_after=rng.uniform(0, loop_s if name in LOOPS else whole))
        if temps(folder):
            outcomes["temps left"] += 1
        try:
            state = check(name, dst, src, before)
            if state == "valid":
                state = "kept previous" if stamp(written(name, dst)) == before else "new, valid"
            outcomes[state] += 1
        except Exception as e:  # noqa: BLE001 - counted
            outcomes["bad"] += 1
            print(f"  {name} kill {i}: {type(e).__name__}: {e}", file=sys.stderr)
        write(single, dst, src)  # the next writer: removes the dead one's temp, succeeds
        if temps(folder):
            outcomes["temps after next write"] += 1
        assert check(name, dst, src) == "valid"
    return {"writer": name, "kills": n, "whole_write_s": round(whole, 2), **outcomes}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child(argv[1:])
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.write_faults", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--writers", default=",".join(WRITERS + LOOPS))
    p.add_argument("--big", action="store_true", help="a 512 x 4 model: longer writes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if "RWKVPY_CACHE_DIR" not in os.environ:  # the user's repack cache left alone
        from rwkvpy.paths import user_cache_dir

        # numba's compiled kernels still from the user's cache (a fresh one: minutes a run)
        os.environ.setdefault("NUMBA_CACHE_DIR", user_cache_dir("numba"))
        os.environ["RWKVPY_CACHE_DIR"] = tempfile.mkdtemp()
    work = Path(tempfile.mkdtemp(prefix="rwkvpy-write-faults-"))
    src = inputs(work / "in", a.big)
    rng = random.Random(a.seed)
    rows = []
    for name in a.writers.split(","):
        rows.append(kills(name, src, work / name, a.kills, rng))
        if not a.json:
            print(rows[-1], flush=True)
    if a.json:
        print(json.dumps(rows))
    shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r["bad"] or r["temps after next write"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
