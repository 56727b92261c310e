"""The K-quants (Q2_K .. Q6_K): formats against ggml, kernels against the formats, models.

* dequantization bit for bit against gguf-py's numpy port (gguf.quants.dequantize) on random
  bytes and on edge cases (zero scales, largest codes and scales, NaN/inf/subnormal float16
  factors);
* quantization byte for byte against ggml's own quantizer: tests/fixtures/kquants (made by
  tools/make_kquant_fixtures.py with ggml_quantize_chunk: bytes of a few rows, digests of
  8192 super-blocks the tool's wide_rows regenerates);
* the exact kernels (kernels/ir/kquants.py) bit for bit / within float32 summation of the
  dequantized weights; the integer kernels as close to float32 as llama.cpp's Q8_K method;
  the 8-row interleaved kernels (Q4_K, Q5_K, Q6_K) equal to the row kernels within float32
  summation, bit-identical across their own variants (streams, 4-vector passes, threads);
* llama-quantize's choice of types (formats/kquant_mix.py), and K-quant GGUFs loaded in both
  modes.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import quants as gq  # noqa: E402

from rwkvpy.formats import kquant_mix  # noqa: E402
from rwkvpy.formats.base import QTensor  # noqa: E402
from rwkvpy.quant import FORMATS_BY_GGML_TYPE, get_format  # noqa: E402
from rwkvpy.quant.q_k import nearest_int  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("error::RuntimeWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning:gguf"),
]

KQ = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
SIZES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
#: byte offsets of each format's float16 factors in a block
HALVES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "kquants", "kquants.npz")
WIDE = os.path.join(os.path.dirname(FIXTURE), "kquants_wide.json")
TOOL = os.path.join(os.path.dirname(__file__), "..", "tools", "make_kquant_fixtures.py")


def bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def edge_blocks(name: str, rng) -> np.ndarray:
    """Random blocks, then blocks with special float16 factors, all-zero and all-ones bytes."""
    size = SIZES[name]
    raw = rng.integers(0, 256, (72, size), dtype=np.uint8)
    specials = np.array(
        [0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00, 0x7E00, 0x3C00],
        np.uint16,
    )
    for k, h in enumerate(specials):
        for off in HALVES[name]:
            raw[k, off : off + 2] = np.frombuffer(h.tobytes(), np.uint8)
            raw[k + 16, off : off + 2] = np.frombuffer(h.tobytes(), np.uint8)
    raw[40] = 0
    raw[41] = 255  # largest codes, scales and mins (float16 factors NaN)
    raw[42] = 255
    for off in HALVES[name]:
        raw[42, off : off + 2] = (0x00, 0x3C)  # 1.0: largest codes and scales, finite
    return raw


@pytest.mark.parametrize("name", KQ)
def test_format_registered(name):
    fmt = get_format(name)
    assert fmt.block_size == 256 and fmt.type_size == SIZES[name] == fmt.block_dtype.itemsize
    assert FORMATS_BY_GGML_TYPE[int(gguf.GGMLQuantizationType[name])] is fmt
    assert get_format(name.lower().replace("_", "-")) is fmt


@pytest.mark.parametrize("name", KQ)
def test_dequantize_bit_exact_vs_gguf(name):
    raw = edge_blocks(name, np.random.default_rng(7))
    ours = get_format(name).dequantize(raw.reshape(-1), (raw.shape[0], 256))
    ref = np.asarray(gq.dequantize(raw, gguf.GGMLQuantizationType[name]), np.float32)
    assert np.array_equal(bits(ours), bits(ref.reshape(ours.shape)))


@pytest.mark.parametrize("name", KQ)
def test_quantize_matches_ggml(name):
    """Bytes of ggml_quantize_chunk (tools/make_kquant_fixtures.py), NaN/inf rows included."""
    data = np.load(FIXTURE)
    assert np.array_equal(get_format(name).quantize(data["x"]), data[name])


@functools.cache
def _wide():
    """tools/make_kquant_fixtures.py's wide rows and the sha256 of ggml's bytes for them."""
    spec = importlib.util.spec_from_file_location("make_kquant_fixtures", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with open(WIDE) as f:
        ref = json.load(f)
    with np.errstate(all="ignore"):
        return tool.wide_rows(ref["rows"]), ref


@pytest.mark.parametrize("name", KQ)
def test_quantize_matches_ggml_wide(name):
    """8192 super-blocks of 13 kinds (extreme scales, NaN/inf/huge/subnormal elements, zero
    and constant sub-blocks, ties), against the sha256 of ggml_quantize_chunk's bytes."""
    x, ref = _wide()
    c = ref["chunk"]
    raw = get_format(name).quantize(x).reshape(x.shape[0], SIZES[name])
    got = [hashlib.sha256(raw[a : a + c].tobytes()).hexdigest() for a in range(0, len(x), c)]
    bad = [a * c for a, (g, r) in enumerate(zip(got, ref["sha256"][name])) if g != r]
    assert not bad, f"rows from {bad} (chunks of {c}) differ from ggml's"


