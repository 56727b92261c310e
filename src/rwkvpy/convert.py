"""Convert any supported model file to GGUF or rwkv.cpp ``.bin``, optionally quantizing.

Example::

    from rwkvpy.convert import convert
    convert("RWKV-x070-World-1.5B.pth", "rwkv7-1.5b-q5_1.gguf", type="q5_1")

Sources: BlinkDL ``.pth``, rwkv.cpp ``.bin``, GGUF, ``.safetensors`` and Hugging Face folders
(see :mod:`rwkvpy.formats`). The output format follows the extension of ``dst``: ``.gguf``
(llama.cpp's layouts for v6/v7, see :mod:`rwkvpy.formats.gguf`) or ``.bin`` (rwkv.cpp's format,
with rwkv.cpp's converter transforms, readable by rwkv.cpp itself).

Which tensors get which type follows rwkv.cpp (:func:`rwkvpy.formats.plan.storage_type`):
1-D and a few small tensors stay F32, matrices become F16/BF16, and a quantized type applies
only to the 2-D tensors rwkv.cpp quantizes (never ``emb``, ``head`` unless ``quantize_head``,
nor v7's LoRA matrices). Quantization starts from the source's float32 values (a bf16 or f16
source is upcast exactly).

From an rwkv.cpp ``.bin`` to a ``.bin`` the tensors are taken as stored (no undo/redo of the
converter's transforms) and quantized as rwkv.cpp's ``rwkv_quantize_model_file`` does; tensors
it leaves alone keep their type.

The conversion streams tensor by tensor (large pure-reshape tensors in row chunks): the model
is never in memory, only the tensor being written. The output is written to a temp file
renamed into place at the end, so an interrupted run leaves no file.
"""

from __future__ import annotations

import os
import struct
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import ConversionError, OutputExistsError, QuantizationError
from .formats.base import QTensor, to_float32

TYPES = (
    "f32",
    "f16",
    "bf16",
    "q4_0",
    "q4_1",
    "q5_0",
    "q5_1",
    "q8_0",
    "q4_k",
    "q5_k",
    "q6_k",
    "q4_k_m",
    "q5_k_m",
)
OUTPUT_FORMATS = {".gguf": "gguf", ".bin": "rwkv.cpp"}

#: Elements converted at a time when a tensor is streamed in row chunks.
CHUNK_ELEMENTS = 1 << 22
#: Bytes copied at a time when quantized data passes through unchanged.
COPY_BYTES = 1 << 26


@dataclass
class ConvertResult:
    path: str
    format: str  # "gguf" or "rwkv.cpp"
    type: str  # the requested type, ggml's name ("Q5_1")
    file_size: int
    n_tensors: int
    tensor_types: dict = field(default_factory=dict)  # type name -> number of tensors

    def summary(self) -> str:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.tensor_types.items()))
        return (
            f"wrote {self.path} ({self.format}, {self.type}, {self.file_size:,} bytes, "
            f"{self.n_tensors} tensors: {types})"
        )


def _target(type) -> Any:
    from .quant import get_format

    name = str(type).strip().lower().replace("-", "_")
    if name not in TYPES:
        aliases = {
            "fp32": "f32",
            "float32": "f32",
            "fp16": "f16",
            "float16": "f16",
            "bfloat16": "bf16",
        }
        name = aliases.get(name, name)
    if name not in TYPES:
        raise ConversionError(f"unknown type {type!r}; expected one of {', '.join(TYPES)}")
    from .formats.kquant_mix import MIXES

    try:
        return get_format(MIXES[name][0] if name in MIXES else name)
    except QuantizationError as e:  # pragma: no cover - every name of TYPES exists
        raise ConversionError(str(e)) from None


def _output_format(dst) -> str:
    ext = os.path.splitext(os.fspath(dst))[1].lower()
    if ext not in OUTPUT_FORMATS:
        raise ConversionError(
            f"{os.fspath(dst)}: unknown output extension {ext or '(none)'!r}; "
            "expected .gguf (GGUF) or .bin (rwkv.cpp)"
        )
    return OUTPUT_FORMATS[ext]


