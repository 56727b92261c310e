"""Model files in, canonical checkpoints out. :func:`read` tells the format from the content:
rwkv.cpp ``.bin``, BlinkDL ``.pth``, GGUF, ``.safetensors`` and Hugging Face model folders."""

from __future__ import annotations

import os

from ..errors import ModelFileError, UnknownFormatError
from .atomic import require_regular
from .base import Checkpoint, QTensor, to_float32, type_name


def sniff(path) -> str:
    """Name the format of a file (or Hugging Face folder) from its content."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "config.json")):
            return "hf"
        raise ModelFileError(
            path,
            "is a directory without config.json, expected a model file "
            "or a Hugging Face model folder",
        )
    if not os.path.exists(path):
        raise ModelFileError(path, "no such file")
    require_regular(path)  # a FIFO would block the open, a device never end
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"fmgg":  # 0x67676d66 little-endian
        return "rwkv.cpp"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "pth"
    if head[:4] == b"GGUF":
        return "gguf"
    if (
        len(head) == 9
        and head[8:9] == b"{"
        and int.from_bytes(head[:8], "little") < os.path.getsize(path)
    ):
        return "safetensors"
    raise UnknownFormatError(
        path,
        f"starts with bytes {head[:4].hex(' ')}, which match no "
        "supported format: expected rwkv.cpp .bin (66 6d 67 67), "
        "PyTorch .pth (50 4b 03 04), GGUF (47 47 55 46) or safetensors",
    )


def read(path) -> Checkpoint:
    fmt = sniff(path)
    if fmt == "rwkv.cpp":
        from . import rwkvcpp

        return rwkvcpp.read(path)
    if fmt == "gguf":
        from . import gguf

        return gguf.read(path)
    if fmt == "safetensors":
        from . import safetensors_io

        return safetensors_io.read_safetensors(path)
    if fmt == "hf":
        from . import safetensors_io

        return safetensors_io.read_hf(path)
    from . import pth

    return pth.read(path)


__all__ = ["Checkpoint", "QTensor", "read", "sniff", "to_float32", "type_name"]