@pytest.mark.parametrize("name", KQ)
def test_quantize_any_rows_and_threads(name):
    """The same bytes for any row count (groups of super-blocks cut anywhere), any input layout
    and one thread or several."""
    import numba

    x = _wide()[0][:45]
    fmt = get_format(name)
    full = fmt.quantize(x).reshape(45, -1)
    for k in (1, 7, 17, 33):
        assert np.array_equal(fmt.quantize(x[:k]), full[:k].reshape(-1))
    assert np.array_equal(
        fmt.quantize(np.asfortranarray(x[:40].reshape(20, 512))), full[:40].reshape(-1)
    )
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        assert np.array_equal(fmt.quantize(x), full.reshape(-1))
    finally:
        numba.set_num_threads(threads)


def test_float16_rounding():
    """The quantizers' float32 -> float16 (ggml's GGML_FP32_TO_FP16: nearest even) and back,
    against numpy's, on every float32 whose low 12 bits are one of a few patterns and on the
    rounding boundaries."""
    from rwkvpy.quant.q_k import float16_bits

    hi = np.arange(1 << 20, dtype=np.uint32) << 12
    b = (hi[:, None] | np.array([0, 1, 0x7FF, 0x800, 0x801, 0xFFF], np.uint32)).reshape(-1)
    f = b.view(np.float32)
    h, back = float16_bits(f)
    ok = ~np.isnan(f)
    with np.errstate(over="ignore"):
        ref = f.astype(np.float16)
    assert np.array_equal(h[ok], ref.view(np.uint16)[ok])
    assert np.array_equal(bits(back[ok]), bits(ref[ok].astype(np.float32)))
    assert np.isnan(h[~ok].view(np.float16)).all() and np.isnan(back[~ok]).all()


