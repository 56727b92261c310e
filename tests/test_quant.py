"""rwkvpy.quant against ggml: gguf-py's numpy port (gguf.quants) and a scalar transcription of
ggml's reference quantizers, compared bit for bit."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import quants as gq  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402

from rwkvpy.errors import QuantizationError, RwkvpyError  # noqa: E402
from rwkvpy.quant import (  # noqa: E402
    FORMATS,
    FORMATS_BY_GGML_TYPE,
    WeightFormat,
    base,
    dequantize,
    get_format,
    quantize,
)

# gguf's numpy port warns on the overflow / NaN edge cases; our code must not warn at all.
pytestmark = [
    pytest.mark.fast,  # the fast tier: needs only the package (pyproject's markers)
    pytest.mark.filterwarnings("error::RuntimeWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning:gguf"),
]

ALL = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
QUANTIZED = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
WITH_MIN = {"Q4_1", "Q5_1"}  # blocks with an f16 minimum after the f16 scale
WITH_QH = {"Q5_0": 2, "Q5_1": 4}  # offset of qh[4] in the block


# ----------------------------------------------------------------------------- helpers


def qtype(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name]


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def ref_dequantize(name: str, raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    rows = raw.reshape(-1, raw.size // max(1, math.prod(shape[:-1])))
    out = gq.dequantize(rows, qtype(name))
    return np.asarray(out, dtype=np.float32).reshape(shape)


def ref_quantize(name: str, x: np.ndarray) -> np.ndarray:
    out = gq.quantize(x, qtype(name))
    return np.ascontiguousarray(out).view(np.uint8).reshape(-1)


def assert_dequant_matches(name: str, raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    got = dequantize(name, raw, shape)
    assert got.dtype == np.float32 and got.shape == shape
    want = ref_dequantize(name, raw, shape)
    assert np.array_equal(bits(got), bits(want)), name
    return got


def assert_quant_matches(name: str, x: np.ndarray) -> np.ndarray:
    got = quantize(name, x)
    assert got.dtype == np.uint8 and got.ndim == 1
    assert got.size == FORMATS[name].nbytes(x.shape)
    want = ref_quantize(name, x)
    assert np.array_equal(got, want), (name, np.flatnonzero(got != want)[:10])
    return got


def finite_f16_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random float16 bit patterns of finite numbers (both signs, subnormals included)."""
    h = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    exp_all_ones = (h & 0x7C00) == 0x7C00
    h[exp_all_ones] &= np.uint16(0xBFFF)  # clear the exponent's top bit
    return h


