"""Sequence-mode WKV kernels against the per-token reference recurrences.

Accuracy criterion: max |kernel - reference| / max |reference| <= TOL = 1e-4 for the chunked
forms, SERIAL_TOL = 1e-5 for the CPU's serial forms (the reference's own operations, summed in
another order: ~3e-7 measured), for the outputs and for the final state, with a nonzero starting
state.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rwkvpy.kernels import wkv as W
from rwkvpy.kernels import wkv5_chunked, wkv5_serial, wkv7_chunked, wkv7_serial
from rwkvpy.models.v5 import wkv_heads

pytestmark = pytest.mark.fast  # the fast tier: needs only the package (pyproject's markers)

TOL = 1e-4
SERIAL_TOL = 1e-5
H, N = 4, 64


@pytest.fixture(autouse=True)
def one_thread():
    """Accuracy tests run single-threaded: results are the same, and a shared, loaded CI machine
    slows multi-threaded small ops down badly. The speed test sets its own thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ref_wkv7(r, w, k, v, kk, a, S):
    """The v7 loop of RWKV7.time_mix, one token at a time; S (H, N_v, N_k)."""
    out = torch.empty_like(v)
    for t in range(r.shape[0]):
        removal = (S @ (-kk[t]).unsqueeze(-1)) @ (kk[t] * a[t]).unsqueeze(-2)
        S = S * w[t].unsqueeze(-2) + removal + v[t].unsqueeze(-1) * k[t].unsqueeze(-2)
        out[t] = (S @ r[t].unsqueeze(-1)).squeeze(-1)
    return out, S


def rel_err(x, ref):
    assert torch.isfinite(x).all()
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def v5_inputs(T, seed, h=H, n=N):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(T, h, n, generator=g) for _ in range(3))
    w = torch.exp(-torch.exp(torch.randn(T, h, n, generator=g) - 1))  # v5/v6: exp(-exp(N(-1, 1)))
    u = 0.5 * torch.randn(h, n, generator=g)
    S = torch.randn(h, n, n, generator=g)
    return r, k, v, w, u, S


def v7_inputs(T, seed, h=H, n=N):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(T, h, n, generator=g) for _ in range(3))
    kk = F.normalize(torch.randn(T, h, n, generator=g), dim=-1)  # unit norm per head
    a = torch.rand(T, h, n, generator=g)  # in (0, 1)
    w = torch.exp(-math.exp(-0.5) * torch.rand(T, h, n, generator=g))  # (exp(-e^-0.5), 1)
    S = torch.randn(h, n, n, generator=g)
    return r, w, k, v, kk, a, S


def extreme_decays(kind, T, seed):
    g = torch.Generator().manual_seed(seed)
    tiny = torch.exp(-torch.exp(torch.tensor(5.0)))  # rounds to 0 in float32
    near1 = torch.tensor(1 - 1e-7)
    shape = (T, H, N)
    if kind == "tiny":
        return tiny.expand(shape)
    if kind == "e^-e^4":  # 1.8e-24: not 0 in float32, but 1 / g overflows
        return torch.full(shape, math.exp(-math.exp(4)))
    if kind == "near1":
        return near1.expand(shape)
    if kind == "mixed":  # tiny / near 1 / ordinary, per element
        pick = torch.randint(0, 3, shape, generator=g)
        ordinary = torch.exp(-torch.exp(torch.randn(shape, generator=g) - 1))
        return torch.where(pick == 0, tiny, torch.where(pick == 1, near1, ordinary))
    if kind == "rare-tiny":  # a few tiny decays among v7-range ones
        ordinary = torch.exp(-math.exp(-0.5) * torch.rand(shape, generator=g))
        return torch.where(torch.rand(shape, generator=g) < 0.03, tiny, ordinary)
    raise ValueError(kind)


