"""Regression tests of the fault record (issue 23, docs/reliability.md): one test per class of
finding, each fed the input that once failed (built here from a small valid file, mutated).

Every bad input must end as a typed ``rwkvpy.errors`` exception (or a clean refusal), never
another exception, a hang, a wrong answer or a file left behind. Tests of inputs that once hung
run in a subprocess with a timeout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import rwkvpy
from rwkvpy import State, errors

PY = sys.executable
PKG = os.path.dirname(rwkvpy.__file__)
CLI_TIMEOUT = 120  # seconds: far above a normal run, bounds a hang


@pytest.fixture(scope="module")
def demo():
    return rwkvpy.load("demo")


@pytest.fixture(scope="module")
def demo_state(demo):
    return demo.forward([1, 2, 3])[1]


def _bounded(fn, timeout=CLI_TIMEOUT):
    """The exception fn() raises (None if it returns), run in a daemon thread: a call that no
    longer ends fails the test after ``timeout`` seconds instead of hanging the suite."""
    import threading

    box = {}

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still running after {timeout} s"
    return box.get("error")


# -- API input: forward, forward_batch, states -------------------------------------------------------

BAD_TOKENS = [
    2**63,
    [2**63],
    "abc",
    b"ab",
    [[1, 2]],
    None,
    {1: 2},
    {1, 2},
    (x for x in [1]),
    [1.5],
    [True],
    1 + 2j,
    [1 + 2j],
    torch.tensor([1 + 2j]),
    np.array([1.0]),
    np.array([1 + 2j]),
    [],
    torch.zeros(0, dtype=torch.long),
    torch.tensor([1], device="meta"),
    [-1],
    [256],
    [1, "2"],
]


@pytest.mark.parametrize("tokens", BAD_TOKENS, ids=lambda t: type(t).__name__)
def test_forward_refuses_bad_tokens(demo, tokens):
    with pytest.raises(errors.TokenError):
        demo.forward(tokens)


@pytest.mark.parametrize("arg", [5, "abc", None, {1: [2]}])
def test_forward_batch_refuses_non_lists(demo, arg):
    with pytest.raises(errors.TokenError):
        demo.forward_batch(arg)
    with pytest.raises(errors.StateError):
        demo.forward_batch([[1]], states=5)


def test_forward_takes_integer_arrays(demo):
    want = demo.forward([1, 2])[0]
    for t in (
        np.array([1, 2], dtype=np.uint8),
        torch.tensor([1, 2], dtype=torch.int32),
        (1, 2),
        range(1, 3),
    ):
        assert torch.equal(demo.forward(t)[0], want)


def _swap(state, fn):
    return dataclasses.replace(
        state, att_x=fn(state.att_x), ffn_x=fn(state.ffn_x), wkv=fn(state.wkv)
    )


@pytest.mark.parametrize(
    "fn",
    [
        lambda t: t.half(),
        lambda t: t.double(),
        lambda t: t.transpose(0, 1).contiguous().transpose(0, 1),
    ],
    ids=["float16", "float64", "non-contiguous"],
)
def test_state_of_other_float_layout_is_converted(demo, demo_state, fn):
    """Converted to float32 contiguous before the kernels: no new numba specialization."""
    want = demo.forward([4], demo_state)[0]
    s = _swap(demo_state, fn)
    for tokens in ([4], [4, 5]):
        lg, new = demo.forward(tokens, s)
        assert new.wkv.dtype == torch.float32 and torch.isfinite(lg).all()
    assert (demo.forward([4], s)[0] - want).abs().max() < 0.05


@pytest.mark.parametrize(
    "fn,needle",
    [
        (lambda t: t.int(), "dtype torch.int32"),
        (lambda t: t.to(torch.complex64), "dtype torch.complex64"),
        (lambda t: t.to("meta"), "meta device"),
        (lambda t: t * float("nan"), "NaN or infinite"),
        (lambda t: t + float("inf"), "NaN or infinite"),
    ],
)
def test_state_of_bad_values_is_refused(demo, demo_state, fn, needle):
    with pytest.raises(errors.StateError, match=needle):
        demo.forward([4], _swap(demo_state, fn))
    with pytest.raises(errors.StateError, match=needle):
        demo.forward_batch([[4], [5]], [demo_state, _swap(demo_state, fn)])


def test_state_fields_of_wrong_type_are_refused(demo, demo_state):
    for bad in (
        dataclasses.replace(demo_state, n_tokens="3"),
        dataclasses.replace(demo_state, n_tokens=-1),
        dataclasses.replace(demo_state, att_x=[0.0]),
        dataclasses.replace(demo_state, last_logits=torch.zeros(3)),
        dataclasses.replace(demo_state, model_fingerprint=7),
    ):
        with pytest.raises(errors.StateError):
            demo.forward([4], bad)


# -- saved states ---------------------------------------------------------------------------------------


def _state_file(path, header, data, version=2):
    """A state file with this header and data and a valid checksum: what is refused is the
    header itself."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    body = b"RWKVSTAT" + struct.pack("<IQ", version, len(hb)) + hb + data
    path.write_bytes(body + (hashlib.sha256(body).digest() if version >= 2 else b""))
    return path


