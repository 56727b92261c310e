"""State files: save/load round trips, mismatch and corruption errors, BlinkDL state tuning."""

import os

import pytest
import torch
from conftest import TINY_V7, fixture_path

import rwkvpy
from rwkvpy import State, errors
from rwkvpy.config import Version


@pytest.fixture(scope="module")
def model():
    return rwkvpy.load(fixture_path(*TINY_V7))


def test_round_trip_gives_identical_continuation(model, tmp_path):
    prompt = list(b"In the beginning")
    _, s = model.forward(prompt, None)
    s.save(tmp_path / "s.state")
    loaded = State.load(tmp_path / "s.state", model)
    assert loaded.n_tokens == len(prompt) and loaded.model_fingerprint == model.fingerprint
    assert torch.equal(loaded.last_logits, s.last_logits)
    a, _ = model.forward(list(b" was"), s, all_logits=True)
    b, _ = model.forward(list(b" was"), loaded, all_logits=True)
    assert torch.equal(a, b)


def test_fingerprint_is_shared_across_formats(model):
    q = rwkvpy.load(fixture_path("rwkv-cpp-tiny", "tiny-rwkv-7v0-834K-Q5_1.bin"))
    assert q.fingerprint == model.fingerprint
    other = rwkvpy.load(fixture_path("rwkv-cpp-tiny", "tiny-rwkv-4v0-660K-FP32.bin"))
    assert other.fingerprint != model.fingerprint


def test_state_of_another_model_is_refused(model, tmp_path):
    other = rwkvpy.load(fixture_path("rwkv-cpp-tiny", "tiny-rwkv-4v0-660K-FP32.bin"))
    _, s = other.forward([1, 2], None)
    s.save(tmp_path / "o.state")
    with pytest.raises(
        errors.StateError, match=r"o.state \(RWKV v4.*does not fit this model \(RWKV v7"
    ):
        State.load(tmp_path / "o.state", model)


def test_same_shape_other_weights_refused(tmp_path):
    from rwkvpy.synth import save_random_model

    a = rwkvpy.load(
        save_random_model(
            tmp_path / "a.pth", version=Version.V6, n_embd=64, n_layer=1, vocab=50, seed=1
        )
    )
    b = rwkvpy.load(
        save_random_model(
            tmp_path / "b.pth", version=Version.V6, n_embd=64, n_layer=1, vocab=50, seed=2
        )
    )
    _, s = a.forward([1], None)
    s.save(tmp_path / "a.state")
    with pytest.raises(errors.StateError, match="was made by another model"):
        State.load(tmp_path / "a.state", b)
    with pytest.raises(errors.StateError, match="was made by another model"):
        b.forward([1], s)


@pytest.mark.parametrize(
    "damage,needle",
    [
        (lambda b: b[:-5], "truncated or padded"),
        (lambda b: b[:-100] + bytes([b[-100] ^ 1]) + b[-99:], "checksum mismatch"),
        (lambda b: b"NOTSTATE" + b[8:], "not an rwkvpy state file"),
        (lambda b: b[:12], "truncated state file"),
    ],
)
def test_corrupt_state_files(model, tmp_path, damage, needle):
    _, s = model.forward([1, 2, 3], None)
    s.save(tmp_path / "s.state")
    raw = (tmp_path / "s.state").read_bytes()
    (tmp_path / "bad.state").write_bytes(damage(raw))
    with pytest.raises(errors.StateError, match=needle):
        State.load(tmp_path / "bad.state", model)


def test_save_is_atomic(model, tmp_path, monkeypatch):
    _, s = model.forward([1], None)
    s.save(tmp_path / "keep.state")
    before = (tmp_path / "keep.state").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch.Tensor, "numpy", boom)
    with pytest.raises(RuntimeError):
        s.save(tmp_path / "keep.state")
    assert (tmp_path / "keep.state").read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.state"]


@pytest.mark.parametrize("version", [Version.V5_2, Version.V6])
def test_blinkdl_state_tuning_matches_reference(tmp_path, version, monkeypatch):
    """A .pth carrying blocks.N.att.time_state, run by BlinkDL's package and by rwkvpy."""
    monkeypatch.setenv("RWKV_JIT_ON", "0")
    monkeypatch.setenv("RWKV_CUDA_ON", "0")
    from rwkv.model import RWKV as Reference

    from rwkvpy.synth import random_state_dict

    sd = random_state_dict(version, 128, 2, 300, seed=3, dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    for i in range(2):
        sd[f"blocks.{i}.att.time_state"] = torch.randn(2, 64, 64, generator=g)
    torch.save(sd, tmp_path / "tuned.pth")
    ref = Reference(str(tmp_path / "tuned.pth"), strategy="cpu fp32")
    toks = [5, 17, 250, 3]
    want, _ = ref.forward(toks, None)
    ours = rwkvpy.load(tmp_path / "tuned.pth", mode="reference")
    start = State.from_time_state(tmp_path / "tuned.pth", ours)
    got, _ = ours.forward(toks, start)
    assert (got - want).abs().max() < 1e-4


def test_time_state_missing(model, tmp_path):
    v6 = rwkvpy.load(fixture_path("reference-pth", "v6_c192_l2.pth"))
    with pytest.raises(errors.StateError, match="'blocks.0.att.time_state' not found"):
        State.from_time_state(fixture_path("reference-pth", "v6_c192_l2.pth"), v6)
    with pytest.raises(errors.StateError, match="supported for RWKV v5.2 and v6"):
        State.from_time_state(fixture_path("reference-pth", "v6_c192_l2.pth"), model)


def test_written_files_get_normal_permissions(model, tmp_path):
    _, s = model.forward([1], None)
    s.save(tmp_path / "p.state")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "p.state").stat().st_mode & 0o777 == 0o666 & ~umask