@pytest.mark.parametrize("T", [1, 2, 7, 64, 300])
@pytest.mark.parametrize("chunk", [None, 8])
def test_wkv5_matches_reference(T, chunk):
    r, k, v, w, u, S = v5_inputs(T, seed=T)
    ref_out, ref_S = wkv_heads(r, k, v, w, u, S)
    out, S1 = wkv5_chunked(r, k, v, w, u, S, chunk=chunk)
    assert out.shape == ref_out.shape and S1.shape == ref_S.shape
    assert rel_err(out, ref_out) <= TOL
    assert rel_err(S1, ref_S) <= TOL

    w0 = w[0]  # v5: one decay per channel
    ref_out, ref_S = wkv_heads(r, k, v, w0, u, S)
    out, S1 = wkv5_chunked(r, k, v, w0, u, S, chunk=chunk)
    assert rel_err(out, ref_out) <= TOL
    assert rel_err(S1, ref_S) <= TOL


@pytest.mark.parametrize("T", [1, 2, 7, 64, 300])
@pytest.mark.parametrize("chunk", [None, 8])
def test_wkv7_matches_reference(T, chunk):
    r, w, k, v, kk, a, S = v7_inputs(T, seed=100 + T)
    ref_out, ref_S = ref_wkv7(r, w, k, v, kk, a, S)
    out, S1 = wkv7_chunked(r, w, k, v, kk, a, S, chunk=chunk)
    assert out.shape == ref_out.shape and S1.shape == ref_S.shape
    assert rel_err(out, ref_out) <= TOL
    assert rel_err(S1, ref_S) <= TOL


@pytest.mark.parametrize("chunk", [1, 2, 4, 128])
def test_other_chunk_lengths(chunk):
    T = 37
    r, k, v, w, u, S = v5_inputs(T, seed=5)
    ref_out, ref_S = wkv_heads(r, k, v, w, u, S)
    out, S1 = wkv5_chunked(r, k, v, w, u, S, chunk=chunk)
    assert rel_err(out, ref_out) <= TOL and rel_err(S1, ref_S) <= TOL
    r, w, k, v, kk, a, S = v7_inputs(T, seed=6)
    ref_out, ref_S = ref_wkv7(r, w, k, v, kk, a, S)
    out, S1 = wkv7_chunked(r, w, k, v, kk, a, S, chunk=chunk)
    assert rel_err(out, ref_out) <= TOL and rel_err(S1, ref_S) <= TOL


@pytest.mark.parametrize("kind", ["tiny", "e^-e^4", "near1", "mixed", "rare-tiny"])
@pytest.mark.parametrize("chunk", [None, 64])
def test_extreme_decays(kind, chunk):
    T = 300
    w = extreme_decays(kind, T, seed=7)
    r, k, v, _, u, S = v5_inputs(T, seed=8)
    ref_out, ref_S = wkv_heads(r, k, v, w, u, S)
    out, S1 = wkv5_chunked(r, k, v, w, u, S, chunk=chunk)
    assert rel_err(out, ref_out) <= TOL
    assert rel_err(S1, ref_S) <= TOL
    if kind in ("tiny", "near1"):  # constant-decay form too
        ref_out, ref_S = wkv_heads(r, k, v, w[0], u, S)
        out, S1 = wkv5_chunked(r, k, v, w[0], u, S, chunk=chunk)
        assert rel_err(out, ref_out) <= TOL
        assert rel_err(S1, ref_S) <= TOL

    r, _, k, v, kk, a, S = v7_inputs(T, seed=9)
    ref_out, ref_S = ref_wkv7(r, w, k, v, kk, a, S)
    out, S1 = wkv7_chunked(r, w, k, v, kk, a, S, chunk=chunk)
    assert rel_err(out, ref_out) <= TOL
    assert rel_err(S1, ref_S) <= TOL