def random_blocks(name: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes for n blocks (as (n, type_size) uint8) with finite f16 scales / minimums."""
    fmt = FORMATS[name]
    raw = rng.integers(0, 256, (n_blocks, fmt.type_size), dtype=np.uint8)
    set_f16(raw, 0, finite_f16_bits(rng, n_blocks))
    if name in WITH_MIN:
        set_f16(raw, 2, finite_f16_bits(rng, n_blocks))
    return raw


def set_f16(raw: np.ndarray, offset: int, h: np.ndarray) -> None:
    h = np.asarray(h, dtype=np.uint16)
    raw[:, offset] = h & 0xFF
    raw[:, offset + 1] = h >> 8


F16_EDGE_BITS = [
    0x0000,  # +0
    0x8000,  # -0
    0x3C00,  # 1
    0xBC00,  # -1
    0x7BFF,  # 65504, largest finite
    0xFBFF,  # -65504
    0x0001,  # smallest subnormal, 2^-24
    0x8001,  # its negative
    0x03FF,  # largest subnormal
    0x83FF,
    0x0400,  # smallest normal
    0x3555,  # ~0.333
    0xC8D2,  # ~-9.64
]


def edge_code_bytes(name: str) -> list[np.ndarray]:
    """Payloads (everything after d[, m]) hitting the extreme codes."""
    fmt = FORMATS[name]
    head = 4 if name in WITH_MIN else 2
    size = fmt.type_size - head
    if name == "Q8_0":
        vals = [-128, 127, 0, -1, 1]
        out = [np.full(size, v, dtype=np.int8).view(np.uint8) for v in vals]
        out.append(np.array([-128, 127] * 16, dtype=np.int8).view(np.uint8))
        out.append(np.arange(-128, 128, 8, dtype=np.int8).view(np.uint8))
        return out
    nibble_patterns = [0x00, 0xFF, 0x0F, 0xF0, 0x88, 0x77]
    if name not in WITH_QH:
        return [np.full(size, p, dtype=np.uint8) for p in nibble_patterns]
    out = []
    for qh in (0x00000000, 0xFFFFFFFF, 0x0000FFFF, 0xFFFF0000, 0x55555555, 0x80000001):
        for p in nibble_patterns:
            payload = np.empty(size, dtype=np.uint8)
            payload[:4] = np.frombuffer(np.uint32(qh).astype("<u4").tobytes(), np.uint8)
            payload[4:] = p
            out.append(payload)
    return out


# --------------------------------------------------- scalar transcription of ggml's ref code


def c_to_int(v: np.float32) -> int:
    """C's float -> integer conversion (truncation); NaN/inf give 0 as on x86 (UB in C)."""
    return int(v) if math.isfinite(v) else 0


def fp32_to_fp16_bits(v: np.float32) -> int:
    return int(np.array([v], dtype=np.float32).astype(np.float16).view(np.uint16)[0])


def ggml_ref_quantize_block(name: str, x: np.ndarray) -> bytes:
    """One block through quantize_row_<name>_ref, written out as scalar float32 steps."""
    f = np.float32
    x = [f(v) for v in x]
    qk = len(x)
    with np.errstate(all="ignore"):
        if name in ("Q4_0", "Q5_0"):
            amax, mx = f(0), f(0)
            for v in x:
                if amax < abs(v):
                    amax, mx = abs(v), v
            d = mx / f(-8 if name == "Q4_0" else -16)
            idv = f(1) / d if d else f(0)
            top, bias = (15, f(8.5)) if name == "Q4_0" else (31, f(16.5))
            q = [min(top, c_to_int(v * idv + bias)) for v in x]
            head = [fp32_to_fp16_bits(d)]
        elif name in ("Q4_1", "Q5_1"):
            mn, mx = f(np.finfo(np.float32).max), -f(np.finfo(np.float32).max)
            for v in x:
                if v < mn:
                    mn = v
                if v > mx:
                    mx = v
            d = (mx - mn) / f(15 if name == "Q4_1" else 31)
            idv = f(1) / d if d else f(0)
            q = [c_to_int((v - mn) * idv + f(0.5)) for v in x]
            if name == "Q4_1":
                q = [min(15, c) for c in q]
            head = [fp32_to_fp16_bits(d), fp32_to_fp16_bits(mn)]
        elif name == "Q8_0":
            amax = f(0)
            for v in x:
                amax = amax if amax > abs(v) else abs(v)  # MAX(a, b)
            d = amax / f(127)
            idv = f(1) / d if d else f(0)
            out = b"".join(int(h).to_bytes(2, "little") for h in [fp32_to_fp16_bits(d)])
            q = []
            for v in x:
                p = v * idv
                if not math.isfinite(p):
                    q.append(0)
                    continue
                t = math.trunc(float(p))
                if abs(float(p) - t) >= 0.5:
                    t += 1 if p > 0 else -1
                q.append(t)
            return out + bytes(np.array(q, dtype=np.int8).view(np.uint8))
        else:
            raise AssertionError(name)
    out = b"".join(int(h).to_bytes(2, "little") for h in head)
    if name in WITH_QH:
        qh = 0
        for j, c in enumerate(q):
            qh |= ((c & 0x10) >> 4) << j
        out += qh.to_bytes(4, "little")
    half = qk // 2
    out += bytes((q[j] & 0x0F) | ((q[j + half] & 0x0F) << 4) for j in range(half))
    return out


# ------------------------------------------------------------------------ registry & sizes


def test_registry_and_attributes():
    # the K-quants after these: tests/test_quant_k.py
    assert list(FORMATS)[: len(ALL)] == ALL
    expected_type = {
        "F32": 0,
        "F16": 1,
        "Q4_0": 2,
        "Q4_1": 3,
        "Q5_0": 6,
        "Q5_1": 7,
        "Q8_0": 8,
        "BF16": 30,
    }
    for name, fmt in ((n, FORMATS[n]) for n in ALL):
        assert isinstance(fmt, WeightFormat)
        assert fmt.name == name
        assert fmt.ggml_type == expected_type[name] == int(qtype(name))
        assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[qtype(name)]
        assert fmt.quantized == (name in QUANTIZED)
        assert fmt.block_dtype.itemsize == fmt.type_size
        assert FORMATS_BY_GGML_TYPE[fmt.ggml_type] is fmt


@pytest.mark.parametrize(
    "alias, name",
    [
        ("fp32", "F32"),
        ("f32", "F32"),
        ("FLOAT32", "F32"),
        ("fp16", "F16"),
        ("F16", "F16"),
        ("half", "F16"),
        ("bf16", "BF16"),
        ("bfloat16", "BF16"),
        ("q4_0", "Q4_0"),
        ("Q4-1", "Q4_1"),
        ("q5_0", "Q5_0"),
        ("q5_1", "Q5_1"),
        (" Q8_0 ", "Q8_0"),
        (7, "Q5_1"),
        (np.int32(30), "BF16"),
    ],
)
def test_get_format_aliases(alias, name):
    assert get_format(alias) is FORMATS[name]
    assert get_format(FORMATS[name]) is FORMATS[name]


@pytest.mark.parametrize("bad", ["q4_2", "int8", "", 99, None])
def test_get_format_unknown(bad):
    with pytest.raises(QuantizationError) as e:
        get_format(bad)
    assert isinstance(e.value, RwkvpyError) and isinstance(e.value, ValueError)
    if not isinstance(bad, int):
        assert str(e.value) == (
            f"unknown weight format {bad!r}; known formats: "
            "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K"
        )
    else:
        assert "unsupported ggml type 99" in str(e.value) and "Q5_1=7" in str(e.value)


def test_nbytes():
    assert get_format("Q5_1").nbytes((768, 192)) == 768 * 192 // 32 * 24
    assert get_format("Q4_0").nbytes((2, 64)) == 4 * 18
    assert get_format("Q8_0").nbytes([32]) == 34
    assert get_format("F16").nbytes((3, 5)) == 30
    assert get_format("BF16").nbytes((7,)) == 14
    assert get_format("F32").nbytes(()) == 4
    assert get_format("Q4_1").nbytes((0, 32)) == 0
    with pytest.raises(
        QuantizationError,
        match=r"^Q4_0: row size 33 \(last dim of shape "
        r"\(2, 33\)\) is not a multiple of the block size 32$",
    ):
        get_format("Q4_0").nbytes((2, 33))
    with pytest.raises(QuantizationError, match="negative"):
        get_format("F32").nbytes((2, -1))


def test_size_mismatch_messages():
    q = np.zeros(110592 - 8, dtype=np.uint8)
    with pytest.raises(QuantizationError) as e:
        dequantize("Q5_1", q, (768, 192))
    assert str(e.value) == (
        "Q5_1 data for shape (768, 192) needs 110592 bytes (4608 blocks of 24 bytes), got 110584"
    )
    with pytest.raises(QuantizationError) as e:
        dequantize("Q8_0", np.zeros(35, dtype=np.uint8), (32,))
    assert str(e.value) == "Q8_0 data for shape (32,) needs 34 bytes (1 blocks of 34 bytes), got 35"
    with pytest.raises(QuantizationError) as e:
        dequantize("F16", np.zeros(20, dtype=np.uint8), (3, 4))
    assert str(e.value) == (
        "F16 data for shape (3, 4) needs 24 bytes (12 elements of 2 bytes), got 20"
    )
    with pytest.raises(QuantizationError, match="row size 48"):
        dequantize("Q4_0", np.zeros(54, dtype=np.uint8), (48,))
    with pytest.raises(QuantizationError, match="row size 31"):
        quantize("Q8_0", np.zeros((4, 31), dtype=np.float32))
    with pytest.raises(QuantizationError, match="dtype complex64"):
        quantize("F32", np.zeros(4, dtype=np.complex64))


# -------------------------------------------------------------------------- dequantization


@pytest.mark.parametrize("name", QUANTIZED)
def test_dequantize_random_blocks(name):
    rng = np.random.default_rng(1234 + ALL.index(name))
    shape = (24, 4 * 32)
    raw = random_blocks(name, 24 * 4, rng).reshape(-1)
    assert_dequant_matches(name, raw, shape)


@pytest.mark.parametrize("name", QUANTIZED)
def test_dequantize_edge_blocks(name):
    """Zero, negative, largest and subnormal f16 scales (and minimums) x extreme codes."""
    fmt = FORMATS[name]
    payloads = edge_code_bytes(name)
    scales = F16_EDGE_BITS
    mins = F16_EDGE_BITS if name in WITH_MIN else [None]
    blocks = []
    for d in scales:
        for m in mins:
            for p in payloads:
                blk = np.empty(fmt.type_size, dtype=np.uint8)
                blk[0:2] = (d & 0xFF, d >> 8)
                off = 2
                if m is not None:
                    blk[2:4] = (m & 0xFF, m >> 8)
                    off = 4
                blk[off:] = p
                blocks.append(blk)
    raw = np.concatenate(blocks)
    n = len(blocks)
    got = assert_dequant_matches(name, raw, (n, 32))
    # Independent spot check of the layout: decode block by block by hand.
    f16 = lambda h: float(np.array([h], np.uint16).view(np.float16)[0])  # noqa: E731
    for i in range(0, n, max(1, n // 40)):
        blk = raw[i * fmt.type_size : (i + 1) * fmt.type_size]
        d = f16(int(blk[0]) | int(blk[1]) << 8)
        if name == "Q8_0":
            want = blk[2:].view(np.int8).astype(np.float64) * d
        else:
            m = f16(int(blk[2]) | int(blk[3]) << 8) if name in WITH_MIN else 0.0
            qs = blk[-16:]
            q = np.concatenate([qs & 0x0F, qs >> 4]).astype(np.int64)
            if name in WITH_QH:
                qh = int.from_bytes(bytes(blk[WITH_QH[name] : WITH_QH[name] + 4]), "little")
                q |= np.array([((qh >> j) & 1) << 4 for j in range(32)])
            offset = {"Q4_0": 8, "Q5_0": 16}.get(name, 0)
            want = (q - offset) * d + m
        np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", QUANTIZED)
def test_dequantize_infinite_and_nan_scales(name):
    fmt = FORMATS[name]
    rng = np.random.default_rng(7)
    raw = random_blocks(name, 12, rng)
    special = [0x7C00, 0xFC00, 0x7E00, 0x7C00, 0xFC00, 0x7E00] * 2
    set_f16(raw, 0, special)
    if name in WITH_MIN:
        set_f16(raw, 2, [0x3C00, 0x3C00, 0x3C00, 0xFC00, 0x7C00, 0x7E00] * 2)
    raw = raw.reshape(-1)
    got = dequantize(name, raw, (12, 32))
    want = ref_dequantize(name, raw, (12, 32))
    np.testing.assert_array_equal(got, want)  # NaNs compare equal here
    assert fmt.nbytes((12, 32)) == raw.size


@pytest.mark.parametrize("name", ["F32", "F16", "BF16"])
def test_dequantize_float_formats(name):
    rng = np.random.default_rng(99)
    fmt = FORMATS[name]
    raw = rng.integers(0, 256, 40 * 7 * fmt.type_size, dtype=np.uint8)
    specials = {
        "F32": np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -3.4e38], np.float32),
        "F16": np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 6e-8, -65504], np.float16),
        "BF16": np.array([0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x0001, 0xFF7F], np.uint16),
    }[name]
    raw[: specials.nbytes] = specials.view(np.uint8)
    got = dequantize(name, raw, (40, 7))
    want = ref_dequantize(name, raw, (40, 7))
    np.testing.assert_array_equal(got, want)
    finite = np.isfinite(want) | np.isinf(want)
    assert np.array_equal(bits(got)[finite], bits(want)[finite])
    if name == "BF16":
        hi = raw.view("<u2").astype(np.uint32) << 16
        assert np.array_equal(bits(got).reshape(-1), hi)