def _parts(path):
    raw = path.read_bytes()
    hlen = struct.unpack_from("<Q", raw, 12)[0]
    return json.loads(raw[20 : 20 + hlen]), raw[20 + hlen : -32]


def _mutations():
    def drop(*keys):
        def f(h):
            d = h
            for k in keys[:-1]:
                d = d[k]
            del d[keys[-1]]

        return f

    def put(value, *keys):
        def f(h):
            d = h
            for k in keys[:-1]:
                d = d[k]
            d[keys[-1]] = value

        return f

    return {
        "no tensors": drop("tensors"),
        "no n_tokens": drop("n_tokens"),
        "no wkv": drop("tensors", "wkv"),
        "no shape": drop("tensors", "att_x", "shape"),
        "n_tokens str": put("3", "n_tokens"),
        "n_tokens neg": put(-3, "n_tokens"),
        "n_layer bool": put(True, "n_layer"),
        "n_embd float": put(192.0, "n_embd"),
        "tensors list": put([1, 2], "tensors"),
        "tensor str": put("x", "tensors", "wkv"),
        "shape str": put("abc", "tensors", "wkv", "shape"),
        "shape nested": put([[4]], "tensors", "wkv", "shape"),
        "shape zero": put([0, 192], "tensors", "att_x", "shape"),
        "nbytes wrong": put(12, "tensors", "att_x", "nbytes"),
        "offset str": put("0", "tensors", "att_x", "offset"),
        "offset overlap": put(4, "tensors", "ffn_x", "offset"),
        "wkv_shape other": put([4, 3, 64, 32], "wkv_shape"),
        "architecture list": put(["7"], "architecture"),
        "architecture other": put("4", "architecture"),
        "fingerprint int": put(5, "model_fingerprint"),
        "extra list": put([1], "extra"),
        "extra tensor": put({"shape": [1], "offset": 0, "nbytes": 4}, "tensors", "x"),
    }


@pytest.mark.parametrize("name", list(_mutations()))
def test_state_header_fields_are_checked(demo_state, tmp_path, name):
    demo_state.save(tmp_path / "s.state")
    header, data = _parts(tmp_path / "s.state")
    _mutations()[name](header)
    bad = _state_file(tmp_path / "bad.state", header, data)
    with pytest.raises(errors.StateError):
        State.load(bad)


@pytest.mark.parametrize(
    "raw",
    [b"[" * 100_000, b"[1, 2]", b"null", b"\xff\xfe{", b"7"],
    ids=["deep", "list", "null", "not-utf8", "int"],
)
def test_state_header_that_is_not_an_object(tmp_path, raw):
    with pytest.raises(errors.StateError, match="corrupt state header"):
        State.load(_state_file(tmp_path / "bad.state", raw, b""))


def test_state_header_length_beyond_the_file(demo_state, tmp_path):
    demo_state.save(tmp_path / "s.state")
    raw = bytearray((tmp_path / "s.state").read_bytes())
    raw[12:20] = struct.pack("<Q", 2**64 - 1)
    (tmp_path / "bad.state").write_bytes(bytes(raw))
    with pytest.raises(errors.StateError, match="truncated"):
        State.load(tmp_path / "bad.state")