def test_exact_path_on_ordinary_decays(monkeypatch):
    """Force every (chunk, head) through the overflow-proof path and compare."""
    monkeypatch.setattr(W, "SAFE_DECAY", 2.0)
    T = 100
    r, k, v, w, u, S = v5_inputs(T, seed=11)
    ref_out, ref_S = wkv_heads(r, k, v, w, u, S)
    out, S1 = wkv5_chunked(r, k, v, w, u, S)
    assert rel_err(out, ref_out) <= TOL and rel_err(S1, ref_S) <= TOL
    r, w, k, v, kk, a, S = v7_inputs(T, seed=12)
    ref_out, ref_S = ref_wkv7(r, w, k, v, kk, a, S)
    out, S1 = wkv7_chunked(r, w, k, v, kk, a, S)
    assert rel_err(out, ref_out) <= TOL and rel_err(S1, ref_S) <= TOL


def test_groups_and_scratch(monkeypatch):
    """A small scratch budget splits the sequence into groups of chunks; results are unchanged."""
    T = 200
    r5 = v5_inputs(T, seed=13)
    r7 = v7_inputs(T, seed=14)
    full5, full7 = wkv5_chunked(*r5, chunk=16), wkv7_chunked(*r7, chunk=16)
    monkeypatch.setattr(W, "SCRATCH_BYTES", 256 << 10)
    W.release_scratch()
    for a, b in zip(wkv5_chunked(*r5, chunk=16), full5):
        assert rel_err(a, b) <= 1e-6
    for a, b in zip(wkv7_chunked(*r7, chunk=16), full7):
        assert rel_err(a, b) <= 1e-6
    W.release_scratch()


def test_inputs_untouched_and_edge_cases():
    r, k, v, w, u, S = v5_inputs(20, seed=15)
    before = [x.clone() for x in (r, k, v, w, u, S)]
    out, S1 = wkv5_chunked(r, k, v, w, u, S)
    assert all(torch.equal(x, y) for x, y in zip((r, k, v, w, u, S), before))
    assert S1.data_ptr() != S.data_ptr()
    out, S1 = wkv5_chunked(r[:0], k[:0], v[:0], w[:0], u, S)
    assert out.shape == (0, H, N) and torch.equal(S1, S)
    with pytest.raises(ValueError):
        wkv5_chunked(r, k, v, w, u, S, chunk=12)

    r, w, k, v, kk, a, S = v7_inputs(20, seed=16)
    before = [x.clone() for x in (r, w, k, v, kk, a, S)]
    wkv7_chunked(r, w, k, v, kk, a, S)
    assert all(torch.equal(x, y) for x, y in zip((r, w, k, v, kk, a, S), before))
    out, S1 = wkv7_chunked(r[:0], w[:0], k[:0], v[:0], kk[:0], a[:0], S)
    assert out.shape == (0, H, N) and torch.equal(S1, S)


@pytest.mark.parametrize("T", [2, 9, 64, 300])
@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_scan_of_chunk_starts_matches_reference(T, chunk):
    """The GPU's parallel scan over chunk boundaries (forced here on the CPU): nc = 1 .. 300
    chunks, a power of two or not."""
    r, k, v, w, u, S = v5_inputs(T, seed=20 + T)
    ref_out, ref_S = wkv_heads(r, k, v, w, u, S)
    out, S1 = wkv5_chunked(r, k, v, w, u, S, chunk=chunk, scan=True)
    assert rel_err(out, ref_out) <= TOL and rel_err(S1, ref_S) <= TOL
    ref_out, ref_S = wkv_heads(r, k, v, w[0], u, S)
    out, S1 = wkv5_chunked(r, k, v, w[0], u, S, chunk=chunk, scan=True)
    assert rel_err(out, ref_out) <= TOL and rel_err(S1, ref_S) <= TOL
    r, w, k, v, kk, a, S = v7_inputs(T, seed=40 + T)
    ref_out, ref_S = ref_wkv7(r, w, k, v, kk, a, S)
    out, S1 = wkv7_chunked(r, w, k, v, kk, a, S, chunk=chunk, scan=True)
    assert rel_err(out, ref_out) <= TOL and rel_err(S1, ref_S) <= TOL