def _check_paths(src, dst, force) -> None:
    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.isdir(dst):
        raise ConversionError(f"{dst}: is a directory, expected an output file name")
    if os.path.exists(dst):
        if os.path.exists(src) and os.path.samefile(src, dst):
            raise ConversionError(f"{dst}: is the source file itself; write to another file")
        if not force:
            raise OutputExistsError(
                f"{dst}: already exists; use force=True (--force) to overwrite it"
            )
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise ConversionError(f"{dst}: folder {folder} does not exist")


# -- producing tensor data ---------------------------------------------------------------------


def _encode(fmt_name: str, x) -> np.ndarray:
    """float32 array or tensor (..., K) -> the bytes of type fmt_name (1-D uint8)."""
    from .quant import get_format

    if isinstance(x, torch.Tensor):
        x = x.detach().to(torch.float32).contiguous().numpy()
    return get_format(fmt_name).quantize(np.ascontiguousarray(x, dtype=np.float32))


def _q_rows(q: QTensor, r0: int, r1: int) -> QTensor:
    row = q.shape[-1]
    from .quant import get_format

    row_bytes = get_format(q.fmt).nbytes((row,))
    return QTensor(q.fmt, (r1 - r0, row), np.asarray(q.data)[r0 * row_bytes : r1 * row_bytes])