@pytest.mark.parametrize("name", ALL)
def test_dequantize_inputs_and_chunks(name, monkeypatch, tmp_path):
    """bytes, read-only unaligned memmap slices, 3-D shapes, many chunks, empty tensors."""
    fmt = FORMATS[name]
    rng = np.random.default_rng(5)
    shape = (3, 5, 64)
    if fmt.quantized:
        raw = random_blocks(name, fmt.n_blocks(shape), rng).reshape(-1)
    else:
        raw = quantize(name, rng.standard_normal(shape).astype(np.float32))
    want = ref_dequantize(name, raw, shape)

    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 7 * fmt.block_size)  # ragged last chunk
    assert np.array_equal(bits(dequantize(name, raw, shape)), bits(want))
    assert np.array_equal(bits(dequantize(name, raw.tobytes(), list(shape))), bits(want))

    path = tmp_path / "t.bin"
    path.write_bytes(b"abc" + raw.tobytes() + b"xyz")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    view = mm[3 : 3 + raw.size]
    got = fmt.dequantize(view, shape)
    assert np.array_equal(bits(got), bits(want))
    assert type(got) is np.ndarray and got.flags.writeable and got.flags.c_contiguous
    del view, mm

    empty = fmt.dequantize(np.zeros(0, np.uint8), (0, 64))
    assert empty.shape == (0, 64) and empty.dtype == np.float32