@pytest.mark.parametrize("kind", ["tiny", "mixed", "rare-tiny"])
def test_scan_with_extreme_decays(kind):
    T = 300
    w = extreme_decays(kind, T, seed=17)
    r, k, v, _, u, S = v5_inputs(T, seed=18)
    ref_out, ref_S = wkv_heads(r, k, v, w, u, S)
    out, S1 = wkv5_chunked(r, k, v, w, u, S, chunk=32, scan=True)
    assert rel_err(out, ref_out) <= TOL and rel_err(S1, ref_S) <= TOL
    r, _, k, v, kk, a, S = v7_inputs(T, seed=19)
    ref_out, ref_S = ref_wkv7(r, w, k, v, kk, a, S)
    out, S1 = wkv7_chunked(r, w, k, v, kk, a, S, chunk=32, scan=True)
    assert rel_err(out, ref_out) <= TOL and rel_err(S1, ref_S) <= TOL


def test_affine_scan_composes_maps():
    g = torch.Generator().manual_seed(21)
    for n in (1, 2, 5, 8, 13):
        A, B = torch.randn(n, 3, 4, 4, generator=g) * 0.5, torch.randn(n, 3, 4, 2, generator=g)
        S0 = torch.randn(3, 4, 2, generator=g)
        PA, PB = W.chunked._affine_scan(A, B, torch.matmul)
        S = S0
        for c in range(n):
            S = A[c] @ S + B[c]
            assert rel_err(PA[c] @ S0 + PB[c], S) <= 1e-5


@pytest.mark.parametrize("T", [1, 7, 300])
def test_wkv4_serial_matches_reference(T):
    """v4: the numba loop against models.v4.wkv4, keys large enough that exp() overflows
    without the running exponent, and a nonzero starting state."""
    from rwkvpy.models.v4 import wkv4

    g = torch.Generator().manual_seed(T)
    A = 96
    k = torch.randn(T, A, generator=g) * 30
    v = torch.randn(T, A, generator=g)
    decay = -torch.exp(torch.randn(A, generator=g))
    u = torch.randn(A, generator=g)
    S = torch.stack(
        [
            torch.randn(A, generator=g),
            torch.rand(A, generator=g) + 0.5,
            torch.randn(A, generator=g) * 10,
        ]
    )
    out, S1 = W.wkv4_serial(k, v, decay, u, S)
    ref, S_ref = wkv4(k, v, decay, u, S)
    assert torch.isfinite(out).all() and torch.isfinite(S1).all()
    assert (out - ref).abs().max() <= TOL * ref.abs().max()
    assert (S1 - S_ref).abs().max() <= TOL * S_ref.abs().max()


# -- the CPU's serial forms ---------------------------------------------------------------------


def _both_serial(T, h, n, seed, w5=None, w7=None):
    """(kernel, reference) pairs of (out, S) for v5 per-token decays, v5 per-channel decays, v7."""
    r, k, v, w, u, S = v5_inputs(T, seed, h, n)
    w = w if w5 is None else w5
    pairs = [
        (wkv5_serial(r, k, v, w, u, S), wkv_heads(r, k, v, w, u, S)),
        (wkv5_serial(r, k, v, w[0], u, S), wkv_heads(r, k, v, w[0], u, S)),
    ]
    r, w, k, v, kk, a, S = v7_inputs(T, seed + 1, h, n)
    w = w if w7 is None else w7
    pairs.append((wkv7_serial(r, w, k, v, kk, a, S), ref_wkv7(r, w, k, v, kk, a, S)))
    return pairs