def test_state_checksum_covers_the_header(demo, demo_state, tmp_path):
    demo_state.save(tmp_path / "s.state")
    raw = (tmp_path / "s.state").read_bytes()
    n = b'"n_tokens": 3'
    assert raw.count(n) == 1
    (tmp_path / "bad.state").write_bytes(raw.replace(n, b'"n_tokens": 9'))
    with pytest.raises(errors.StateError, match="checksum mismatch"):
        State.load(tmp_path / "bad.state", demo)


def test_state_file_with_nan_is_refused(demo_state, tmp_path):
    demo_state.save(tmp_path / "s.state")
    header, data = _parts(tmp_path / "s.state")
    data = bytearray(data)
    data[0:4] = struct.pack("<f", float("nan"))
    with pytest.raises(errors.StateError, match="NaN or infinite"):
        State.load(_state_file(tmp_path / "bad.state", header, bytes(data)))


def test_state_file_version_1_still_reads(demo, demo_state, tmp_path):
    demo_state.save(tmp_path / "s.state")
    header, data = _parts(tmp_path / "s.state")
    header["sha256"] = hashlib.sha256(data).hexdigest()
    s = State.load(_state_file(tmp_path / "v1.state", header, data, version=1), demo)
    assert torch.equal(s.wkv, demo_state.wkv) and s.n_tokens == 3


# -- non-regular files: FIFOs and devices are refused before they are opened ----------------------