@pytest.mark.parametrize("name", ALL)
def test_dequantize_memory(name):
    """Peak allocation stays well under two outputs' worth (work is done in row chunks)."""
    fmt = FORMATS[name]
    shape = (1024, 4096)  # 16 MiB of float32
    raw = np.zeros(fmt.nbytes(shape), dtype=np.uint8)
    tracemalloc.start()
    try:
        out = fmt.dequantize(raw, shape)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1.75 * out.nbytes, (name, peak / out.nbytes)


# ---------------------------------------------------------------------------- quantization


def quant_cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2024)
    k = 128
    normal = rng.standard_normal((16, k)).astype(np.float32)
    outlier = (rng.standard_normal((8, k)) * 0.02).astype(np.float32)
    outlier[np.arange(8), rng.integers(0, k, 8)] = [1e4, -1e4, 300, -300, 65504, -7e4, 1e6, 5]
    const = np.repeat(
        np.array(
            [[0.0], [1.0], [-1.0], [3.3e-3], [-1234.5], [65504.0], [1e-7], [-2.5]], np.float32
        ),
        k,
        axis=1,
    )
    zeros = np.zeros((4, k), np.float32)
    zeros[1, 5] = 1.0  # one nonzero element in an otherwise zero row
    mixed = np.concatenate([normal[:4], zeros, const[:4]])
    ties = (rng.integers(-254, 255, (8, k)) / 2).astype(np.float32)
    ties[:, 0] = 127.0  # scale 1 for Q8_0: x * id lands exactly on .5
    opposite = rng.standard_normal((4, k)).astype(np.float32)
    opposite[:, 0], opposite[:, 1] = 9.0, -9.0  # equal magnitudes: the first one wins
    opposite[2:, 0], opposite[2:, 1] = -9.0, 9.0
    return {
        "normal": normal,
        "normal_small": normal * np.float32(1e-3),
        "normal_large": normal * np.float32(1e3),
        "uniform": rng.uniform(-1, 1, (16, k)).astype(np.float32),
        "positive": rng.uniform(0.5, 2.0, (8, k)).astype(np.float32),
        "outlier": outlier,
        "zeros": zeros,
        "constant": const,
        "mixed": mixed,
        "tiny_1e-6": normal[:8] * np.float32(1e-6),  # scales become f16 subnormals
        "tiny_1e-9": normal[:8] * np.float32(1e-9),  # scales underflow f16 to 0
        "tiny_1e-30": normal[:8] * np.float32(1e-30),
        "subnormal_f32": normal[:8] * np.float32(1e-40),  # 1/d overflows to inf
        "huge": normal[:8] * np.float32(1e6),  # scales overflow f16 to inf
        "ties": ties,
        "opposite": opposite,
        "vector": normal[0],
        "3d": normal.reshape(4, 4, k),
    }