def _chunks(e, tensors: dict, version, cfg):
    """The bytes of entry e, as an iterator of uint8 arrays (one tensor in memory at most)."""
    from .formats.plan import blinkdl_shape

    if e.reshape_only:
        src = tensors[e.inputs[0]]
        row = e.shape[-1] if e.shape else 1
        n = int(np.prod(e.shape)) if e.shape else 1
        if isinstance(src, QTensor):
            if src.fmt == e.type and src.shape[-1] == row:
                data = np.asarray(src.data)
                for a in range(0, data.size, COPY_BYTES):
                    yield data[a : a + COPY_BYTES]
                return
            if src.shape[-1] == row:
                rows = src.numel() // row
                step = max(1, CHUNK_ELEMENTS // row)
                flat = QTensor(src.fmt, (rows, row), src.data)
                for r in range(0, rows, step):
                    part = _q_rows(flat, r, min(rows, r + step)).dequantize()
                    yield _encode(e.type, part)
                return
            yield _encode(e.type, src.dequantize().reshape(e.shape))
            return
        flat = src.reshape(-1)
        step = max(1, CHUNK_ELEMENTS // row) * row
        for a in range(0, n, step):
            part = flat[a : min(n, a + step)].to(torch.float32)
            yield _encode(e.type, part.reshape(-1, row))
        return
    ins = []
    for name in e.inputs:
        t = to_float32(tensors[name])
        ins.append(t.reshape(blinkdl_shape(version, cfg, name, t.shape)))
    out = e.fn(ins)
    if tuple(out.shape) != tuple(e.shape):  # a bug, never user input
        raise AssertionError(f"{e.name}: produced shape {tuple(out.shape)}, planned {e.shape}")
    yield _encode(e.type, out.reshape(-1, e.shape[-1]) if e.shape else out.reshape(1))


# -- types -------------------------------------------------------------------------------------


def _decide_types(entries, target, quantize_head) -> None:
    from .formats.plan import storage_type
    from .quant import get_format

    for e in entries:
        t = storage_type(e.policy, e.policy_shape, target, quantize_head)
        if get_format(t).quantized and (len(e.shape) != 2 or e.shape[-1] % target.block_size):
            # its layout in this file does not fit blocks: the float type it would have had
            t = storage_type(e.policy, e.policy_shape, get_format("F16"), quantize_head)
        e.type = t


def _kquant_types(entries, mix: str) -> None:
    """llama-quantize's types for a K-quant ``--type`` (formats.kquant_mix); the tensors it
    leaves alone keep the float type rwkvpy's policy gives them."""
    from .formats import kquant_mix
    from .formats.plan import storage_type
    from .quant import get_format

    for e in entries:
        t = kquant_mix.tensor_type(mix, e.name, e.shape)
        if t is None and get_format(e.type).quantized:
            t = storage_type(e.policy, e.policy_shape, get_format("F16"), False)
        e.type = t or e.type


def _raw_bin_types(entries, src_types, target, quantize_head) -> None:
    """rwkv.cpp's quantizer (rwkv_quantize_model_file) for a .bin -> .bin conversion."""
    from .formats.plan import needs_quant, storage_type

    for e in entries:
        st = src_types[e.name]
        if not target.quantized:
            e.type = storage_type(e.name, e.shape, target, quantize_head)
        elif (
            len(e.shape) == 2
            and needs_quant(e.name, quantize_head)
            and e.shape[-1] % target.block_size == 0
        ):
            e.type = target.name
        else:
            e.type = st if st in ("F32", "F16") else "F16"


# -- writers -----------------------------------------------------------------------------------


def _write_bin(path, header: dict, entries, chunks, on_bytes) -> None:
    from .formats.atomic import atomic_write
    from .formats.rwkvcpp import MAGIC, TYPE_IDS

    with atomic_write(path) as f:
        f.write(
            struct.pack(
                "<6i",
                MAGIC,
                101,
                header["n_vocab"],
                header["n_embed"],
                header["n_layer"],
                TYPE_IDS[header["data_type"]],
            )
        )
        for e, parts in zip(entries, chunks):
            key = e.name.encode("utf-8")
            f.write(
                struct.pack(
                    f"<3i{len(e.shape)}i",
                    len(e.shape),
                    len(key),
                    TYPE_IDS[e.type],
                    *reversed(e.shape),
                )
            )
            f.write(key)
            for part in parts:
                f.write(np.ascontiguousarray(part).data.cast("B"))
                on_bytes(part.nbytes)


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False)


def _vocab(ckpt, src_fmt, src, vocab_size, tokenizer, tokens, vocab_file):
    """The vocabulary a GGUF output gets (formats.gguf.vocab_for_file): ``tokens`` or
    ``vocab_file`` when given, else the source's (a GGUF's keys, a Hugging Face folder's file),
    else the one rwkvpy ships for the kind (``tokenizer``, the source's, or from the size)."""
    from .formats import gguf

    source = gguf.read_vocab(src) if src_fmt == "gguf" else None
    kind = (
        tokenizer
        or ckpt.meta.get("tokenizer")
        or (
            source.kind or {"rwkv": "world", "gpt2": "neox"}.get(source.model)
            if source is not None
            else None
        )
        or gguf.guess_tokenizer(vocab_size)
    )
    if kind is not None and kind not in gguf.TOKENIZERS:
        raise ConversionError(
            f"unknown tokenizer {kind!r}; expected one of {', '.join(gguf.TOKENIZERS)}"
        )
    if tokens is not None and kind != "world":
        raise ConversionError(f"tokens= gives a World vocabulary; the tokenizer is {kind}")
    if vocab_file is None and tokens is None and source is None:
        vocab_file = ckpt.meta.get("vocab_file")  # a Hugging Face folder's own file
    if source is not None and source.kind is not None and source.kind != kind:
        source = None  # the source's vocabulary is of another kind
    return gguf.vocab_for_file(
        kind, vocab_size, tokens=tokens, vocab_file=vocab_file, source=source
    )


# -- the API -----------------------------------------------------------------------------------


def convert(
    src,
    dst,
    type="f16",
    quantize_head=False,
    force=False,
    progress=True,
    *,
    tokenizer: str | None = None,
    tokens=None,
    vocab=None,
) -> ConvertResult:
    """Convert model ``src`` (any supported format) to ``dst`` (``.gguf`` or ``.bin``).

    Args:
        type: ``f32``, ``f16``, ``bf16`` (GGUF only), ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``,
            ``q8_0``: the type of the model's matrices (see the module docstring); GGUF only:
            ``q4_k``, ``q5_k``, ``q6_k``, ``q4_k_m``, ``q5_k_m``, the K-quants with
            llama-quantize's choice of tensors (:mod:`rwkvpy.formats.kquant_mix`;
            ``quantize_head`` does not apply: llama-quantize quantizes the head).
        quantize_head: quantize ``head.weight`` too (rwkv.cpp and llama.cpp keep it F16).
        force: overwrite ``dst`` if it exists (else :class:`OutputExistsError`).
        progress: show a progress bar on stderr (when tqdm is installed).
        tokenizer: ``"world"``, ``"neox"`` or ``"bytes"``, stored in a GGUF's metadata; by
            default taken from the source or guessed from the vocabulary size.
        tokens: the vocabulary (bytes per token id) to store in a GGUF (world tokenizer).
        vocab: a vocabulary file to store in a GGUF (``rwkv_vocab_v20230424.txt`` format or a
            ``tokenizer.json``). Without ``tokens`` or ``vocab``: the source's vocabulary when
            it holds one (a GGUF, a Hugging Face folder), else the one rwkvpy ships for the
            tokenizer (see :mod:`rwkvpy.formats.gguf`).

    Raises:
        ConversionError, OutputExistsError, and the readers' ModelFileError subclasses.
    """
    from . import formats
    from .config import config_from_shapes, detect_version
    from .formats import gguf, plan, rwkvcpp
    from .hub import resolve_model

    target = _target(type)
    kmix = str(type).strip().lower().replace("-", "_")
    kmix = kmix if kmix in TYPES and target.block_size == 256 else None  # K-quants: GGUF only
    out_fmt = _output_format(dst)
    if kmix and out_fmt == "rwkv.cpp":
        raise ConversionError(
            f"{dst}: rwkv.cpp .bin files cannot hold K-quants ({type}); write a .gguf"
        )
    src, dst = resolve_model(src), os.fspath(dst)
    _check_paths(src, dst, force)
    src_fmt = formats.sniff(src)
    if out_fmt == "rwkv.cpp" and target.name == "BF16":
        raise ConversionError(
            f"{dst}: rwkv.cpp .bin files cannot hold BF16; use f16 or f32, or write a .gguf"
        )

    if out_fmt == "rwkv.cpp" and src_fmt == "rwkv.cpp":
        header, tensors, src_types = rwkvcpp.read_raw(src)
        entries = [
            plan.Entry(n, (n,), None, shape=tuple(t.shape), policy=n, policy_shape=tuple(t.shape))
            for n, t in tensors.items()
        ]
        _raw_bin_types(entries, src_types, target, quantize_head)
        header = dict(header, data_type=target.name)
        version = cfg = None
    else:
        ckpt = formats.read(src)
        tensors = ckpt.tensors
        shapes = ckpt.shapes
        version = detect_version(shapes, src)
        cfg = config_from_shapes(shapes, src, version=version)
        names = list(tensors)
        rc = plan.rwkvcpp_entries(names, shapes, version, cfg)
        if out_fmt == "rwkv.cpp":
            entries = rc
            header = dict(
                n_vocab=cfg.vocab_size,
                n_embed=cfg.n_embd,
                n_layer=cfg.n_layer,
                data_type=target.name,
            )
        else:
            policy = {n: (e.name, e.shape) for e in rc for n in e.inputs}
            entries, unknown = gguf.gguf_entries(names, shapes, version, cfg)
            if unknown:
                warnings.warn(
                    f"{src}: {len(unknown)} tensors that are not part of an RWKV "
                    f"{version.label} model are left out (e.g. {unknown[0]!r})",
                    stacklevel=2,
                )
            for e in entries:
                e.policy, e.policy_shape = policy[e.inputs[0]]
        _decide_types(entries, target, quantize_head)
        if kmix:
            _kquant_types(entries, kmix)

    from .quant import get_format

    if out_fmt == "gguf":
        gvocab = _vocab(ckpt, src_fmt, src, cfg.vocab_size, tokenizer, tokens, vocab)
    total = sum(get_format(e.type).nbytes(e.shape) for e in entries)
    bar = _progress_bar(total, os.path.basename(dst), progress)
    on_bytes = bar.update if bar is not None else (lambda n: None)
    chunks = (_chunks(e, tensors, version, cfg) for e in entries)
    try:
        if out_fmt == "rwkv.cpp":
            _write_bin(dst, header, entries, chunks, on_bytes)
        else:
            name = os.path.splitext(os.path.basename(src.rstrip(os.sep)))[0]
            gguf.write(
                dst,
                version,
                cfg,
                entries,
                chunks,
                shapes=shapes,
                file_type=kmix.upper() if kmix else target.name,
                vocab=gvocab,
                name=name,
                on_bytes=on_bytes,
            )
    finally:
        if bar is not None:
            bar.close()
    counts: dict = {}
    for e in entries:
        counts[e.type] = counts.get(e.type, 0) + 1
    return ConvertResult(
        path=dst,
        format="gguf" if out_fmt == "gguf" else "rwkv.cpp",
        type=kmix.upper() if kmix else target.name,
        file_size=os.path.getsize(dst),
        n_tensors=len(entries),
        tensor_types=counts,
    )


def quantize(src, dst, type, **kwargs) -> ConvertResult:
    """Short form of :func:`convert` for a quantized type."""
    return convert(src, dst, type=type, **kwargs)