@pytest.mark.parametrize("name", KQ)
def test_quantize_round_trip(name):
    """Quantize, dequantize, quantize again: the same bytes; the error is the format's."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 512)).astype(np.float32)
    fmt = get_format(name)
    raw = fmt.quantize(x)
    y = fmt.dequantize(raw, x.shape)
    bits_per_weight = 8 * SIZES[name] / 256
    rel = np.sqrt(np.mean((y - x) ** 2) / np.mean(x**2))
    assert rel < 2.0 ** (1.5 - bits_per_weight) * 1.5
    assert np.array_equal(fmt.quantize(y), fmt.quantize(fmt.dequantize(fmt.quantize(y), x.shape)))


def test_nearest_int_is_ggml():
    v = np.array(
        [0.5, 1.5, 2.5, -0.5, -1.5, 2.4999998, 4194303.0, -4194303.0, np.nan, np.inf], np.float32
    )
    assert nearest_int(v)[:8].tolist() == [0, 2, 2, 0, -2, 2, 4194303, -4194303]


# ------------------------------------------------------------------------------ kernels

kir = pytest.importorskip("rwkvpy.kernels.linear.kquant_drivers")


def _q8k_ggml(x):
    """ggml's quantize_row_q8_K_ref then dequantized (float64): llama.cpp's activations."""
    xb = x.reshape(-1, 256)
    mx = xb[np.arange(len(xb)), np.abs(xb).argmax(1)]
    iscale = np.float32(-127) / mx
    q = np.minimum(127, nearest_int(iscale[:, None] * xb))
    return (q * (np.float32(1) / iscale).astype(np.float64)[:, None]).reshape(x.shape)


def test_quantize_q8k():
    """The activations' rounding (vector code) against its float32 operations in numpy: blocks
    of zeros, of subnormals, of values so small that 127 / amax overflows, with NaN or inf,
    with ties, and ordinary ones."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(256 * 12) * np.exp(3 * rng.standard_normal(256 * 12))
    x = x.astype(np.float32)
    x[:256] = 0
    x[256:512] = rng.standard_normal(256) * np.float32(1e-39)
    x[512:768] = rng.standard_normal(256) * np.float32(1e-37)
    x[800], x[1100] = np.nan, -np.inf
    x[1280:1536] = np.round(rng.standard_normal(256) * 4) / 2
    xq, dx, bs = np.empty(x.size, np.int8), np.empty(12, np.float32), np.empty(192, np.int16)
    kir.quantize_q8k(x, xq, dx, bs)
    xb = x.reshape(-1, 256)
    finite = np.isfinite(xb).all(1)
    amax = np.where(finite, np.abs(np.where(np.isfinite(xb), xb, 0)).max(1), 0)
    with np.errstate(all="ignore"):
        inv = np.float32(127) / amax
        q = np.rint(xb * inv[:, None])
    q = np.where((finite & (inv < np.inf))[:, None], q, 0).astype(np.int8)
    assert np.array_equal(xq, q.reshape(-1))
    assert np.array_equal(bits(dx), bits(np.where(finite, amax / np.float32(127), np.nan)))
    assert np.array_equal(bs, q.reshape(-1, 16).astype(np.int32).sum(1).astype(np.int16))


@pytest.mark.parametrize("name", KQ)
def test_kernels(name):
    rng = np.random.default_rng(11)
    O, K = 24, 768
    w = rng.standard_normal((O, K)).astype(np.float32)
    x = (rng.standard_normal((3, K)) * np.exp(rng.standard_normal(K))).astype(np.float32)
    fmt, kind = get_format(name), kir.KIND[name]
    raw = fmt.quantize(w).reshape(O, -1)
    wd = fmt.dequantize(raw.reshape(-1), (O, K))
    edge = edge_blocks(name, rng)[: 3 * O].reshape(O, -1)  # special factors, NaN included
    for r2, deq in ((raw, wd), (edge, fmt.dequantize(edge.reshape(-1), (O, K)))):
        out = np.empty((O, K), np.float32)
        kir.dec_rows(kind, r2, out, 0, 0, O)
        assert np.array_equal(bits(out), bits(deq))
    ref = x.astype(np.float64) @ wd.T.astype(np.float64)
    scale = np.abs(ref).max()
    y = np.empty((3, O), np.float32)
    kir.mv_rows(kind, raw, x, y, 0, O)
    assert np.abs(y - ref).max() < 1e-5 * scale
    yq = np.empty((3, O), np.float32)
    kir.mvq(kind, raw, x, yq)
    llama = _q8k_ggml(x) @ wd.T.astype(np.float64)
    assert np.abs(yq - llama).max() < 1e-4 * scale  # the same method: float rounding apart
    err, err_llama = np.abs(yq - ref).mean(), np.abs(llama - ref).mean()
    assert 0 < err < 1.1 * err_llama
    xn = x.copy()
    xn[1, 300] = np.nan
    kir.mvq(kind, raw, xn, yq)
    assert np.isnan(yq[1]).all() and np.isfinite(yq[[0, 2]]).all()


X8 = ["Q4_K", "Q5_K", "Q6_K"]


def _x8(kind, raw):
    """raw (O, row bytes) as KQuantX8Linear holds it: the whole groups of 8 rows repacked, and
    the rows after them as they are."""
    G = raw.shape[0] // 8
    pk = np.empty((G, 8 * raw.shape[1]), np.uint8)
    table = kir.x8_table(kind)
    kir.repack_groups(table, raw, pk, 0, G)
    back = np.empty((8 * G, raw.shape[1]), np.uint8)
    kir.unpack_groups(table, pk, back, 0, G)
    assert np.array_equal(back, raw[: 8 * G])
    return pk, np.ascontiguousarray(raw[8 * G :])