def test_fifo_and_device_reads_are_refused(tmp_path):
    """Each of these once blocked forever (a FIFO) or read without end (the zero device): the
    API calls and the CLI commands run in one subprocess, bounded by a timeout."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code = textwrap.dedent(f"""
        import rwkvpy
        from rwkvpy import State, errors, formats
        from rwkvpy.cli import main
        for call in (lambda: formats.sniff({str(fifo)!r}), lambda: formats.read({str(fifo)!r}),
                     lambda: rwkvpy.inspect({str(fifo)!r}), lambda: formats.read("/dev/zero")):
            try:
                call()
            except errors.NotARegularFileError as e:
                print("refused:", e)
        for path in ({str(fifo)!r}, "/dev/zero"):
            try:
                State.load(path)
            except errors.StateError as e:
                print("refused:", e)
        print("status", main(["info", {str(fifo)!r}]))
        print("status", main(["generate", "demo", "hi", "--max-tokens", "1", "--state",
                              {str(fifo)!r}]))
    """)
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 8 and all("not a regular file" in ln for ln in lines[:6]), r.stdout
    assert "FIFO" in lines[0] and "character device" in lines[5]
    assert lines[6:] == ["status 1", "status 1"], r.stdout
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith("rwkvpy: error:")]
    assert len(errs) == 2 and "Traceback" not in r.stderr, r.stderr
    assert all("is a FIFO (named pipe), not a regular file" in e for e in errs), r.stderr


# -- writers -----------------------------------------------------------------------------------------


def test_write_refuses_non_regular_destination(demo_state, tmp_path):
    import stat

    from rwkvpy.formats.atomic import atomic_path

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(errors.FileWriteError, match="is a FIFO .* refusing to replace it"):
        demo_state.save(fifo)
    with pytest.raises(errors.FileWriteError, match="is a FIFO"):
        with atomic_path(fifo):
            pass
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    try:  # a character device of our own (the null device's numbers), where mknod is allowed
        os.mknod(tmp_path / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except OSError:
        pass
    else:
        with pytest.raises(errors.FileWriteError, match="is a character device"):
            demo_state.save(tmp_path / "null")
        assert stat.S_ISCHR(os.stat(tmp_path / "null").st_mode)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_write_into_missing_or_read_only_folder(demo_state, tmp_path):
    dst = tmp_path / "missing" / "s.state"
    with pytest.raises(errors.FileWriteError, match=f"{dst}: cannot create a file in") as e:
        demo_state.save(dst)
    assert isinstance(e.value, OSError) and e.value.errno is not None
    if os.geteuid() != 0:  # root writes into read-only folders
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(errors.FileWriteError, match="Permission denied"):
            demo_state.save(ro / "s.state")


def test_temp_of_killed_writer_is_removed(tmp_path):
    """A writer killed with SIGKILL mid-write leaves its temp file; the next writer of the same
    file removes it (its name carries the dead writer's pid), and never a live writer's."""
    from rwkvpy.formats.atomic import atomic_write, clean_dead_temps

    dst = tmp_path / "model.bin"
    code = textwrap.dedent(f"""
        import sys, time, types
        for name, folder in (("rwkvpy", {PKG!r}), ("rwkvpy.formats", {PKG + "/formats"!r})):
            sys.modules[name] = types.ModuleType(name)  # atomic.py alone: no torch to import
            sys.modules[name].__path__ = [folder]
        from rwkvpy.formats.atomic import atomic_write
        with atomic_write({str(dst)!r}) as f:
            f.write(b"x" * (1 << 20))
            f.flush()
            print("writing", flush=True)
            time.sleep(600)
    """)
    p = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "writing"
        temps = os.listdir(tmp_path)
        assert len(temps) == 1 and temps[0].endswith(f"-{p.pid}.{temps[0].split('.')[-2]}.tmp")
        assert clean_dead_temps(dst) == [] and os.listdir(tmp_path) == temps  # alive: kept
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    assert os.listdir(tmp_path) == temps  # the kill left it
    with atomic_write(dst) as f:
        f.write(b"complete")
    assert os.listdir(tmp_path) == ["model.bin"] and dst.read_bytes() == b"complete"


# -- .pth and safetensors ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_pth(tmp_path_factory):
    """A small valid v7 BlinkDL checkpoint (300 KB), float32."""
    from rwkvpy.config import Version
    from rwkvpy.synth import save_random_model

    return save_random_model(
        tmp_path_factory.mktemp("pth") / "small.pth",
        version=Version.V7,
        n_embd=64,
        n_layer=1,
        vocab=50,
        seed=1,
        dtype=torch.float32,
    )


def _rezip(src, dst, change):
    """Copy a PyTorch zip archive, record by record, through change(name, bytes) (CRCs valid)."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info, change(info.filename, zin.read(info)))
    return dst


def _loads_or_typed(path):
    """Load and run one forward: fine, or a typed error; never another exception or NaN."""
    try:
        model = rwkvpy.load(path, cache=False)
    except errors.RwkvpyError:
        return "typed"
    logits, _ = model.forward([1, 2, 3])
    assert torch.isfinite(logits).all()
    return "loaded"


@pytest.mark.parametrize(
    "pickle_bytes",
    [
        b"\x80\x02h\x05.",  # KeyError: no memo 5
        b"\x80\x02.",  # IndexError: empty stack
        b"\x80\x02K\x01K\x02\x86R.",  # IndexError
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nq\x00)R.",  # TypeError: no arguments
    ],
)
def test_pth_unpickler_errors_are_typed(small_pth, tmp_path, pickle_bytes):
    (tmp_path / "legacy.pth").write_bytes(pickle_bytes)  # read by torch's weights-only unpickler
    with pytest.raises(errors.ModelFileError):
        rwkvpy.load(tmp_path / "legacy.pth")
    bad = _rezip(
        small_pth, tmp_path / "zip.pth", lambda n, d: pickle_bytes if n.endswith("data.pkl") else d
    )
    with pytest.raises(errors.ModelFileError):
        rwkvpy.load(bad)


def test_pth_mutated_pickles_load_or_are_typed(small_pth, tmp_path):
    import random

    rng = random.Random(23)
    for i in range(20):

        def change(name, data):
            if not name.endswith("data.pkl"):
                return data
            data = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.choice([0, 1, 0x7F, 0x80, 0xFF])
            return bytes(data)

        _loads_or_typed(_rezip(small_pth, tmp_path / f"m{i}.pth", change))


