"""Bad input: typed exceptions (ValueError subclasses) whose messages name the file, the tensor
or field, what was found and what was expected."""

import os
import shutil
import struct

import pytest
import torch
from conftest import fixture_path

import rwkvpy
from rwkvpy import errors
from rwkvpy.formats import rwkvcpp

BIN = "tiny-rwkv-4v0-660K-FP32.bin"


@pytest.fixture
def bin_copy(tmp_path):
    dst = tmp_path / "model.bin"
    shutil.copy(fixture_path("rwkv-cpp-tiny", BIN), dst)
    os.chmod(dst, 0o644)
    return dst


def patch(path, offset, fmt, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def test_all_errors_are_value_errors():
    for name in dir(errors):
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, ValueError), name


@pytest.mark.parametrize(
    "size,needle",
    [
        (10, "shorter than the 24-byte rwkv.cpp header"),
        (24 + 6, "stray bytes"),
        (24 + 14, "file ends inside the tensor header"),
        (
            24 + 12 + 8 + 10 + 100,
            "tensor 'emb.weight' (F32, shape (256, 128)) needs 131072 bytes "
            "at offset 54, the file has 100 left",
        ),
    ],
)
def test_truncated_bin(bin_copy, size, needle):
    truncate(bin_copy, size)
    with pytest.raises(errors.TruncatedFileError) as e:
        rwkvpy.load(bin_copy)
    assert str(bin_copy) in str(e.value) and needle in str(e.value)


def test_truncated_in_last_tensor(bin_copy):
    truncate(bin_copy, os.path.getsize(bin_copy) - 3)
    with pytest.raises(
        errors.TruncatedFileError,
        match=r"tensor 'head.weight' .* needs 131072 bytes at offset \d+, the file has 131069 left",
    ):
        rwkvpy.load(bin_copy)


def test_wrong_magic(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"\x00\x01\x02\x03" * 16)
    with pytest.raises(errors.UnknownFormatError, match=r"starts with bytes 00 01 02 03.*expected"):
        rwkvpy.load(p)


def test_unknown_file_version(bin_copy):
    patch(bin_copy, 4, "<i", 102)
    with pytest.raises(
        errors.UnsupportedVersionError, match="file version 102, expected 100 or 101"
    ):
        rwkvpy.load(bin_copy)


def test_unknown_tensor_type(bin_copy):
    patch(bin_copy, 24 + 8, "<i", 42)
    with pytest.raises(
        errors.UnsupportedTensorTypeError,
        match=r"tensor 'emb.weight' has unknown data type 42; expected one of 0 \(F32\)",
    ):
        rwkvpy.load(bin_copy)


def test_removed_tensor_type(bin_copy):
    patch(bin_copy, 24 + 8, "<i", 5)
    with pytest.raises(
        errors.UnsupportedTensorTypeError, match=r"data type 5 \(Q4_2\), a format ggml removed"
    ):
        rwkvpy.load(bin_copy)


def test_unknown_header_type(bin_copy):
    patch(bin_copy, 20, "<i", 99)
    with pytest.raises(
        errors.UnsupportedTensorTypeError, match="the header has unknown data type 99"
    ):
        rwkvpy.load(bin_copy)


def test_quantized_version_100_refused(tmp_path):
    p = tmp_path / "q.bin"
    shutil.copy(fixture_path("rwkv-cpp-tiny", "tiny-rwkv-4v0-660K-Q5_1.bin"), p)
    os.chmod(p, 0o644)
    patch(p, 4, "<i", 100)
    with pytest.raises(errors.UnsupportedVersionError, match=r"Q5_1 in a file version 100"):
        rwkvpy.load(p)


def test_fp32_version_100_loads(bin_copy):
    patch(bin_copy, 4, "<i", 100)
    assert rwkvpy.load(bin_copy).info.file_meta["file_version"] == 100


def rewrite_bin(src, dst, drop=(), reshape=None):
    header, tensors, types = rwkvcpp.read_raw(src)
    entries = []
    for name, t in tensors.items():
        if name in drop:
            continue
        shape = tuple(t.shape)
        if reshape and name in reshape:
            shape = reshape[name]
        data = t.data if hasattr(t, "fmt") else t.numpy().tobytes()
        entries.append((name, types[name], shape, data))
    rwkvcpp.write_raw(dst, header, entries)


def test_missing_tensor_bin(tmp_path):
    p = tmp_path / "m.bin"
    rewrite_bin(fixture_path("rwkv-cpp-tiny", BIN), p, drop={"blocks.1.att.key.weight"})
    with pytest.raises(
        errors.MissingTensorError, match=r"tensor 'blocks.1.att.key.weight' not found"
    ):
        rwkvpy.load(p)