@pytest.mark.parametrize("name", X8)
def test_x8_repack_keeps_every_bit(name):
    """Any bytes, not only a quantizer's, come back from the groups as they went in: the moves
    and Q5_K's and Q6_K's recoded codes keep every bit of ggml's super-blocks."""
    rng = np.random.default_rng(14)
    kind = kir.KIND[name]
    raw = rng.integers(0, 256, (16, 3 * kir.KINDS[kind][1]), dtype=np.uint8)
    pk, _ = _x8(kind, raw)
    assert not np.array_equal(pk[0, : raw.shape[1]], raw[0])


@pytest.mark.parametrize("name", X8)
def test_x8_kernels(name):
    """The interleaved kernels against the row kernels (kir.mvq): the same integers, so equal
    within float32 summation; each row and vector computed alike whichever variant runs it (4
    streams, one group, 4-vector passes; serial or parallel): bit-identical across T; the rows
    past the last group are the row kernel's."""
    rng = np.random.default_rng(12)
    kind = kir.KIND[name]
    O, K = 45, 768  # 5 groups (one by one: streams need more), 5 rows after them
    w = rng.standard_normal((O, K)).astype(np.float32)
    raw = get_format(name).quantize(w).reshape(O, -1)
    # largest codes and scales with factors 1.0 (edge_blocks' row 42), against activations of
    # one sign: the int16 partial sums at their largest
    big = np.tile(edge_blocks(name, rng)[42], (8, 3))
    for r2 in (raw, np.concatenate([raw[:8], big, raw[8:]])):
        O = r2.shape[0]
        pk, tail = _x8(kind, r2)
        xs = (rng.standard_normal((9, K)) * np.exp(rng.standard_normal(K))).astype(np.float32)
        xs[8] = np.abs(xs[8])
        outs = {}
        for T in (1, 2, 5, 9):
            x = xs[:T] if T < 9 else xs
            yq = np.empty((T, O), np.float32)
            kir.mvq(kind, r2, x, yq)
            y = np.empty((T, O), np.float32)
            kir.mvx8(kind, pk, tail, x, y)
            yp = np.empty((T, O), np.float32)
            kir.mvx8_par(kind, pk, tail, x, yp, 1)
            assert np.array_equal(bits(y), bits(yp))
            assert np.abs(y - yq).max() <= 1e-5 * np.abs(yq).max()
            assert np.array_equal(bits(y[:, 8 * pk.shape[0] :]), bits(yq[:, 8 * pk.shape[0] :]))
            outs[T] = y
        for T in (1, 2, 5):
            assert np.array_equal(bits(outs[T]), bits(outs[9][:T]))


@pytest.mark.parametrize("name", X8)
def test_x8_streams_off_the_page(name):
    """One vector over groups whose stream stride is a whole number of 4 KiB pages: the streams
    start fewer groups apart (stream_groups) and the groups after them run one by one; every
    row still bit-identical to the 4-vector passes' (and the parallel driver's)."""
    from rwkvpy.kernels.linear.streams import stream_groups

    rng = np.random.default_rng(14)
    kind = kir.KIND[name]
    G = 52 if name == "Q6_K" else 64  # the smallest counts of 768-column groups that shift
    O, K = 8 * G + 3, 768
    raw = get_format(name).quantize(rng.standard_normal((O, K)).astype(np.float32))
    raw = raw.reshape(O, -1)
    pk, tail = _x8(kind, raw)
    assert 0 < stream_groups(G, pk.shape[1], 4) < G // 4
    x = rng.standard_normal((5, K)).astype(np.float32)
    y1, y5, yp = (np.empty((t, O), np.float32) for t in (1, 5, 1))
    kir.mvx8(kind, pk, tail, x[:1], y1)
    kir.mvx8(kind, pk, tail, x, y5)
    kir.mvx8_par(kind, pk, tail, x[:1], yp, 16)
    assert np.array_equal(bits(y1), bits(y5[:1])) and np.array_equal(bits(y1), bits(yp))