QCASES = quant_cases()


@pytest.mark.parametrize("case", list(QCASES))
@pytest.mark.parametrize("name", ALL)
def test_quantize_matches_gguf(name, case):
    assert_quant_matches(name, QCASES[case])


@pytest.mark.parametrize("name", ALL)
def test_quantize_input_variants(name, monkeypatch):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((64, 96)).astype(np.float32)
    want = ref_quantize(name, x)
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 5 * FORMATS[name].block_size)
    assert np.array_equal(quantize(name, x), want)
    xt = np.ascontiguousarray(x.T).T  # same values, Fortran order
    assert np.array_equal(quantize(name, xt), want)
    x64 = rng.standard_normal((4, 64))
    assert np.array_equal(quantize(name, x64), ref_quantize(name, x64.astype(np.float32)))
    assert quantize(name, np.zeros((0, 32), np.float32)).size == 0


def test_bf16_rounding_and_nan():
    """ggml_compute_fp32_to_bf16: round to nearest even, NaN quieted with its payload kept."""
    u = np.array(
        [
            0x3F808000,  # tie, even below -> stays 0x3F80
            0x3F818000,  # tie, odd below -> rounds up to 0x3F82
            0x3F808001,  # above the tie -> up
            0x3F807FFF,  # below the tie -> down
            0x7F7FFFFF,  # largest float -> rounds to inf
            0xFF7FFFFF,
            0x00000001,  # subnormal, kept (rounds to 0 here)
            0x00018000,  # subnormal tie, odd -> up
            0x7F800000,  # inf
            0xFF800000,  # -inf
            0x7F800001,  # signalling NaN -> quiet
            0xFFA12345,  # negative NaN with payload
            0x7FC00000,  # quiet NaN
            0x80000000,  # -0
        ],
        dtype=np.uint32,
    )
    got = quantize("BF16", u.view(np.float32)).view("<u2")
    want = [
        0x3F80,
        0x3F82,
        0x3F81,
        0x3F80,
        0x7F80,
        0xFF80,
        0x0000,
        0x0002,
        0x7F80,
        0xFF80,
        0x7FC0,
        0xFFE1,
        0x7FC0,
        0x8000,
    ]
    assert [hex(v) for v in got] == [hex(v) for v in want]
    assert np.array_equal(got.view(np.uint8), ref_quantize("BF16", u.view(np.float32)))