@pytest.mark.parametrize("T", [1, 2, 7, 300])
@pytest.mark.parametrize("h,n", [(4, 64), (3, 24), (2, 70), (2, 8)])
def test_serial_forms_match_reference(T, h, n):
    """Head sizes: whole blocks of 16 value channels (64), blocks plus a scalar tail (24, 70),
    the scalar code alone (8)."""
    for (out, S1), (ref_out, ref_S) in _both_serial(T, h, n, seed=200 + T):
        assert out.shape == ref_out.shape and S1.shape == ref_S.shape
        assert rel_err(out, ref_out) <= SERIAL_TOL
        assert rel_err(S1, ref_S) <= SERIAL_TOL


@pytest.mark.parametrize("kind", ["tiny", "e^-e^4", "near1", "mixed"])
def test_serial_forms_with_extreme_decays(kind):
    w = extreme_decays(kind, 300, seed=30)
    for (out, S1), (ref_out, ref_S) in _both_serial(300, H, N, seed=31, w5=w, w7=w):
        assert rel_err(out, ref_out) <= SERIAL_TOL and rel_err(S1, ref_S) <= SERIAL_TOL


def _spy(monkeypatch, name, calls=None):
    """Record the thread count of each call of wkv's parallel kernel ``name`` in ``calls``."""
    calls = [] if calls is None else calls
    kernel = getattr(W.serial, name)
    monkeypatch.setattr(W.serial, name, lambda *a: calls.append(a[-1]) or kernel(*a))
    return calls


def test_serial_forms_threads_identical(monkeypatch):
    """Heads split across two threads give the same bits as one thread; inputs untouched."""
    calls = _spy(monkeypatch, "_wkv7_par", _spy(monkeypatch, "_wkv5_par"))
    r5 = v5_inputs(300, seed=32, h=5)
    r7 = v7_inputs(300, seed=33, h=5)
    before = [x.clone() for x in r5 + r7]
    one = wkv5_serial(*r5), wkv7_serial(*r7)
    torch.set_num_threads(2)
    two = wkv5_serial(*r5), wkv7_serial(*r7)
    assert all(torch.equal(a, b) for x, y in zip(one, two) for a, b in zip(x, y))
    assert calls == [2, 2]  # both ran on two threads
    assert all(torch.equal(x, y) for x, y in zip(r5 + r7, before))


def test_wkv4_serial_threads_identical(monkeypatch):
    """v4's channels split across two threads (T * channels above the serial limit)."""
    calls = _spy(monkeypatch, "_wkv4_par")
    g = torch.Generator().manual_seed(36)
    T, A = 300, 1024
    k, v = torch.randn(T, A, generator=g) * 30, torch.randn(T, A, generator=g)
    decay, u = -torch.exp(torch.randn(A, generator=g)), torch.randn(A, generator=g)
    S = torch.stack(
        [
            torch.randn(A, generator=g),
            torch.rand(A, generator=g) + 0.5,
            torch.randn(A, generator=g) * 10,
        ]
    )
    one = W.wkv4_serial(k, v, decay, u, S)
    torch.set_num_threads(2)
    two = W.wkv4_serial(k, v, decay, u, S)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    assert calls == [2]


def test_serial_forms_edge_cases():
    r, k, v, w, u, S = v5_inputs(20, seed=34)
    out, S1 = wkv5_serial(r[:0], k[:0], v[:0], w[:0], u, S)
    assert out.shape == (0, H, N) and torch.equal(S1, S) and S1.data_ptr() != S.data_ptr()
    # strided views (a transposed tensor's slices) and float64 inputs are read as float32
    ref = wkv_heads(r, k, v, w, u, S)
    rt = r.transpose(0, 1).contiguous().transpose(0, 1)
    for got, want in zip(wkv5_serial(rt, k.double(), v, w, u, S), ref):
        assert rel_err(got, want) <= SERIAL_TOL
    r, w, k, v, kk, a, S = v7_inputs(20, seed=35)
    out, S1 = wkv7_serial(r[:0], w[:0], k[:0], v[:0], kk[:0], a[:0], S)
    assert out.shape == (0, H, N) and torch.equal(S1, S)