@pytest.mark.parametrize("name", X8)
def test_x8_special_factors(name):
    """NaN/inf/subnormal float16 factors and NaN activations: a product is finite exactly when
    the row kernel's is (the sums run in another order, so a non-finite one may be inf in one and
    NaN in the other)."""
    rng = np.random.default_rng(13)
    kind = kir.KIND[name]
    raw = edge_blocks(name, rng)[:48].reshape(16, -1)  # 16 rows of 3 super-blocks
    pk, tail = _x8(kind, raw)
    x = rng.standard_normal((3, 768)).astype(np.float32)
    x[1, 300] = np.nan
    yq, y = np.empty((3, 16), np.float32), np.empty((3, 16), np.float32)
    kir.mvq(kind, raw, x, yq)
    kir.mvx8(kind, pk, tail, x, y)
    fin = np.isfinite(yq)
    assert np.array_equal(np.isfinite(y), fin) and np.isnan(y[1]).all()
    assert np.abs(y - yq)[fin].max() <= 1e-5 * np.abs(yq[fin]).max()


@pytest.mark.parametrize("name", KQ)
@pytest.mark.parametrize("policy", ["exact", "fast"])
def test_make_linear(name, policy):
    from rwkvpy.kernels.linear import make_linear

    rng = np.random.default_rng(5)
    O, K = 40, 512
    w = rng.standard_normal((O, K)).astype(np.float32)
    fmt = get_format(name)
    q = QTensor(name, (O, K), fmt.quantize(w))
    lin = make_linear(q, policy)
    wd = torch.from_numpy(fmt.dequantize(q.data, (O, K)))
    for T in (1, 3, 9):  # one vector, the row kernels' prompts, exact tiles + GEMM (or not)
        x = torch.randn(T, K)
        ref = x.double() @ wd.double().T
        tol = (1e-5 if lin.exact or T > lin.rows_max_t else 2e-2) * ref.abs().max()
        assert (lin(x).double() - ref).abs().max() < tol
    assert lin.exact == (policy == "exact" or not lin.strategy.startswith("int8"))
    want = "int8-dot-kx8" if name in X8 else "int8-dot-k"
    assert lin.strategy == ("numba-kblocks" if policy == "exact" else want)
    spec = lin.numba_spec()
    assert spec is not None and spec[1] == kir.KIND[name]


@pytest.mark.parametrize("name", X8)
def test_x8_linear_repacked(name):
    """KQuantX8Linear: the same products as the row kernels' linear; its repacked tensors
    (the repack cache's) are taken as they are by a second linear, which gives the same
    numbers; ggml's rows come back from the groups; exact tiles from them."""
    from rwkvpy.kernels.kquants import KQuantDotLinear, KQuantX8Linear
    from rwkvpy.kernels.linear import make_linear

    rng = np.random.default_rng(6)
    O, K = 44, 512
    fmt = get_format(name)
    q = QTensor(name, (O, K), fmt.quantize(rng.standard_normal((O, K)).astype(np.float32)))
    lin = make_linear(q, "fast")
    assert isinstance(lin, KQuantX8Linear) and lin.nbytes == np.asarray(q.data).nbytes
    rows = KQuantDotLinear(q)
    again = make_linear(q, "fast", repacked=lin.repacked())
    assert np.shares_memory(again._pk, lin._pk)
    raw = np.asarray(q.data).reshape(O, -1)
    assert np.array_equal(lin.ggml_rows(0, O), raw) and np.array_equal(
        lin.ggml_rows(8, 43), raw[8:43]
    )
    for T in (1, 4, 70):
        x = torch.randn(T, K)
        y = lin(x)
        assert torch.equal(again(x), y)
        want = rows(x) if T <= rows.rows_max_t else None
        if want is not None:
            assert (y - want).abs().max() <= 1e-5 * want.abs().max()
    x = torch.randn(9, K)
    ref = x.double() @ torch.from_numpy(fmt.dequantize(q.data, (O, K))).double().T
    assert (lin._gemm(x).double() - ref).abs().max() < 1e-5 * ref.abs().max()


