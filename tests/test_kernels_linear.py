"""rwkvpy.kernels.linear: every linear against the float32 reference ``x @ dequantize(W).T``.

Errors are max |y - ref| / max |ref| (ref in float64 from the exactly dequantized weights).
Tolerances: exact strategies 1e-5; the integer products (activations rounded to int8 blocks)
2e-2, with int16 blocks (Q8_0) 1e-4.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import fixture_path

import rwkvpy
from rwkvpy.errors import CpuCapabilityError
from rwkvpy.formats.base import QTensor
from rwkvpy.kernels import linear as L
from rwkvpy.kernels.cpu import LEVELS, resolve
from rwkvpy.kernels.kinds import Kind
from rwkvpy.kernels.linear import classes as LC
from rwkvpy.kernels.linear import rows as LR
from rwkvpy.kernels.linear import spec as LS
from rwkvpy.kernels.linear import x8 as LX
from rwkvpy.quant import get_format

QUANT = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
EXACT_TOL = 1e-5
INT8_DOT_TOL = 2e-2  # int8 activations: each moved by up to 1/254 of its block's largest
INT16_TOL = 1e-4  # int16 activations: up to 1/65534

# (out, in): out not a multiple of 16 or 32 included; 520 x 1024 takes the parallel path
# (out * in > SERIAL_MAX_ELEMENTS), the others the serial one.
SHAPES = [(37, 64), (100, 256), (520, 1024), (48, 2048)]
TS = [1, 3, 64]

pytestmark = pytest.mark.skipif(not L.HAVE_NUMBA, reason="numba kernels need numba")


def _weights(shape, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape, dtype=np.float32) * 0.05
    w[:, :3] += 0.2  # an offset in a few blocks, so Q4_1/Q5_1 minima are not ~ -max
    return w


def _qtensor(fmt, w):
    return QTensor(fmt, w.shape, get_format(fmt).quantize(w))


def _ref(x, wd):
    return x.double() @ torch.as_tensor(wd).double().T


def _err(y, ref):
    assert y.dtype == torch.float32
    assert y.shape == ref.shape
    scale = ref.abs().max().item()
    return (y.double() - ref).abs().max().item() / max(scale, 1e-30)


def _x(T, K, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g)
    return x


@pytest.mark.parametrize("fmt", QUANT)
@pytest.mark.parametrize("shape", SHAPES)
def test_blocks_exact(fmt, shape):
    w = _weights(shape, hash((fmt, shape)) % 1000)
    q = _qtensor(fmt, w)
    wd = get_format(fmt).dequantize(q.data, shape)
    lin = L.make_linear(q, "exact")
    assert isinstance(lin, L.BlockLinear) and lin.exact
    assert (lin.out_features, lin.in_features, lin.fmt) == (*shape, fmt)
    assert lin.nbytes == get_format(fmt).nbytes(shape)
    for T in TS:
        x = _x(T, shape[1])
        ref = _ref(x, wd)
        assert _err(lin(x), ref) < EXACT_TOL, (fmt, shape, T)
    x1 = _x(1, shape[1])[0]
    y1 = lin(x1)
    assert y1.shape == (shape[0],)
    assert _err(y1, _ref(x1[None], wd)[0]) < EXACT_TOL


def _int8_blocks(x):
    """x (T, K) rounded as Int8DotLinear rounds it: (xq, dx) per 32-value block."""
    xb = x.double().reshape(x.shape[0], -1, 32)
    dx = (xb.abs().amax(-1, keepdim=True).float() / 127).double()
    xq = torch.where(dx > 0, torch.round(xb / torch.where(dx > 0, dx, 1)), 0)
    return xq, dx


needs_avx2 = pytest.mark.skipif(not L._int8_dot(), reason="the int8 dot kernels need AVX2")


@needs_avx2
@pytest.mark.parametrize("fmt", QUANT)
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_dot(fmt, shape):
    """Int8DotLinear: the integer dot products are exact, so the result equals the float64
    product of the exact weights with the int8-rounded activations (up to float32 rounding of
    the block sums); the rounding itself moves each activation by at most 1/254 of its
    block's largest magnitude. Every T (prompts too: 4 vectors per pass, then single ones, in
    tiles of X8_TOKENS vectors: 2 X8_TOKENS + 7 takes two whole tiles and a ragged one)."""
    w = _weights(shape, 21)
    q = _qtensor(fmt, w)
    wd = get_format(fmt).dequantize(q.data, shape)
    lin = L.Int8DotLinear(q)
    assert not lin.exact and lin.fmt == fmt and lin.nbytes == get_format(fmt).nbytes(shape)
    for T in [1, 2, 4, 5, 11, 2 * L.X8_TOKENS + 7]:
        x = _x(T, shape[1], seed=T)
        y = lin(x)
        xq, dx = _int8_blocks(x)
        assert bool((xq.abs() <= 127).all())
        assert bool(((xq * dx - x.double().reshape(xq.shape)).abs() <= dx / 2 * (1 + 1e-6)).all())
        assert _err(y, _ref((xq * dx).reshape(x.shape), wd)) < EXACT_TOL, (fmt, shape, T)
        assert _err(y, _ref(x, wd)) < INT8_DOT_TOL


@pytest.mark.parametrize("fmt", QUANT)
@pytest.mark.parametrize("shape", SHAPES)
def test_x8_repack_is_a_permutation(fmt, shape):
    """Int8DotLinear's interleaved groups hold exactly the file's bytes: every row unpacked
    from them equals ggml's row, the rows past the last group stay as stored, nothing is added
    (same byte count), and a cached repack of the wrong shape is not trusted."""
    q = _qtensor(fmt, _weights(shape, 8))
    raw2 = np.asarray(q.data).reshape(shape[0], -1)
    pk = L.repack_x8(int(Kind[fmt]), raw2)
    assert pk.shape == (shape[0] // 8, 8 * raw2.shape[1])
    row = np.empty(raw2.shape[1], np.uint8)
    for r in range(8 * pk.shape[0]):
        LX._unpack_row(int(Kind[fmt]), pk, r, row)
        assert np.array_equal(row, raw2[r]), (fmt, shape, r)
    wd = get_format(fmt).dequantize(q.data, shape)
    tail = np.ascontiguousarray(raw2[8 * pk.shape[0] :])
    for r0, r1 in [(0, shape[0]), (3, shape[0] - 2), (9, 16), (5, 6)]:
        out = np.full((r1 - r0, shape[1]), np.nan, np.float32)  # prompt tiles: bit-exact
        LX._dec_rows_x8(int(Kind[fmt]), pk, tail, out, r0, r0, r1, 32)
        assert np.array_equal(out.view(np.uint32), wd[r0:r1].view(np.uint32)), (fmt, r0, r1)
    if L._int8_dot():
        lin = L.Int8DotLinear(q)
        assert np.array_equal(lin._pk, pk) and np.array_equal(lin._tail, raw2[8 * pk.shape[0] :])
        assert lin.nbytes == raw2.nbytes
        bad = {
            "x8": torch.zeros((1, 8), dtype=torch.uint8),
            "tail": torch.zeros(0, dtype=torch.uint8),
        }
        assert np.array_equal(L.Int8DotLinear(q, bad)._pk, pk)
        again = L.Int8DotLinear(q, lin.repacked())
        assert np.shares_memory(again._pk, lin._pk)  # taken as given, not repacked


@needs_avx2
@pytest.mark.parametrize("fmt", QUANT)
def test_int8_dot_extreme_codes(fmt):
    """Every code at its extremes (0 and the largest: 15, 31, -128 and 127 for Q8_0), large
    and zero activation blocks: the integer sums neither saturate nor overflow."""
    f = get_format(fmt)
    shape = (64, 256)
    raw = np.asarray(f.quantize(_weights(shape, 3))).reshape(shape[0], -1).copy()
    bs = raw.shape[1] // (shape[1] // 32)  # bytes per block
    blocks = raw.reshape(shape[0], -1, bs)
    nq = {"Q4_0": 2, "Q4_1": 4, "Q5_0": 6, "Q5_1": 8, "Q8_0": 2}[fmt]
    blocks[0::2, :, nq:] = 0xFF  # all-ones codes (Q8_0: -1)
    blocks[1::4, :, nq:] = 0x00
    if fmt in ("Q5_0", "Q5_1"):
        blocks[0::2, :, nq - 4 : nq] = 0xFF  # every high bit set: code 31
    if fmt == "Q8_0":
        blocks[0::4, :, nq:] = 0x80  # -128
        blocks[2::4, :, nq:] = 0x7F  # 127
    q = QTensor(fmt, shape, raw.reshape(-1))
    wd = f.dequantize(q.data, shape)
    lin = L.Int8DotLinear(q)
    x = _x(6, shape[1], seed=5) * 1e3  # 4 vectors in one pass, then 2 single ones
    x[0, :32] = 0  # a zero block: scale 0
    x[1] = x[1].abs()  # every product of one sign
    x[5] = -x[1]
    xq, dx = _int8_blocks(x)
    assert _err(lin(x), _ref((xq * dx).reshape(x.shape), wd)) < EXACT_TOL


@needs_avx2
@pytest.mark.parametrize("fmt", QUANT + ["Q8_0 int16"])
@pytest.mark.parametrize("n_out", [37, 100, 520])
def test_x8_one_vector_streams_bit_identical(fmt, n_out):
    """One vector: the x8 products read ir.x8.X8_STREAMS groups a quarter of the range apart at
    once; each group's 8 sums equal the one-group kernel's bit for bit, the groups after the
    last whole quarter and the rows past the last group included, serial and on 2 threads."""
    from numba import njit

    from rwkvpy.kernels.ir import x8 as ir_x8

    @njit
    def one_group_at_a_time(kind, pk, x2, y2):
        K = x2.shape[1]
        xq2 = np.empty((1, K), np.int8)
        dx2 = np.empty((1, K // 32), np.float32)
        sx2 = np.empty((1, K // 32), np.float32)
        LX._quantize_x(x2, xq2, dx2, sx2, 127.0)
        for g in range(pk.shape[0]):
            LX._dotx8(kind, (pk, g, xq2, dx2, sx2, K // 32, y2, 0))

    @njit
    def one_group_at_a_time_i16(pk, x2, y2):
        K = x2.shape[1]
        xw2 = np.empty((1, K), np.int16)
        dx2 = np.empty((1, K // 32), np.float32)
        LX._quantize_x(x2, xw2, dx2, np.empty((1, K // 32), np.float32), 32767.0)
        for g in range(pk.shape[0]):
            ir_x8.dotx8w_q8_0(pk, g, xw2, dx2, K // 32, y2, 0)

    K = 1024
    q = _qtensor(fmt.split()[0], _weights((n_out, K), 23))
    lin = L.Int16DotLinear(q) if fmt == "Q8_0 int16" else L.Int8DotLinear(q)
    spec = lin.numba_spec()
    mode, kind, pk, tail = spec[:4]
    x = _x(1, K, seed=5).numpy()
    want = np.full((1, n_out), np.nan, np.float32)
    if mode == L.X8_INT16:
        one_group_at_a_time_i16(pk, x, want)
    else:
        one_group_at_a_time(kind, pk, x, want)
    n8 = 8 * pk.shape[0]
    want[0, n8:] = lin(torch.from_numpy(x))[0, n8:].numpy()  # the tail rows: float kernels
    for threads in (1, 2):
        got = np.full((1, n_out), np.nan, np.float32)
        L.row_product(spec, x, got, threads)
        assert np.array_equal(got, want), threads


def test_stream_groups_keeps_streams_far_apart_and_off_one_cache_set():
    """One vector's 4 streams: none (0) where n // 4 groups are fewer than STREAM_MIN_BYTES;
    else n // 4 groups apart unless that puts two of them at the same offset of a 4 KiB page
    (the same L1 sets); then at most an eighth fewer groups apart, every two streams at least
    STREAM_GAP bytes apart modulo the page; n // 4 where no count does."""
    from rwkvpy.kernels.linear.streams import (
        L1_WAY_BYTES,
        STREAM_GAP,
        STREAM_MIN_BYTES,
        stream_groups,
    )

    def gap(s, row_bytes):
        ds = [(k * s * row_bytes) % L1_WAY_BYTES for k in (1, 2, 3)]
        return min(min(d, L1_WAY_BYTES - d) for d in ds)

    shifted = 0
    for row_bytes in (3456, 4224, 5040, 4608, 6528, 1152 * 16, 1408 * 10):
        for n in range(0, 9000, 7):
            s, q = stream_groups(n, row_bytes, 4), n // 4
            if q * row_bytes < STREAM_MIN_BYTES:
                assert s == 0
                continue
            assert q - q // 8 <= s <= q
            if s < q:
                shifted += 1
                assert gap(s, row_bytes) >= STREAM_GAP and gap(q, row_bytes) < STREAM_GAP
            elif q and gap(q, row_bytes) < STREAM_GAP:  # none nearby is better
                assert all(gap(t, row_bytes) < STREAM_GAP for t in range(max(1, q - q // 8), q))
    assert shifted > 100
    assert stream_groups(8192, 4224, 4) == 2047  # v7 0.1B's Q5_K head: 2048 would be 2112 pages


@pytest.mark.parametrize("shape", SHAPES + [(64, 256)])
def test_int16_dot_q8_0(shape):
    """Int16DotLinear: integer products exact, so the result equals the float64 product of
    the exact weights with the int16-rounded activations; extreme codes (-128, 127) and large
    activations neither saturate nor overflow; NaN/inf activations give NaN."""
    f = get_format("Q8_0")
    raw = np.asarray(f.quantize(_weights(shape, 13))).reshape(shape[0], -1).copy()
    if shape == (64, 256):
        blocks = raw.reshape(shape[0], -1, 34)
        blocks[0::4, :, 2:] = 0x80
        blocks[2::4, :, 2:] = 0x7F
    q = QTensor("Q8_0", shape, raw.reshape(-1))
    wd = f.dequantize(q.data, shape)
    lin = L.Int16DotLinear(q)
    assert not lin.exact and lin.nbytes == f.nbytes(shape)
    for T in [1, 2, 5, 9, L.X8_TOKENS + 3]:  # the last: two tiles of tokens, 3 single ones
        x = _x(T, shape[1], seed=T) * 1e3
        x[0, :32] = 0
        y = lin(x)
        xb = x.reshape(T, -1, 32)  # rounded as the kernel rounds: x * (1 / dx) in float32
        dx = xb.abs().amax(-1, keepdim=True) / 32767
        xw = torch.round(xb * torch.where(dx > 0, 1 / dx, 0)).double()
        dx = dx.double()
        assert bool((xw.abs() <= 32767).all())
        n8 = shape[0] // 8 * 8  # rows past the last group: the exact float kernel
        assert _err(y[:, :n8], _ref((xw * dx).reshape(x.shape), wd[:n8])) < EXACT_TOL, (shape, T)
        if n8 < shape[0]:
            assert _err(y[:, n8:], _ref(x, wd[n8:])) < EXACT_TOL
        assert _err(y, _ref(x, wd)) < 1e-4  # observed ~2e-5 of the output scale
    x = _x(2, shape[1], seed=4)
    x[0, 7] = float("nan")
    y = lin(x)
    assert bool(torch.isnan(y[0]).all()) and bool(torch.isfinite(y[1]).all())


@needs_avx2
@pytest.mark.parametrize("fmt", ["Q4_0", "Q5_1"])
def test_int8_dot_nonfinite_activations(fmt):
    """A NaN or inf activation gives NaN outputs, as the exact kernels do (rounding to int8
    must not hide it); the other vectors of the batch are unaffected."""
    shape = (64, 128)
    lin = L.Int8DotLinear(_qtensor(fmt, _weights(shape, 4)))
    x = _x(6, shape[1], seed=9)  # 4 vectors in one pass, then 2 single ones
    x[0, 40] = float("nan")
    x[1, 100] = float("inf")
    x[4, 3] = float("-inf")
    y = lin(x)
    assert all(bool(torch.isnan(y[t]).all()) for t in (0, 1, 4))
    assert all(bool(torch.isfinite(y[t]).all()) for t in (2, 3, 5))


@pytest.mark.parametrize("dtype,qmax", [(np.int8, 127.0), (np.int16, 32767.0)])
def test_activation_blocks_rounded_as_float32_formula(dtype, qmax):
    """The vector code rounding activations to integer blocks (ir.vecmath.quantize_blocks) against
    the formula in float32 numpy: dx = amax / qmax, xq = rint(x * (1 / dx)), sx = dx sum(xq),
    bit for bit, over blocks of very different scales, an all-zero block, a block of
    subnormals only (counts as zeros), and NaN / inf blocks (dx = sx = NaN)."""
    rng = np.random.default_rng(5)
    T, nb = 7, 40
    x = (rng.standard_normal((T, nb, 32)) * 10.0 ** rng.uniform(-6, 6, (T, nb, 1))).astype(
        np.float32
    )
    x[0, 1] = 0.0
    x[1, 2] = 1e-40
    x[2, 3, 5], x[3, 4, 0], x[4, 5, 31] = np.nan, np.inf, -np.inf
    x = x.reshape(T, nb * 32)
    xq = np.zeros((T, nb * 32), dtype)
    dx, sx = np.empty((T, nb), np.float32), np.empty((T, nb), np.float32)
    LX._quantize_x(x, xq, dx, sx, qmax)

    blocks = x.reshape(T, nb, 32)
    d = np.abs(blocks).max(-1) / np.float32(qmax)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = np.where(d > 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
        q = np.rint(blocks * inv[..., None])
    finite = np.isfinite(blocks).all(-1)
    usable = finite & np.isfinite(inv)
    q = np.where(usable[..., None], q, 0)
    assert np.abs(q).max() <= qmax
    want_d = np.where(finite, d, np.nan).astype(np.float32)
    want_s = (want_d * q.sum(-1).astype(np.float32)).astype(np.float32)
    assert np.array_equal(xq.reshape(T, nb, 32), q.astype(dtype))
    assert np.array_equal(dx, want_d, equal_nan=True) and np.array_equal(sx, want_s, equal_nan=True)
    assert np.isnan(dx[2, 3]) and np.isnan(dx[3, 4]) and np.isnan(dx[4, 5])
    assert dx[0, 1] == 0 and sx[0, 1] == 0 and sx[1, 2] == 0 and not xq[1, 64:96].any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(37, 64), (520, 1024), (24, 100)])
def test_float_exact(dtype, shape):
    """The numba float kernels, rows a multiple of 32 long and not (a scalar tail)."""
    w = torch.from_numpy(_weights(shape, 11)).to(dtype)
    wd = w.float()
    lin = L.make_linear(w, "exact")
    assert (
        lin.exact
        and lin.fmt == {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}[dtype]
    )
    lins = [lin, L.FloatLinear(w)]
    for T in TS:
        x = _x(T, shape[1])
        for ln in lins:
            assert _err(ln(x), _ref(x, wd)) < EXACT_TOL, (type(ln).__name__, T)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n_out", [3, 4, 37, 1040])
def test_float_rows_in_four_streams_bit_identical(dtype, n_out):
    """One-vector float products read 4 rows about a quarter of the range apart at once
    (ir.rows._row_dot_streams; 1040 rows: streams, with and without a scalar tail, serially;
    the others row by row): every row summed as the one-row kernel sums it, bit for bit, the
    rows after the streams' end included, serial and on two threads."""
    from numba import njit

    from rwkvpy.kernels.linear.streams import stream_groups

    @njit
    def one_by_one(kind, raw2, x, y, nb):
        for r in range(raw2.shape[0]):
            y[r] = LR._dot_row(kind, raw2[r], x, nb)

    kind = {torch.float16: 5, torch.bfloat16: 6, torch.float32: 7}[dtype]
    for K in (1024, 100):
        w = torch.from_numpy(_weights((n_out, K), 12)).to(dtype)
        raw2 = w.contiguous().view(torch.uint8).numpy()
        assert (stream_groups(n_out, raw2.strides[0], 4) > 0) == (n_out == 1040)
        x = _x(1, K).numpy()
        want = np.empty((1, n_out), np.float32)
        one_by_one(kind, raw2, x[0], want[0], K // 32)
        if K % 32:
            want[0] += [LR._float_tail(kind, raw2[r], x[0], 32 * (K // 32)) for r in range(n_out)]
        for threads in (1, 2):
            got = np.full((1, n_out), np.nan, np.float32)
            L.row_product(LS._spec(L.ROWS, kind, raw2), x, got, threads)
            assert np.array_equal(got, want), (K, threads)
        assert _err(torch.from_numpy(want), _ref(torch.from_numpy(x), w.float())) < EXACT_TOL


def test_half_special_values():
    """The in-register fp16 conversion is exact for subnormals, zeros, inf and NaN."""
    h = np.arange(65536, dtype=np.uint16)
    w = torch.from_numpy(h.view(np.float16).reshape(256, 256).copy())
    finite = torch.isfinite(w.float())
    lin = L.FloatLinear(w)
    x = torch.zeros(256)
    for j in range(0, 256, 37):  # one-hot inputs read columns back exactly
        x.zero_()
        x[j] = 1.0
        col = lin(x)
        ref = torch.mv(w.float(), x)  # rows holding inf/NaN elsewhere give NaN (inf * 0)
        assert torch.equal(torch.isnan(col), torch.isnan(ref)), j
        ok = ~torch.isnan(ref)
        assert torch.equal(col[ok], ref[ok]), j
        assert torch.equal(col[finite.all(1)], w[finite.all(1), j].float())


def test_h2f_exhaustive():
    """Both float16 -> float32 conversions, on all 65536 bit patterns: the scalar one (row
    decoders, tails) bit for bit, the vector one (ir.rows.dot_f16) through a product with 1."""
    from numba import njit

    from rwkvpy.kernels.ir import rows as ir_rows

    @njit
    def convert(out, rows, one):
        for i in range(65536):
            out[0, i] = LR._h2f(np.int64(i))
            out[1, i] = ir_rows.dot_f16(rows[i], one, 1)

    rows = np.zeros((65536, 32), np.uint16)
    rows[:, 0] = np.arange(65536)
    one = np.zeros(32, np.float32)
    one[0] = 1
    out = np.empty((2, 65536), np.float32)
    convert(out, rows.view(np.uint8), one)
    ref = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
    assert np.array_equal(out[0].view(np.uint32), ref.view(np.uint32))
    # lane sums start from +0 (so -0 comes back as +0) and NaNs stay NaN
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(out[1]), nan)
    assert np.array_equal(out[1][~nan], ref[~nan] + np.float32(0))


@pytest.mark.parametrize("fmt", QUANT)
def test_tile_dequant_bit_exact(fmt):
    """The row decoders used for prompt tiles equal ggml's dequantize bit for bit, on random
    bytes (every float16 scale pattern: subnormal, inf, NaN) and on real quantized data."""
    f = get_format(fmt)
    shape = (64, 128)
    rng = np.random.default_rng(9)
    for raw in (
        rng.integers(0, 256, size=f.nbytes(shape), dtype=np.uint8),
        f.quantize(_weights(shape, 2)),
    ):
        ref = f.dequantize(raw, shape)
        out = np.empty(shape, np.float32)
        raw2 = LC._rows_view(QTensor(fmt, shape, raw), f, *shape)
        LR._dec_rows(int(Kind[fmt]), raw2, out, 0, 0, shape[0], 32)
        same = (out.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(out) & np.isnan(ref))
        assert same.all()


def test_nonfinite_propagate_like_float32():
    shape = (64, 256)
    q = _qtensor("Q8_0", _weights(shape, 4))
    wd = torch.from_numpy(get_format("Q8_0").dequantize(q.data, shape))
    lin = L.make_linear(q, "exact")
    x = _x(1, shape[1])[0]
    x[5] = float("inf")
    y, ref = lin(x), wd @ x
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isinf(y), torch.isinf(ref))
    assert torch.equal(torch.sign(y[torch.isinf(y)]), torch.sign(ref[torch.isinf(ref)]))
    x[77] = float("nan")
    assert bool(torch.isnan(lin(x)).all())


def test_f32_linears():
    shape = (100, 256)
    w = torch.from_numpy(_weights(shape, 6))
    lin = L.make_linear(w, "exact")
    assert isinstance(lin, L.FloatLinear) and lin.nbytes == w.numel() * 4
    assert lin.weight.data_ptr() == w.data_ptr()  # the weight itself, no copy
    torch_lin = L.F32Linear(w)
    for T in TS:
        x = _x(T, shape[1])
        assert _err(lin(x), _ref(x, w)) < EXACT_TOL
        assert _err(lin(x[0]), _ref(x[:1], w)[0]) < EXACT_TOL
        assert _err(torch_lin(x), _ref(x, w)) < EXACT_TOL


@pytest.mark.parametrize("level", LEVELS)
def test_policy_choices(level):
    """Each CPU level's choice (kernels/cpu.py), forced on this machine: float weights exact in
    every policy; block formats on the integer kernels in "fast" from avx2 up, exact below;
    and the products within their bounds whatever this CPU would pick."""
    if level != "generic" and not L._int8_dot():
        with pytest.raises(CpuCapabilityError, match="AVX2"):
            resolve(level)
        return
    cpu = resolve(level)
    w = torch.from_numpy(_weights((64, 128), 8))
    x = _x(5, 128)
    for pol in L.POLICIES:
        for t in (w, w.half(), w.bfloat16()):
            lin = L.make_linear(t, pol, cpu=cpu)
            assert type(lin) is L.FloatLinear and lin.exact
            assert _err(lin(x), _ref(x, t.float())) < EXACT_TOL
        for fmt in QUANT:
            q = _qtensor(fmt, w.numpy())
            lin = L.make_linear(q, pol, cpu=cpu)
            want = L.BlockLinear
            if pol == "fast" and cpu.int8_dot:
                want = L.Int16DotLinear if fmt == "Q8_0" else L.Int8DotLinear
            assert type(lin) is want
            assert lin.exact == (want is L.BlockLinear)
            wd = get_format(fmt).dequantize(q.data, (64, 128))
            tol = EXACT_TOL if lin.exact else (INT16_TOL if fmt == "Q8_0" else INT8_DOT_TOL)
            assert _err(lin(x), _ref(x, wd)) < tol, (level, pol, fmt)
    with pytest.raises(ValueError):
        L.make_linear(w, "lossy")
    with pytest.raises(ValueError):
        L.make_linear(torch.zeros(4, 4, 4))
    with pytest.raises(ValueError):
        L.make_linear(QTensor("Q8_0", (4, 48), np.zeros(4 * 2 * 34, np.uint8)))


def test_input_forms_and_memmap(tmp_path):
    """Unquantized QTensors, read-only memory maps, 3-D and non-contiguous inputs, T = 0."""
    shape = (48, 64)
    w = _weights(shape, 10)
    raw = get_format("Q5_1").quantize(w)
    path = tmp_path / "w.bin"
    raw.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    lin = L.make_linear(QTensor("Q5_1", shape, mm), "exact")
    wd = get_format("Q5_1").dequantize(raw, shape)
    x3 = torch.randn(2, 3, shape[1])
    y3 = lin(x3)
    assert y3.shape == (2, 3, shape[0])
    assert _err(y3.reshape(6, -1), _ref(x3.reshape(6, -1), wd)) < EXACT_TOL
    xt = torch.randn(shape[1], 5).T  # non-contiguous
    assert _err(lin(xt), _ref(xt, wd)) < EXACT_TOL
    assert lin(torch.zeros(0, shape[1])).shape == (0, shape[0])
    assert _err(lin(xt.double()), _ref(xt, wd)) < EXACT_TOL
    f16 = QTensor("F16", shape, w.astype(np.float16).view(np.uint8).reshape(-1))
    lin16 = L.make_linear(f16, "exact")
    assert lin16.fmt == "F16"
    x = torch.randn(shape[1])
    assert _err(lin16(x), _ref(x[None], w.astype(np.float16).astype(np.float32))[0]) < EXACT_TOL
    bf = torch.from_numpy(w).bfloat16()
    qbf = QTensor("BF16", shape, bf.view(torch.int16).numpy().view(np.uint8).reshape(-1))
    assert _err(L.make_linear(qbf)(x), _ref(x[None], bf.float())[0]) < EXACT_TOL
    with pytest.raises(ValueError):
        lin(torch.randn(shape[1] + 1))


def test_threads_and_layer():
    """The numba pool follows torch's thread count and runs on the OpenMP layer where numba
    can load it (else workqueue); one thread means the serial kernel. Each row is summed by
    one thread: same bits either way."""
    import numba

    try:
        import numba.np.ufunc.omppool  # noqa: F401

        layer = "omp"
    except ImportError:  # no OpenMP runtime on this machine
        layer = "workqueue"

    shape = (520, 1024)
    q = _qtensor("Q8_0", _weights(shape, 12))
    lin = L.make_linear(q)
    x = torch.randn(3, shape[1])
    old = torch.get_num_threads()
    n_par = min(2, numba.config.NUMBA_NUM_THREADS)
    try:
        torch.set_num_threads(1)
        y1 = lin(x[:1])
        torch.set_num_threads(n_par)
        y2 = lin(x[:1])
        if n_par > 1:
            assert numba.get_num_threads() == n_par
            assert numba.threading_layer() == layer
        assert torch.equal(y1, y2)
        y3 = lin(x)  # T = 3 > NUMBA_MAX_T: parallel tile dequantization + GEMM
        assert _err(y3, _ref(x, get_format("Q8_0").dequantize(q.data, shape))) < EXACT_TOL
    finally:
        torch.set_num_threads(old)


def test_concurrent_python_threads():
    """Two Python threads calling linears at once: numba's workqueue layer would abort the
    process on concurrent parallel launches; the lock sends the second caller to the serial
    kernel."""
    import threading

    shape = (1024, 1024)
    q = _qtensor("Q4_0", _weights(shape, 13))
    wd = get_format("Q4_0").dequantize(q.data, shape)
    lin = L.make_linear(q)
    xs = [torch.randn(T, shape[1]) for T in (1, 1, 5, 1, 2, 7)]
    errs = []

    def work(k):
        for i in range(6):
            x = xs[(i + k) % len(xs)]
            errs.append(_err(lin(x), _ref(x, wd)))

    ts = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(errs) == 18 and max(errs) < EXACT_TOL


def _rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    return 0


def test_copied_file_weights_leave_the_resident_set(tmp_path):
    """An F16 weight read from a mapped file and converted (and transposed) to float32 at load:
    the file's pages are released (formats.base.release_pages), the data is intact."""
    from rwkvpy.formats.base import release_pages

    shape = (4096, 2048)  # tall: converted and transposed
    g = np.random.default_rng(0)
    data = g.standard_normal(shape).astype(np.float16)
    path = tmp_path / "w.f16"
    data.tofile(path)
    mm = np.memmap(path, dtype=np.float16, mode="r", shape=shape)
    with warnings.catch_warnings():  # read-only array: torch warns that it cannot protect it
        warnings.simplefilter("ignore", UserWarning)
        view = torch.from_numpy(mm)
    float(view.float().sum())  # every page resident
    before = _rss_file_kb()
    lin = L.F32Linear(view, fmt="F16")
    after = _rss_file_kb()
    assert before - after >= 0.9 * data.nbytes / 1024, (before, after)
    assert torch.equal(view, torch.from_numpy(data))  # faulted in again from the file
    x = _x(2, shape[1])
    assert _err(lin(x), _ref(x, data.astype(np.float32))) < EXACT_TOL
    mem = torch.from_numpy(data.copy())  # anonymous memory: never released
    assert release_pages(mem) == 0 and torch.equal(mem, torch.from_numpy(data))


def test_released_views_and_repacked_rows(tmp_path):
    """release_pages also takes a transposed view of a file (a v7 LoRA as rwkv.cpp stores it)
    and a numpy view (the file's blocks after Int8DotLinear repacked them); strided views that
    skip memory are left alone."""
    from rwkvpy.formats.base import release_pages

    shape = (2048, 1024)
    data = np.random.default_rng(1).standard_normal(shape).astype(np.float16)
    path = tmp_path / "w.f16"
    data.tofile(path)
    mm = np.memmap(path, dtype=np.float16, mode="r", shape=shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        view = torch.from_numpy(mm)
    assert release_pages(view[:, ::2]) == 0  # not dense
    float(view.float().sum())
    before = _rss_file_kb()
    assert release_pages(view.t()) >= 0.9 * data.nbytes
    assert before - _rss_file_kb() >= 0.9 * data.nbytes / 1024
    float(view.float().sum())
    before = _rss_file_kb()
    assert release_pages(np.asarray(mm)) >= 0.9 * data.nbytes
    assert before - _rss_file_kb() >= 0.9 * data.nbytes / 1024
    assert torch.equal(view, torch.from_numpy(data))


def test_v7_bin_low_rank_stay_16_bit():
    """rwkv.cpp stores v7's LoRA matrices transposed: they are read as views in the file's
    dtype, never widened to float32. The first matrices stay those views (held by columns,
    models.base LOW_RANK_COLUMNS: no copy), the second ones are copied once into rows; a .pth
    file's first matrices (rows) are copied once into columns."""
    model = rwkvpy.load(fixture_path("rwkv-cpp-tiny", "tiny-rwkv-7v0-834K-FP16.bin"))
    for n in ("w1", "w2", "a1", "a2", "g1", "g2", "v1", "v2"):
        t = model._net.w[f"blocks.1.att.{n}"]
        assert t.dtype == torch.float16, n
        assert (t.t() if n.endswith("1") else t).is_contiguous(), n
    model = rwkvpy.load(fixture_path("reference-pth", "v7_c192_l2.pth"))
    for n in ("w1", "a1", "g1", "v1"):
        assert model._net.w[f"blocks.1.att.{n}"].t().is_contiguous(), n


def test_quantized_first_low_rank_held_by_columns():
    """A first LoRA matrix a file stores block-quantized is dequantized once and held by
    columns like the float ones (the one-token step then reads it without a copy)."""
    from rwkvpy import models
    from rwkvpy.formats.base import to_float32
    from rwkvpy.kernels.plan import choose

    ck = rwkvpy.formats.read(fixture_path("reference-pth", "v6_c192_l2.pth"))
    cfg = models.config_from_shapes(ck.shapes, ck.path, ln_x_eps=ck.ln_x_eps)
    ws = dict(ck.tensors)
    name = "blocks.1.att.time_maa_w1"
    ws[name] = _qtensor("Q8_0", ws[name].float().numpy())
    net = models.build(cfg, ws, ck.path, choose(cfg.n_layer).backend())
    t = net.w[name]
    assert t.t().is_contiguous() and torch.equal(t, to_float32(ws[name]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 96, 40])
def test_fused_low_rank_products(dtype, D):
    """kernels.decode's LoRA products on the matrices as stored: the second products' axpys
    (_vec_mat_part, whole and in two row parts) and the first products' column dots
    (_col_dots, serial and threaded) equal the float32 product of the exactly widened
    weights, a 32-value tail included (D = 40); the axpys bit for bit the rows added one
    after another in float32 (70 rows: groups of ir.vecmath.AXPY_ROWS and the rest)."""
    from rwkvpy.kernels.decode.glue import _col_dots, _cols_bytes, _rows_bytes, _vec_mat_part

    C = 70
    W = torch.from_numpy(_weights((C, D), 31)).to(dtype)
    x = torch.randn(C)
    out = np.empty(D, np.float32)
    kind = {torch.float32: 7, torch.float16: 5, torch.bfloat16: 6}[dtype]
    ref = _ref(x[None], W.float().T.numpy())[0]
    _vec_mat_part(x.numpy(), _rows_bytes(W), kind, out, 0, C, 0, D)
    assert _err(torch.from_numpy(out), ref) < EXACT_TOL
    seq = np.zeros(D, np.float32)  # row after row: multiply, then add (AXPY_ROWS at a time)
    for xc, row in zip(x.numpy(), W.float().numpy()):
        seq = seq + xc * row
    assert np.array_equal(out, seq)
    half = np.empty(D, np.float32)
    _vec_mat_part(x.numpy(), _rows_bytes(W), kind, out, 0, 30, 0, D)
    _vec_mat_part(x.numpy(), _rows_bytes(W), kind, half, 30, C, 0, D)
    assert _err(torch.from_numpy(out + half), ref) < EXACT_TOL
    for threads in (1, 2):
        y = np.empty((1, D), np.float32)
        _col_dots(x.numpy()[None], _cols_bytes(W), kind, y, threads)
        assert _err(torch.from_numpy(y[0]), ref) < EXACT_TOL


@pytest.mark.parametrize("n", [2, 3])
def test_v7_glue_split_across_threads_is_bit_identical(n):
    """The one-token v7 block on several threads splits its LoRAs (columns of the first
    products, in units of 32; parts of the rows of the second, then heads) and its recurrence
    (heads) between the threads (v7._loras_in_par, _lora_out_par, _v7_time_par): the same
    numbers, bit for bit, as the serial _v7_loras + _v7_core, for 2 sequences, an odd head
    count, hidden sizes not a multiple of the parts, tails shorter than 32 and a layer
    without the value LoRA (layer 0)."""
    from rwkvpy.kernels.decode import glue, v7

    B, H, N = 2, 5, 64
    C = H * N
    rng = np.random.default_rng(5)

    def f32(*shape, scale=0.1):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    for first, Dv in ((True, 0), (False, 25)):
        # first matrices as their columns, second ones as their rows: (D, C) bytes each
        W1s, W2s = (
            [
                glue._rows_bytes(torch.from_numpy(f32(D, C)).half())
                if D
                else np.zeros((0, 1), np.uint8)
                for D in (42, 72, Dv, 96)
            ]
            for _ in range(2)
        )
        xs = f32(4, B, C, scale=1.0)
        rkv = f32(3, B, C, scale=1.0)
        vecs = [f32(C) for _ in range(3)] + [f32(C), f32(C), f32(H, N), f32(C) + 1, f32(C)]
        S = f32(B, H, N, N, scale=1.0)
        eps = np.float32(64e-5)
        outs = []
        for par in (False, True):
            vf = f32(B, C, scale=0.0) + rkv[2] * 0.5
            lor = [np.empty((B, C), np.float32) for _ in range(4)]
            S_out, y = np.empty_like(S), np.empty((B, C), np.float32)
            if par:
                hid = v7._lora_hidden(tuple(W1s), 5, B)
                v7._loras_in_par(tuple(xs), tuple(W1s), 5, hid, n)
                parts = np.empty((4, B, glue.LORA_PARTS, C), np.float32)
                v7._lora_out_par(hid, tuple(W2s), 5, parts)
                v7._v7_time_par(
                    (*rkv, vf, *lor), parts, Dv > 0, tuple(vecs), first, eps, S, S_out, y, n
                )
            else:
                v7._v7_loras(
                    tuple(xs),
                    (W1s[0], W2s[0], W1s[1], W2s[1], W1s[2], W2s[2], W1s[3], W2s[3]),
                    5,
                    tuple(lor),
                )
                v7._v7_core((*rkv, vf, *lor), tuple(vecs), first, eps, S, S_out, y)
            outs.append((y, S_out, vf) + tuple(lor[j] for j in range(4) if Dv or j != 2))
        for a, b in zip(*outs):
            assert np.array_equal(a, b) and np.isfinite(a).all()
        assert np.abs(outs[0][0]).max() > 0


@pytest.mark.parametrize("kind", [5, 7])
def test_v6_mix_threads_bit_identical(kind):
    """v6's data-dependent mixes and decay (v6._v6_mix): the first products by columns,
    the second ones summing their rows in glue.LORA_PARTS parts, on numba's threads or
    serially, the same numbers bit for bit, for 2 sequences, row counts not a multiple of the
    parts, F16 and F32 LoRAs; and they are the float64 formula within 1e-5."""
    from rwkvpy.kernels.decode import glue, v6

    B, C, D, Dd = 2, 96, 10, 14
    rng = np.random.default_rng(8)

    def f32(*shape, scale=0.3):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    dtype = torch.float16 if kind == 5 else torch.float32
    ws = [
        torch.from_numpy(f32(*shape)).to(dtype)
        for shape in ((C, 5 * D), (5 * D, C), (C, Dd), (Dd, C))
    ]
    w1, w2, dw1, dw2 = (
        (glue._rows_bytes if i % 2 else glue._cols_bytes)(t) for i, t in enumerate(ws)
    )
    w2 = w2.reshape(5, D, -1)
    maa, td = f32(5, C), f32(C) - 1
    xx, prev, xxx = f32(B, C), f32(B, C), f32(B, C)
    outs = []
    for threads in (1, 2):
        out, dec = np.empty((5, B, C), np.float32), np.empty((B, C), np.float32)
        v6._v6_mix(xx, prev, xxx, (w1, w2, td, dw1, dw2), maa, kind, out, dec, threads)
        outs.append((out, dec))
    for a, b in zip(*outs):
        assert np.array_equal(a, b) and np.isfinite(a).all()
    W1, W2, DW1, DW2 = (t.double().numpy() for t in ws)
    h = np.tanh(xxx.astype(np.float64) @ W1)
    for j in range(5):
        m = h[:, j * D : (j + 1) * D] @ W2[j * D : (j + 1) * D]
        ref = xx + (prev - xx).astype(np.float64) * (maa[j] + m)
        assert np.abs(outs[0][0][j] - ref).max() < 1e-5
    ref = np.exp(-np.exp(td + np.tanh(outs[0][0][0].astype(np.float64) @ DW1) @ DW2))
    assert np.abs(outs[0][1] - ref).max() < 1e-5


def test_vector_exp_within_one_ulp():
    """kernels.ir.vecmath.exp8_f32 through glue._vexp (the one-token glue's exponentials) against
    float64 exp rounded to float32: at most 1 ulp over [-110, 95] (subnormal results
    included), inf above the float32 range, 0 below it, NaN kept; a length that is not a
    multiple of 8 (the padded tail) gives every value the same function."""
    from rwkvpy.kernels.decode.glue import _vexp

    x = np.concatenate(
        [
            np.linspace(-110, 95, 400_003, dtype=np.float32),
            np.array([np.nan, np.inf, -np.inf, 0.0, 88.72, 88.73, -87.3, -103.9], np.float32),
        ]
    )
    y = x.copy()
    _vexp(y)
    ref = np.exp(x.astype(np.float64))
    with np.errstate(over="ignore"):
        ref32 = ref.astype(np.float32)
    pos = np.isfinite(ref32) & (ref32 > 0)
    ulp = np.abs(y[pos] - ref[pos]) / np.spacing(ref32[pos]).astype(np.float64)
    assert ulp.max() <= 1.0, (ulp.max(), x[pos][np.argmax(ulp)])
    assert np.array_equal(np.isinf(y), np.isinf(ref32)) and np.array_equal(y == 0, ref32 == 0)
    assert np.isnan(y[-8]) and y[-7] == np.inf and y[-6] == 0 and y[-5] == 1
    tail = x[-13:].copy()  # 13 values: one vector and a padded tail of 5
    _vexp(tail)
    assert np.array_equal(tail, y[-13:], equal_nan=True)


def test_numba_cache_keyed_on_every_kernel_source(tmp_path):
    """The kernels' numba cache is stamped with the hash of every source file of the kernels
    folder (numba_cache.py): a change to an intrinsic alone (kernels/ir/, a subfolder), which linear/ and
    decode/ compile into their own functions, makes their cached code stale. numba's own stamp
    (the function's file only) stays for functions elsewhere."""
    import hashlib
    import shutil

    from rwkvpy import numba_cache
    from rwkvpy.kernels.decode import v7
    from rwkvpy.kernels.ir import rows as ir_rows
    from rwkvpy.tokenizers import _world_kernels

    assert numba_cache.LOCATORS
    stamp = numba_cache.sources_stamp()
    for f in (L.row_product, v7._v7_block):
        loc = f._cache._impl.locator
        assert isinstance(loc, numba_cache.LOCATORS) and loc.get_source_stamp() == stamp
    other = _world_kernels.encode._cache._impl.locator
    with open(_world_kernels.__file__, "rb") as f:
        assert other.get_source_stamp() == hashlib.sha256(f.read()).digest()
    # the stamp follows every file of the folder and its subfolders: ir/rows.py changed, the
    # same for linear/
    copy = tmp_path / "kernels"
    shutil.copytree(numba_cache._DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert numba_cache.sources_stamp(str(copy)) == stamp
    with open(copy / "ir" / "rows.py", "a") as f:
        f.write("\n# changed\n")
    assert numba_cache.sources_stamp(str(copy)) != stamp
    assert ir_rows.__file__.startswith(numba_cache._DIR)
