"""rwkv.cpp's ``.bin`` format (docs/FILE_FORMAT.md of rwkv.cpp), read through a memory map.

Layout: a header of six little-endian int32 (magic 0x67676d66, file version 100 or 101,
n_vocab, n_embed, n_layer, data type), then tensors until the end of the file, each
(dim_count, key_length, data_type, dims in ggml order = reversed PyTorch order, UTF-8 key,
data). File version 101 holds ggml's current block layouts; quantized data in version 100
files uses layouts ggml dropped, which rwkv.cpp itself refuses too.

rwkv.cpp's converter transforms some parameters; :func:`to_canonical` undoes each of them.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np
import torch

from ..config import Version, detect_version
from ..errors import (
    TensorShapeError,
    TruncatedFileError,
    UnknownFormatError,
    UnsupportedTensorTypeError,
    UnsupportedVersionError,
)
from .base import Checkpoint, QTensor, to_float32

MAGIC = 0x67676D66
VERSIONS = (100, 101)
# rwkv.cpp's data type ids -> ggml type names (4, 5, 6 were Q4_1_O, Q4_2, Q4_3: removed).
TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q5_0", 8: "Q5_1", 9: "Q8_0"}
TYPE_IDS = {v: k for k, v in TYPES.items()}
REMOVED = {4: "Q4_1_O", 5: "Q4_2", 6: "Q4_3"}
FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16}


def _type_name(path, type_id, where):
    if type_id in TYPES:
        return TYPES[type_id]
    if type_id in REMOVED:
        raise UnsupportedTensorTypeError(
            path,
            f"{where} has data type {type_id} ({REMOVED[type_id]}), a format ggml removed; "
            "requantize the model to Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0",
        )
    raise UnsupportedTensorTypeError(
        path,
        f"{where} has unknown data type {type_id}; expected one of "
        + ", ".join(f"{k} ({v})" for k, v in TYPES.items()),
    )


def read_raw(path) -> tuple[dict, dict, dict]:
    """Parse the file: returns (header, tensors in rwkv.cpp's naming, file types)."""
    from ..quant import get_format

    path = os.fspath(path)
    size = os.path.getsize(path)
    if size < 24:
        raise TruncatedFileError(
            path, f"file is {size} bytes, shorter than the 24-byte rwkv.cpp header"
        )
    buf = np.memmap(path, dtype=np.uint8, mode="c")
    magic, version, n_vocab, n_embed, n_layer, data_type = struct.unpack_from("<6i", buf.data, 0)
    if magic != MAGIC:
        raise UnknownFormatError(
            path, f"magic 0x{magic & 0xFFFFFFFF:08x} is not rwkv.cpp's 0x{MAGIC:08x}"
        )
    if version not in VERSIONS:
        raise UnsupportedVersionError(path, f"rwkv.cpp file version {version}, expected 100 or 101")
    model_type = _type_name(path, data_type, "the header")
    header = dict(
        file_version=version,
        n_vocab=n_vocab,
        n_embed=n_embed,
        n_layer=n_layer,
        data_type=model_type,
    )

    tensors: dict[str, Any] = {}
    types: dict[str, str] = {}
    off = 24
    while off < size:
        if size - off < 12:
            raise TruncatedFileError(
                path,
                f"{size - off} stray bytes at offset {off}, shorter than a 12-byte tensor header",
            )
        n_dims, key_len, type_id = struct.unpack_from("<3i", buf.data, off)
        where = f"tensor #{len(tensors)} at offset {off}"
        if not 1 <= n_dims <= 3:
            raise UnsupportedTensorTypeError(
                path, f"{where} has {n_dims} dimensions, expected 1 to 3"
            )
        if not 0 < key_len <= 1024:
            raise TruncatedFileError(
                path,
                f"{where} has a name length of {key_len} bytes, expected 1 to 1024 (corrupt file?)",
            )
        head_end = off + 12 + 4 * n_dims + key_len
        if head_end > size:
            raise TruncatedFileError(path, f"{where}: file ends inside the tensor header")
        dims = struct.unpack_from(f"<{n_dims}i", buf.data, off + 12)
        try:
            name = bytes(buf[off + 12 + 4 * n_dims : head_end]).decode("utf-8")
        except UnicodeDecodeError:
            raise UnknownFormatError(
                path, f"{where} has a name that is not UTF-8 (corrupt file?)"
            ) from None
        where = f"tensor '{name}'"
        if name in tensors:  # which copy a reader takes is undefined: refuse both
            raise UnknownFormatError(
                path, f"{where} at offset {off} appears twice in the file (corrupt file?)"
            )
        fmt = _type_name(path, type_id, where)
        if fmt not in FLOAT_DTYPES and version == 100:
            raise UnsupportedVersionError(
                path,
                f"{where} is {fmt} in a file version 100: quantized data of that version "
                "uses block layouts ggml dropped; requantize it from an FP16 or FP32 file",
            )
        shape = tuple(reversed(dims))  # ggml lists dimensions innermost first
        if any(d <= 0 for d in shape):
            raise UnknownFormatError(path, f"{where} has shape {shape} (corrupt file?)")
        nbytes = get_format(fmt).nbytes(shape)
        end = head_end + nbytes
        if end > size:
            raise TruncatedFileError(
                path,
                f"{where} ({fmt}, shape {shape}) needs {nbytes} bytes "
                f"at offset {head_end}, the file has {size - head_end} left",
            )
        raw = buf[head_end:end]
        if fmt in FLOAT_DTYPES:
            tensors[name] = torch.from_numpy(raw.view(FLOAT_DTYPES[fmt])).view(shape)
        else:
            tensors[name] = QTensor(fmt, shape, raw)
        types[name] = fmt
        off = end
    return header, tensors, types


def _t(x):
    return to_float32(x)


def to_canonical(tensors: dict, types: dict, path) -> tuple[dict, dict]:
    """Undo rwkv.cpp's converter (python/convert_pytorch_to_ggml.py) tensor by tensor."""
    version = detect_version({k: v.shape for k, v in tensors.items()}, path)
    out, out_types = {}, {}
    for name, t in tensors.items():
        typ = types[name]
        parts = name.split(".")
        leaf = parts[-1] if len(parts) < 3 else ".".join(parts[2:])  # e.g. "att.time_decay"
        if version is Version.V7 and leaf == "att.x_rwkvag":
            t = _t(t).reshape(6, -1)
            for j, n in enumerate("rwkvag"):
                out[f"{'.'.join(parts[:2])}.att.x_{n}"] = t[j]
                out_types[f"{'.'.join(parts[:2])}.att.x_{n}"] = typ
            continue
        if version is Version.V7 and leaf in (
            "att.w1",
            "att.w2",
            "att.a1",
            "att.a2",
            "att.v1",
            "att.v2",
            "att.g1",
            "att.g2",
        ):
            t = (_t(t) if isinstance(t, QTensor) else t).t()  # a view, in the file's dtype
        elif version is Version.V6:
            if leaf in ("att.time_maa_w1", "att.time_decay_w1", "att.time_decay_w2"):
                t = (_t(t) if isinstance(t, QTensor) else t).t()  # views, in the file's dtype
            elif leaf == "att.time_maa_w2":
                t = (_t(t) if isinstance(t, QTensor) else t).transpose(1, 2)
            elif leaf == "att.time_decay":
                t = _t(t).reshape(-1)
        elif version in (Version.V5_0, Version.V5_2):
            if leaf == "att.time_decay":  # stored exp(-exp(w)): w = log(-log(stored))
                t = torch.log(-torch.log(_t(t).double())).float()
            elif leaf == "att.time_first":  # stored exp(u)
                t = torch.log(_t(t).double()).float()
        elif version is Version.V4 and leaf == "att.time_decay":  # stored -exp(w)
            t = torch.log(-_t(t).double()).float()
        out[name] = t
        out_types[name] = typ
    return out, out_types


def read(path) -> Checkpoint:
    header, tensors, types = read_raw(path)
    tensors, types = to_canonical(tensors, types, path)
    version = detect_version({k: v.shape for k, v in tensors.items()}, path)
    emb = tuple(tensors["emb.weight"].shape)
    n_layer = len({k.split(".")[1] for k in tensors if k.startswith("blocks.")})
    found = {"n_vocab": emb[0], "n_embed": emb[-1], "n_layer": n_layer}
    for field_, value in found.items():
        if header[field_] != value:
            raise TensorShapeError(
                path,
                f"header field {field_} = {header[field_]}, but the "
                f"tensors hold {value} (corrupt file?)",
            )
    return Checkpoint(
        path=os.fspath(path),
        format="rwkv.cpp",
        tensors=tensors,
        file_types=types,
        file_size=os.path.getsize(path),
        meta=header,
        # rwkv.cpp normalizes v5 heads with eps 1e-5 (64e-5 for v6 and v7, as BlinkDL does).
        ln_x_eps=1e-5 if version in (Version.V5_0, Version.V5_2) else None,
    )


def write_raw(path, header: dict, entries) -> None:
    """Write an rwkv.cpp file, atomically (temp file, then rename).

    header: n_vocab, n_embed, n_layer, data_type (type name) and optionally file_version;
    entries: iterable of (name, type name, PyTorch-order shape, raw little-endian bytes).
    """
    from .atomic import atomic_write

    with atomic_write(path) as f:
        f.write(
            struct.pack(
                "<6i",
                MAGIC,
                header.get("file_version", 101),
                header["n_vocab"],
                header["n_embed"],
                header["n_layer"],
                TYPE_IDS[header["data_type"]],
            )
        )
        for name, fmt, shape, data in entries:
            key = name.encode("utf-8")
            f.write(
                struct.pack(
                    f"<3i{len(shape)}i", len(shape), len(key), TYPE_IDS[fmt], *reversed(shape)
                )
            )
            f.write(key)
            f.write(bytes(data))