@pytest.mark.parametrize("cut", [lambda d: b"", lambda d: d[: len(d) // 2]], ids=["empty", "half"])
def test_pth_storage_record_shorter_than_its_tensor(small_pth, tmp_path, cut):
    """Once loaded with NaN logits (mmap read past the record): the CRC is valid, the size is
    what is wrong."""
    bad = _rezip(
        small_pth, tmp_path / "cut.pth", lambda n, d: cut(d) if n.endswith("/data/0") else d
    )
    with pytest.raises(errors.TruncatedFileError, match="storage record .*data/0' holds"):
        rwkvpy.load(bad)


@pytest.mark.parametrize(
    "name,shape",
    [
        ("emb.weight", (50, 0)),
        ("blocks.0.att.w1", (64, 0)),
        ("blocks.0.att.w2", (33, 64)),
        ("blocks.0.att.g1", (64, 3)),
        ("blocks.0.ffn.key.weight", (0, 64)),
    ],
)
def test_pth_empty_or_disagreeing_dimensions(small_pth, tmp_path, name, shape):
    """Empty dimensions once reached a division by zero in the kernels, LoRA ranks that disagree
    a failed product: both are shape errors at load."""
    sd = torch.load(small_pth, weights_only=True)
    sd[name] = torch.zeros(shape)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises((errors.TensorShapeError, errors.MissingTensorError)):
        rwkvpy.load(tmp_path / "bad.pth")


def test_safetensors_starting_like_a_zip(small_pth, tmp_path):
    from safetensors.torch import save_file

    save_file(torch.load(small_pth, weights_only=True), tmp_path / "m.safetensors")
    raw = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "pk.safetensors").write_bytes(b"PK\x03\x04" + raw[4:])
    with pytest.raises(errors.ModelFileError):
        rwkvpy.load(tmp_path / "pk.safetensors")


# -- Hugging Face folders --------------------------------------------------------------------------------


@pytest.fixture
def hf_folder(small_pth, tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(torch.load(small_pth, weights_only=True), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"architectures": ["Rwkv7ForCausalLM"]}))
    return folder


@pytest.mark.parametrize(
    "config",
    [
        b"[1, 2]",
        b"[" * 100_000,
        b"\xff",
        b'{"architectures": 5}',
        b'{"rescale_every": "abc"}',
        b'{"vocab_size": [1]}',
        b'{"model_type": {}}',
    ],
    ids=["list", "deep", "not-utf8", "architectures", "rescale_every", "vocab_size", "model_type"],
)
def test_hf_config_of_wrong_shape(hf_folder, config):
    (hf_folder / "config.json").write_bytes(config)
    with pytest.raises(errors.UnknownFormatError, match="config.json"):
        rwkvpy.load(hf_folder)


def test_hf_index_stays_inside_the_folder(hf_folder, tmp_path):
    os.replace(hf_folder / "model.safetensors", tmp_path / "outside.safetensors")
    index = hf_folder / "model.safetensors.index.json"
    for ref in (
        "../outside.safetensors",
        "../../../../x",
        str(tmp_path / "outside.safetensors"),
        "a/../../outside.safetensors",
    ):
        index.write_text(json.dumps({"weight_map": {"emb.weight": ref}}))
        with pytest.raises(errors.UnknownFormatError, match="outside the model folder"):
            rwkvpy.load(hf_folder)
    for doc in ([1], {"weight_map": [1]}, {"weight_map": {"emb.weight": 5}}):
        index.write_text(json.dumps(doc))
        with pytest.raises(errors.UnknownFormatError, match="index.json"):
            rwkvpy.load(hf_folder)
    os.replace(tmp_path / "outside.safetensors", hf_folder / "model.safetensors")
    index.write_text(json.dumps({"weight_map": {"emb.weight": "./model.safetensors"}}))
    assert _loads_or_typed(hf_folder) == "loaded"


# -- rwkv.cpp .bin -------------------------------------------------------------------------------------


def test_bin_with_a_duplicated_tensor_is_refused(tmp_path):
    """Once loaded, the last copy winning."""
    from conftest import fixture_path

    raw = fixture_path("rwkv-cpp-tiny", "tiny-rwkv-4v0-660K-FP32.bin").read_bytes()
    n_dims, key_len, type_id = struct.unpack_from("<3i", raw, 24)
    dims = struct.unpack_from(f"<{n_dims}i", raw, 36)
    assert type_id == 0  # F32
    end = 36 + 4 * n_dims + key_len + 4 * int(np.prod(dims))
    (tmp_path / "dup.bin").write_bytes(raw + raw[24:end])
    with pytest.raises(errors.UnknownFormatError, match="'emb.weight' at offset .* appears twice"):
        rwkvpy.load(tmp_path / "dup.bin")


# -- the server --------------------------------------------------------------------------------------------

MAX_PROMPT = 64


@pytest.fixture(scope="module")
def api(demo):
    """The app in this process (starlette's TestClient), the demo model behind it."""
    from starlette.testclient import TestClient

    from rwkvpy.engine import Engine
    from rwkvpy.server.app import ServerConfig, ServerState, build_app

    tok = demo.tokenizer()
    server = ServerState(
        demo, tok, Engine(demo, tok), ServerConfig(model_name="demo", max_prompt_tokens=MAX_PROMPT)
    )
    with TestClient(build_app(server), raise_server_exceptions=False) as client:
        yield client


def _error(r, status, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert "Traceback" not in err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,
        b'{"prompt": ' + b"[" * 100_000,
        b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    ],
    ids=["array", "in-object", "closed"],
)
def test_server_deep_json_is_400(api, body):
    r = api.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text


