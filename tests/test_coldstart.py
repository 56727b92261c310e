"""A first run's second process (rwkvpy.coldstart, rwkvpy.warm): what it is keyed on, that it
compiles every kernel of the one-token step (the model compiles none after taking it), that the
model runs meanwhile and falls back when it fails, and that concurrent saves into numba's cache
keep each signature's code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import TINY

import rwkvpy
from rwkvpy import coldstart, warm
from rwkvpy.model import _read

V7 = TINY / "tiny-rwkv-7v0-834K-FP16.bin"
V4 = TINY / "tiny-rwkv-4v0-660K-FP16.bin"
V5_Q5 = TINY / "tiny-rwkv-5v2-730K-Q5_1.bin"


def test_kinds_keep_one_layer_per_combination_of_types():
    ckpt, cfg = _read(str(V7))
    k = coldstart.kinds(ckpt)
    assert k["layers"][0] == 0
    assert len(k["layers"]) == len({json.dumps(t, sort_keys=True) for t in k["types"].values()})
    assert k["types"]["0"]["att.key.weight"] == "F16"
    s = coldstart.spec(ckpt, cfg, "fast", "avx2")
    assert s["shapes"]["emb.weight"][0] == min(cfg.vocab_size, coldstart.SMALL_VOCAB)
    assert not any(n.startswith(f"blocks.{len(k['layers'])}.") for n in s["shapes"])
    # the small model is the same kind of model: version, types, shapes of the layers kept
    small, small_cfg = warm.small_checkpoint(s)
    assert small_cfg.version is cfg.version and small_cfg.n_embd == cfg.n_embd
    assert small_cfg.n_layer == len(k["layers"])
    assert coldstart.kinds(small)["types"]["0"] == k["types"]["0"]


def test_key_depends_on_kinds_mode_and_level_not_sizes():
    ckpt, cfg = _read(str(V7))
    s = coldstart.spec(ckpt, cfg, "fast", "avx2")
    assert coldstart.key(s) == coldstart.key(dict(s, shapes={}))
    assert coldstart.key(s) != coldstart.key(dict(s, mode="exact"))
    assert coldstart.key(s) != coldstart.key(dict(s, cpu_capability="generic"))
    q_ckpt, q_cfg = _read(str(V5_Q5))
    assert coldstart.key(coldstart.spec(q_ckpt, q_cfg, "fast", "avx2")) != coldstart.key(s)


def test_off_by_environment(monkeypatch):
    monkeypatch.setenv(coldstart.ENV, "0")
    ckpt, cfg = _read(str(V7))
    assert coldstart.start(ckpt, cfg, "fast", "avx2") is None


# A fresh interpreter with an empty numba cache: the model's first run. It prints, as JSON, the
# step before and after the second process ends, the kernels compiled here after the switch,
# and the logits of the same tokens through the fused step and through a model loaded later.
FIRST_RUN = textwrap.dedent("""
    import json, sys, torch, rwkvpy
    from rwkvpy import compiling
    m = rwkvpy.load(sys.argv[1], threads=2)
    before = m.kernels["step"]
    lg, s = m.forward([1, 2, 3])
    seq, _ = m.forward([4], s)          # the sequence path while the second process compiles
    assert m._warming is not None and m._warming.wait(300)
    ok = m._warming.succeeded
    n = compiling.kernels_compiled()
    fused, s2 = m.forward([4], s)       # the fused step, its kernels from the cache
    batch, _ = m.forward_batch([[4], [5]], [s, s])
    after = compiling.kernels_compiled() - n
    again = rwkvpy.load(sys.argv[1], threads=2)
    print(json.dumps({
        "before": before, "after_step": m.kernels["step"], "succeeded": ok,
        "compiled_after_switch": after, "warming_again": again._warming is not None,
        "seq_vs_fused": float((seq - fused).abs().max()),
        "batch_vs_fused": float((batch[0] - fused).abs().max()),
    }))