def special_blocks() -> np.ndarray:
    """Blocks where gguf's numpy port and ggml's loops may part: signed zeros, NaN, inf."""
    rng = np.random.default_rng(3)
    f = np.float32
    blocks = []

    def add(values):
        b = rng.standard_normal(32).astype(f)
        b[: len(values)] = values
        blocks.append(b)

    blocks.append(np.full(32, -0.0, f))  # all negative zeros
    z = np.zeros(32, f)
    z[0] = -0.0
    blocks.append(z)  # first zero negative
    z = np.full(32, -0.0, f)
    z[0] = 0.0
    blocks.append(z)  # first zero positive
    p = rng.uniform(0.1, 1.0, 32).astype(f)
    p[3], p[9] = -0.0, 0.0
    blocks.append(p)  # min is a zero, first one negative
    blocks.append(-p)  # max is a zero, first one negative
    add([np.nan])
    add([1.0, np.nan, 50.0])
    b = rng.standard_normal(32).astype(f)
    b[-1] = np.nan
    blocks.append(b)  # NaN last: Q8_0's amax stays NaN
    b = rng.standard_normal(32).astype(f)
    b[20] = np.nan
    after = np.abs(b[21:]).max()
    b[:20] = np.clip(b[:20], -after, after)
    b[5] = after * f(1.003)  # still codes to 127, not out of int8 range (UB in C)
    blocks.append(b)  # Q8_0: the fold forgets b[5] at the NaN, so d is smaller
    blocks.append(np.full(32, np.nan, f))
    blocks.append(np.full(32, np.inf, f))
    add([np.inf])
    add([-np.inf, 2.0])
    add([3.4e38, -3.4e38])  # max - min overflows
    return np.stack(blocks)