@pytest.mark.parametrize(
    "route,body",
    [
        ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 1}'),
        ("/v1/completions", '{"prompt": "a\\udfff", "max_tokens": 1, "echo": true}'),
        ("/v1/completions", '{"prompt": ["ok", "\\ud83d"], "max_tokens": 1}'),
        ("/v1/completions", '{"prompt": "a", "stop": ["\\ud800"], "max_tokens": 1}'),
        ("/v1/completions", '{"prompt": "a", "model": "\\ud800", "max_tokens": 1}'),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi \\ud800"}]}'),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
        ),
        ("/v1/states", '{"id": "s", "prompt": "\\ud800"}'),
        ("/v1/completions", '{"\\ud800": 1, "prompt": "a", "max_tokens": 1}'),
    ],
)
def test_server_lone_surrogates_are_400(api, route, body):
    r = api.post(route, content=body.encode(), headers={"content-type": "application/json"})
    _error(r, 400, "invalid_unicode")


def test_server_state_ids_match_in_full(api):
    from rwkvpy.cli.serve import ServeError, _parse_states

    for sid in ("a\n", "a\nb", "../x", "/etc/x", "a\x00", ""):
        _error(api.post("/v1/states", json={"id": sid, "prompt": "x"}), 400)
        if sid:
            _error(
                api.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "state": sid}),
                400,
            )
            with pytest.raises(ServeError):
                _parse_states([f"{sid}=file.state"])
    r = api.post("/v1/states", json={"id": "fine-1", "prompt": "x"})
    assert r.status_code == 200, r.text


def test_server_prompt_size_bound(api):
    ok = api.post("/v1/completions", json={"prompt": [1] * MAX_PROMPT, "max_tokens": 1})
    assert ok.status_code == 200, ok.text
    for route, body in [
        ("/v1/completions", {"prompt": [1] * (MAX_PROMPT + 1), "max_tokens": 1}),
        ("/v1/completions", {"prompt": ["a", "b" * (MAX_PROMPT + 1)], "max_tokens": 1}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w " * MAX_PROMPT}]}),
        ("/v1/states", {"id": "long", "prompt": "c" * (MAX_PROMPT + 1)}),
    ]:
        err = _error(api.post(route, json=body), 400, "context_length_exceeded")
        assert f"at most {MAX_PROMPT}" in err["message"]
    stats = api.get("/v1/stats").json()
    assert stats["slots_used"] == 0


def test_serve_help_documents_limits():
    import argparse

    from rwkvpy.cli.serve import DEFAULTS, add_serve_arguments

    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    text = " ".join(p.format_help().split())
    assert "--max-prompt-tokens" in text and "default 32768" in text
    assert "prefix cache memory cap" in text and "= 512 MiB" in text
    assert DEFAULTS["cache_bytes"] == 512 << 20 and DEFAULTS["max_prompt_tokens"] == 32768
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "server.md")).read()
    assert "`--max-prompt-tokens N` | 32768" in doc and "512 MiB by default" in doc