""")


def _first_run(tmp_path, model, extra_env=None):
    env = dict(os.environ)
    env.pop("RWKVPY_CACHE_DIR", None)
    env.update(
        {
            coldstart.ENV: "1",
            "XDG_CACHE_HOME": str(tmp_path / "cache"),
            "NUMBA_CACHE_DIR": str(tmp_path / "cache" / "numba"),
        }
    )
    env.update(extra_env or {})
    p = subprocess.run(
        [sys.executable, "-c", FIRST_RUN, str(model)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr


def test_first_run_compiles_the_step_in_a_second_process(tmp_path):
    # v4: the cheapest to compile from an empty cache (about 11 s here, v7's about 33 s; every
    # version and a K-quant mix were checked the same way, with none compiled after the switch)
    r, err = _first_run(tmp_path, V4)
    assert "compile in a second process" in err
    assert "second process" in r["before"] and "second process" not in r["after_step"]
    assert r["succeeded"]
    # every kernel of the step (one and several sequences, either thread count) came from it
    assert r["compiled_after_switch"] == 0
    assert not r["warming_again"]  # the marker: the next run takes the fused step at once
    # F16 weights: the two paths agree as sequence and one-token runs do in every mode
    assert r["seq_vs_fused"] < 1e-4
    assert r["batch_vs_fused"] == 0.0
    marker = next((tmp_path / "cache" / "numba" / "warm").glob("*.done"))
    assert json.loads(marker.read_text())["kernels"] > 0


def _second_process(monkeypatch, tmp_path, command):
    """Loads in this process spawn ``command`` as their second process, markers in tmp_path."""
    monkeypatch.setenv(coldstart.ENV, "1")
    monkeypatch.setattr(coldstart, "COMMAND", command)
    monkeypatch.setattr(coldstart, "folder", lambda: str(tmp_path / "warm"))


def test_a_failed_second_process_leaves_the_model_to_compile(tmp_path, monkeypatch):
    """The second process dies at once: the model takes its fused step after all (compiling
    it itself) and computes the same logits."""
    _second_process(monkeypatch, tmp_path, ("-c", "raise SystemExit(3)"))
    m = rwkvpy.load(str(V7), threads=1)
    assert m._warming is not None and m._warming.wait(60)
    assert not m._warming.succeeded
    lg, s = m.forward([1, 2, 3])
    fused, _ = m.forward([4], s)
    assert m._warming is None  # switched
    monkeypatch.setenv(coldstart.ENV, "0")
    ref = rwkvpy.load(str(V7), mode="exact", threads=1)
    _, rs = ref.forward([1, 2, 3])
    want, _ = ref.forward([4], rs)
    assert float((fused - want).abs().max()) < 1e-4


# Two processes save different signatures of one rwkvpy function into an empty cache at the
# same moment (numba's index save slowed down so that both read the empty index first); a third
# process loads both from the cache and checks each one's result type and value.
SAVER = textwrap.dedent("""
    import sys, time
    from numba.core import caching
    save_index = caching.IndexDataCacheFile._save_index
    def slow(self, overloads):
        time.sleep(float(sys.argv[2]))
        save_index(self, overloads)
    caching.IndexDataCacheFile._save_index = slow
    from rwkvpy.kernels.linear.threads import _row_chunk
    print(repr(_row_chunk(1000, 3) if sys.argv[1] == "int" else _row_chunk(1000.0, 3.0)))
""")
LOADER = textwrap.dedent("""
    from rwkvpy.kernels.linear.threads import _row_chunk
    from rwkvpy import compiling
    a, b = _row_chunk(1000, 3), _row_chunk(1000.0, 3.0)
    print(repr((a, b, compiling.kernels_compiled())))
""")


def test_concurrent_saves_keep_each_signature_its_code(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SAVER, kind, "1.5"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for kind in ("int", "float")
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert [o[0].strip() for o in outs] == ["42", "42.0"]
    p = subprocess.run(
        [sys.executable, "-c", LOADER], env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-2000:]
    a, b, compiled = eval(p.stdout.strip())  # noqa: S307 - our own repr of ints and floats
    assert (a, type(a), b, type(b)) == (42, int, 42.0, float)
    assert compiled == 0  # both signatures were in the cache, each with its own code


def test_a_hung_second_process_is_not_waited_for_past_the_limit(tmp_path, monkeypatch):
    """A second process that never ends: past MAX_WAIT_S the model takes its fused step."""
    _second_process(monkeypatch, tmp_path, ("-c", "import time; time.sleep(60)"))
    m = rwkvpy.load(str(V4), threads=1)
    w = m._warming
    assert w is not None and not w.wait(0.5)  # still running
    monkeypatch.setattr(coldstart, "MAX_WAIT_S", 0.0)
    assert w.wait(5) and not w.succeeded
    assert m.wait_for_kernels(0) is True
    w.proc.kill()
    w.proc.wait()