# ------------------------------------------------------------------------- types, models


def test_mix_types():
    t = kquant_mix.tensor_type
    assert t("q4_k_m", "output.weight", (65536, 2048)) == "Q6_K"
    assert t("q4_k_m", "output.weight", (65536, 768)) == "Q6_K"
    assert t("q4_k_m", "output.weight", (512, 192)) == "Q8_0"  # rows not of 256
    assert t("q4_k", "output.weight", (65536, 2048)) == "Q4_K"
    assert t("q5_k_m", "blk.0.time_mix_key.weight", (2048, 2048)) == "Q5_K"
    assert t("q4_k_m", "token_embd.weight", (65536, 2048)) == "Q4_K"
    assert t("q4_k_m", "blk.0.channel_mix_value.weight", (2048, 7168)) == "Q4_K"
    assert t("q4_k_m", "blk.0.channel_mix_value.weight", (256, 896)) == "Q5_0"
    assert t("q5_k", "blk.0.channel_mix_value.weight", (256, 896)) == "Q5_1"
    assert t("q6_k", "blk.0.channel_mix_value.weight", (256, 896)) == "Q8_0"
    assert t("q6_k", "blk.0.channel_mix_value.weight", (256, 200)) == "F16"
    for keep in (
        "blk.0.time_mix_w1.weight",
        "blk.0.time_mix_lerp_fused.weight",
        "blk.0.attn_norm.weight",
        "blk.0.time_mix_first.weight",
    ):
        assert t("q4_k_m", keep, (64, 2048)) is None
    assert t("q4_k_m", "blk.0.time_mix_k_k.weight", (1, 1, 2048)) is None  # 1-D for ggml


@pytest.fixture(scope="module")
def kmodels(tmp_path_factory):
    from rwkvpy.config import Version
    from rwkvpy.convert import convert
    from rwkvpy.synth import save_random_model

    d = tmp_path_factory.mktemp("kq")
    src = save_random_model(
        d / "v7.pth", version=Version.V7, n_embd=256, n_layer=2, vocab=256, dtype=torch.float32
    )
    out = {}
    for typ in ("q4_k_m", "q5_k", "q6_k"):
        r = convert(src, d / f"{typ}.gguf", type=typ, progress=False, tokenizer="bytes")
        f32 = d / f"{typ}-f32.gguf"
        convert(r.path, f32, type="f32", progress=False)  # the dequantized weights, float32
        out[typ] = (r, str(f32))
    return out


@pytest.mark.parametrize("typ", ["q4_k_m", "q5_k", "q6_k"])
def test_kquant_model(kmodels, typ):
    import rwkvpy

    r, f32 = kmodels[typ]
    want = {"q4_k_m": {"Q4_K", "Q6_K"}, "q5_k": {"Q5_K"}, "q6_k": {"Q6_K"}}[typ]
    assert want <= set(r.tensor_types) and r.type == typ.upper()
    reader = gguf.GGUFReader(r.path)
    head = next(t for t in reader.tensors if t.name == "output.weight")
    assert head.tensor_type.name == ("Q6_K" if typ != "q5_k" else "Q5_K")
    toks = [1, 7, 42, 200, 3]
    ref = rwkvpy.load(f32, mode="exact")
    lr, _ = ref.forward(toks, None)
    lr = np.asarray(lr, np.float64)
    for mode, tol in (("exact", 1e-4), ("fast", 0.1)):
        m = rwkvpy.load(r.path, mode=mode)
        lm, _ = m.forward(toks, None)
        assert np.abs(np.asarray(lm, np.float64) - lr).max() < tol * np.abs(lr).max(), mode


def test_kquant_not_for_rwkvcpp(tmp_path):
    from rwkvpy.convert import convert
    from rwkvpy.errors import ConversionError

    with pytest.raises(ConversionError, match="K-quants"):
        convert("demo", tmp_path / "x.bin", type="q4_k", progress=False)