def test_server_answers_503_while_draining(demo):
    """SIGTERM with a stream running: the server keeps listening and answers new requests 503
    until the stream ends (it once refused new connections), then stops. uvicorn runs in a
    thread here, so the signal handler is called directly."""
    import threading
    import time

    import httpx
    import uvicorn

    from rwkvpy.cli.serve import _bind, _server_class
    from rwkvpy.engine import Engine
    from rwkvpy.server.app import ServerConfig, ServerState, build_app

    tok = demo.tokenizer()
    state = ServerState(
        demo,
        tok,
        Engine(demo, tok),
        ServerConfig(model_name="demo", graceful_timeout=60, max_tokens_limit=100000),
    )
    sock = _bind("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv = _server_class(uvicorn)(
        uvicorn.Config(build_app(state), lifespan="on", log_level="warning"), state
    )
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            with http.stream(
                "POST",
                "/v1/completions",
                json={"prompt": "Once", "max_tokens": 100000, "stream": True},
            ) as r:
                lines = r.iter_lines()  # kept: a dropped iterator would close the stream
                assert next(lines).startswith("data: ")
                srv.handle_exit(signal.SIGTERM, None)
                deadline = time.monotonic() + 30
                while http.get("/health").status_code != 503:  # the drain has begun
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                with httpx.Client(base_url=url, timeout=30) as fresh:  # a new connection
                    _error(
                        fresh.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}),
                        503,
                        "server_shutting_down",
                    )
                assert not srv.should_exit and state.slots_used == 1
        thread.join(CLI_TIMEOUT)  # the client went away: the drain ends, uvicorn stops
        assert not thread.is_alive()
    finally:
        srv.should_exit = True
        thread.join(CLI_TIMEOUT)
        sock.close()


# -- GGUF ----------------------------------------------------------------------------------------------------

DEMO_GGUF = os.path.join(os.path.dirname(rwkvpy.__file__), "data", "demo-v7-192x4-q8_0.gguf")
G_U32, G_I32, G_F32, G_STR, G_ARR, G_U8 = 4, 5, 6, 8, 9, 0


def _gstr(b):
    b = b.encode() if isinstance(b, str) else b
    return struct.pack("<Q", len(b)) + b


def _kv(key, vtype, payload):
    return _gstr(key) + struct.pack("<I", vtype) + payload