@pytest.mark.parametrize("name", QUANTIZED)
def test_quantize_matches_ggml_scalar_reference(name):
    """Our bytes equal a scalar transcription of quantize_row_*_ref, on random blocks (where
    gguf also agrees) and on blocks with signed zeros, NaN and inf."""
    rng = np.random.default_rng(8)
    normal = rng.standard_normal((6, 32)).astype(np.float32)
    ref = b"".join(ggml_ref_quantize_block(name, b) for b in normal)
    assert ref == ref_quantize(name, normal).tobytes()  # the transcription is faithful
    assert quantize(name, normal).tobytes() == ref

    special = special_blocks()
    got = quantize(name, special)
    fmt = FORMATS[name]
    for i, block in enumerate(special):
        want = ggml_ref_quantize_block(name, block)
        assert got[i * fmt.type_size : (i + 1) * fmt.type_size].tobytes() == want, i


# ------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize(
    "name, rel_rms",
    [
        ("F32", 0.0),
        ("F16", 1e-3),
        ("BF16", 5e-3),
        ("Q4_0", 0.15),
        ("Q4_1", 0.12),
        ("Q5_0", 0.07),
        ("Q5_1", 0.06),
        ("Q8_0", 0.01),
    ],
)
def test_round_trip(name, rel_rms):
    rng = np.random.default_rng(17)
    x = rng.standard_normal((32, 256)).astype(np.float32)
    fmt = get_format(name)
    raw = fmt.quantize(x)
    y = fmt.dequantize(raw, x.shape)
    err = float(np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x**2)))
    assert err <= rel_rms, err
    if fmt.quantized:
        # every element within half a step (plus f16 rounding of the scale) of its input
        blocks = x.reshape(-1, 32)
        span = blocks.max(1) - blocks.min(1)
        levels = {"Q4_0": 15, "Q4_1": 15, "Q5_0": 31, "Q5_1": 31, "Q8_0": 254}[name]
        err_b = np.abs(y.reshape(-1, 32) - blocks).max(1)
        assert np.all(err_b <= span / levels * 1.05)
    # the bytes survive a second pass for the symmetric formats
    if name in ("F32", "F16", "BF16", "Q8_0"):
        assert np.array_equal(fmt.quantize(y), raw)