def test_misshaped_tensor_bin(tmp_path):
    p = tmp_path / "s.bin"
    rewrite_bin(
        fixture_path("rwkv-cpp-tiny", BIN), p, reshape={"blocks.1.ffn.key.weight": (128, 256)}
    )
    with pytest.raises(
        errors.TensorShapeError,
        match=r"tensor 'blocks.1.ffn.key.weight' has shape \(128, 256\), expected \(256, 128\)",
    ):
        rwkvpy.load(p)


def test_written_bin_round_trips(tmp_path):
    p = tmp_path / "same.bin"
    rewrite_bin(fixture_path("rwkv-cpp-tiny", BIN), p)
    assert p.read_bytes() == fixture_path("rwkv-cpp-tiny", BIN).read_bytes()


# -- .pth ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v6_state_dict():
    return torch.load(fixture_path("reference-pth", "v6_c192_l2.pth"), weights_only=True)


def test_pth_missing_tensor(tmp_path, v6_state_dict):
    sd = dict(v6_state_dict)
    del sd["blocks.1.att.time_maa_w2"]
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(
        errors.MissingTensorError, match=r"m.pth: tensor 'blocks.1.att.time_maa_w2' not found"
    ):
        rwkvpy.load(tmp_path / "m.pth")


def test_pth_misshaped_tensor(tmp_path, v6_state_dict):
    sd = dict(v6_state_dict)
    sd["blocks.1.ffn.key.weight"] = sd["blocks.1.ffn.key.weight"].t().contiguous()
    torch.save(sd, tmp_path / "s.pth")
    with pytest.raises(
        errors.TensorShapeError,
        match=r"'blocks.1.ffn.key.weight' has shape \(192, 672\), "
        r"expected \(672, 192\) for RWKV v6",
    ):
        rwkvpy.load(tmp_path / "s.pth")


def test_pth_not_a_dict(tmp_path):
    torch.save([torch.zeros(3)], tmp_path / "l.pth")
    with pytest.raises(errors.NotAStateDictError, match="holds a list, expected a dict of tensors"):
        rwkvpy.load(tmp_path / "l.pth")


def test_pth_dict_with_non_tensor(tmp_path):
    torch.save({"emb.weight": torch.zeros(3), "epoch": 3}, tmp_path / "d.pth")
    with pytest.raises(errors.NotAStateDictError, match="entry 'epoch' is a int"):
        rwkvpy.load(tmp_path / "d.pth")


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('RWKVPY_EVIL_MARKER', '/nonexistent/x')}",))


def test_pth_that_would_run_code_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("RWKVPY_EVIL_MARKER", str(marker))
    torch.save({"emb.weight": torch.zeros(3), "x": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(errors.NotAStateDictError, match="loading it would run code"):
        rwkvpy.load(tmp_path / "evil.pth")
    assert not marker.exists()


def test_pth_truncated(tmp_path):
    src = fixture_path("reference-pth", "v4_c192_l2.pth").read_bytes()
    (tmp_path / "t.pth").write_bytes(src[: len(src) // 2])
    with pytest.raises(errors.TruncatedFileError, match="t.pth: cannot read the PyTorch archive"):
        rwkvpy.load(tmp_path / "t.pth")


def test_pth_not_rwkv(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "n.pth")
    with pytest.raises(
        errors.MissingTensorError, match="'emb.weight' not found: this is not an RWKV"
    ):
        rwkvpy.load(tmp_path / "n.pth")


# -- tokens and states --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return rwkvpy.load(fixture_path("rwkv-cpp-tiny", BIN))


@pytest.mark.parametrize(
    "tokens,needle",
    [
        ([1, 256], "token id 256 at position 1 is out of range: the vocabulary has ids 0..255"),
        ([-1], "token id -1 at position 0 is out of range"),
        ([], "non-empty list of ints"),
        ([1.5], "tokens must be ints"),
    ],
)
def test_bad_tokens(tiny, tokens, needle):
    with pytest.raises(errors.TokenError) as e:
        tiny.forward(tokens)
    assert needle in str(e.value)


def test_state_of_another_model(tiny):
    other = rwkvpy.load(fixture_path("reference-pth", "v7_c192_l2.pth"))
    with pytest.raises(
        errors.StateError, match=r"state \(RWKV v7.*does not fit this model \(RWKV v4"
    ):
        tiny.forward([1], other.new_state())


def test_header_disagrees_with_tensors(bin_copy):
    patch(bin_copy, 16, "<i", 5)  # n_layer
    with pytest.raises(
        errors.TensorShapeError, match="header field n_layer = 5, but the tensors hold 4"
    ):
        rwkvpy.load(bin_copy)