def _gguf(dst, kvs, infos=(), data=b""):
    """A GGUF v3 file: raw key-values, tensor infos (name, ggml dims, type, offset), data."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(infos), len(kvs)) + b"".join(kvs)
    for name, dims, typ, off in infos:
        out += (
            _gstr(name)
            + struct.pack(f"<I{len(dims)}Q", len(dims), *dims)
            + struct.pack("<IQ", typ, off)
        )
    dst.write_bytes(out + b"\0" * (-len(out) % 32) + data)
    return dst


def _regguf(dst, kvs=None, tensor=None):
    """The demo model's GGUF rewritten: key-values replaced or added (raw bytes by key), each
    tensor info through tensor(name, dims, type, offset); the data section unchanged."""
    import gguf

    r = gguf.GGUFReader(DEMO_GGUF)
    kvs = dict(kvs or {})
    raw = [
        kvs.pop(k) if k in kvs else b"".join(p.tobytes() for p in f.parts)
        for k, f in r.fields.items()
        if not k.startswith("GGUF.")
    ] + list(kvs.values())
    infos = []
    for t in r.tensors:
        info = (
            t.name,
            [int(d) for d in t.field.parts[3]],
            int(t.field.parts[4][0]),
            int(t.field.parts[5][0]),
        )
        infos.append(tensor(*info) if tensor else info)
    return _gguf(dst, raw, infos, bytes(r.data[r.data_offset :]))


def _retensor(target, name=None, dims=None, offset=None):
    def change(n, d, t, o):
        if n != target:
            return n, d, t, o
        return name or n, dims or d, t, o if offset is None else offset

    return change


GGUF_HEADER_FAULTS = {
    "arch not UTF-8": dict(
        kvs={"general.architecture": _kv("general.architecture", G_STR, _gstr(b"rwkv\xff"))}
    ),
    "head_size str": dict(
        kvs={"rwkv7.wkv.head_size": _kv("rwkv7.wkv.head_size", G_STR, _gstr("abc"))}
    ),
    "head_size 7": dict(
        kvs={"rwkv7.wkv.head_size": _kv("rwkv7.wkv.head_size", G_U32, struct.pack("<I", 7))}
    ),
    "head_size -64": dict(
        kvs={"rwkv7.wkv.head_size": _kv("rwkv7.wkv.head_size", G_I32, struct.pack("<i", -64))}
    ),
    "head_size 2^32-1": dict(
        kvs={"rwkv7.wkv.head_size": _kv("rwkv7.wkv.head_size", G_U32, struct.pack("<I", 2**32 - 1))}
    ),
    "file_type str": dict(kvs={"general.file_type": _kv("general.file_type", G_STR, _gstr("abc"))}),
    "rescale str": dict(
        kvs={
            "rwkv7.rescale_every_n_layers": _kv("rwkv7.rescale_every_n_layers", G_STR, _gstr("abc"))
        }
    ),
    "eps str": dict(
        kvs={
            "rwkv7.attention.group_norm_epsilon": _kv(
                "rwkv7.attention.group_norm_epsilon", G_STR, _gstr("abc")
            )
        }
    ),
    "eps NaN": dict(
        kvs={
            "rwkv7.attention.group_norm_epsilon": _kv(
                "rwkv7.attention.group_norm_epsilon", G_F32, struct.pack("<f", float("nan"))
            )
        }
    ),
    "r_k misshaped": dict(tensor=_retensor("blk.0.time_mix_r_k.weight", dims=[191])),
    "fused lerp misshaped": dict(
        tensor=_retensor("blk.0.time_mix_lerp_fused.weight", dims=[193, 1, 1, 5])
    ),
    "w1 one dimension": dict(tensor=_retensor("blk.0.time_mix_w1.weight", dims=[192 * 32])),
    "layer ²": dict(tensor=_retensor("blk.0.attn_norm.weight", name="blk.\u00b2.attn_norm.weight")),
    "layer 5000": dict(
        tensor=_retensor("blk.0.time_mix_output.weight", name="blk.5000.time_mix_output.weight")
    ),
    "rescale 2^100": dict(
        kvs={
            "rwkv7.rescale_every_n_layers": _kv(
                "rwkv7.rescale_every_n_layers", G_U32, struct.pack("<I", 1)
            )
        },
        tensor=_retensor("blk.0.time_mix_output.weight", name="blk.100.time_mix_output.weight"),
    ),
    "offset 2^64-1": dict(tensor=_retensor("blk.0.attn_norm.weight", offset=2**64 - 1)),
}


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the library's sum
@pytest.mark.parametrize("fault", list(GGUF_HEADER_FAULTS))
def test_gguf_header_fields_are_checked(tmp_path, fault):
    """Each once escaped as ValueError, RuntimeError, IndexError, UnicodeDecodeError or
    OverflowError, or (the offset) loaded with NaN logits."""
    bad = _regguf(tmp_path / "bad.gguf", **GGUF_HEADER_FAULTS[fault])
    with pytest.raises(errors.ModelFileError):
        rwkvpy.load(bad, cache=False)


def test_gguf_counts_are_bounded_by_the_file(tmp_path):
    """An array announcing 2^40 items (once half a minute and 664 MB), arrays nested 2,000 deep
    (once a RecursionError): refused before anything is allocated. Bounded by a timeout."""
    arch = _kv("general.architecture", G_STR, _gstr("rwkv7"))
    nested = b"".join(struct.pack("<IQ", G_ARR, 1) for _ in range(2000)) + struct.pack(
        "<IQ", G_U8, 0
    )
    files = [_gguf(tmp_path / "nested.gguf", [arch, _kv("x", G_ARR, nested)])]
    for i, itype in enumerate((G_U32, G_STR, G_ARR, 7)):  # 7: bool
        files.append(
            _gguf(
                tmp_path / f"count{i}.gguf",
                [arch, _kv("x", G_ARR, struct.pack("<IQ", itype, 2**40) + bytes(64))],
            )
        )
    swapped = bytearray(files[1].read_bytes())
    swapped[4:8] = struct.pack(">I", 3)  # the big-endian reading of the same file
    files.append(tmp_path / "swapped.gguf")
    files[-1].write_bytes(bytes(swapped))
    for path in files:
        assert isinstance(_bounded(lambda: rwkvpy.inspect(path)), errors.ModelFileError)


def test_gguf_cli_prints_one_line(tmp_path, capsys):
    from rwkvpy.cli import main

    bad = _regguf(tmp_path / "bad.gguf", **GGUF_HEADER_FAULTS["arch not UTF-8"])
    assert main(["info", str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"rwkvpy: error: {bad}: GGUF key 'general.architecture' cannot be read: "
        "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 4: "
        "invalid start byte"
    ], err
