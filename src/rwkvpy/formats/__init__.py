"""Model files in, canonical checkpoints out. :func:`read` tells the format from the content."""

from __future__ import annotations

import os

from ..errors import ModelFileError, UnknownFormatError
from .base import Checkpoint, QTensor, to_float32, type_name


def sniff(path) -> str:
    """Name the format of a file from its first bytes."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ModelFileError(path, "is a directory, expected a model file")
    if not os.path.exists(path):
        raise ModelFileError(path, "no such file")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"fmgg":  # 0x67676d66 little-endian
        return "rwkv.cpp"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "pth"
    if head[:4] == b"GGUF":
        raise UnknownFormatError(path, "GGUF files are not supported yet; expected an rwkv.cpp "
                                 ".bin or a BlinkDL .pth")
    raise UnknownFormatError(path, f"starts with bytes {head[:4].hex(' ')}, which match no "
                             "supported format: expected rwkv.cpp .bin (66 6d 67 67) or "
                             "PyTorch .pth (50 4b 03 04)")


def read(path) -> Checkpoint:
    fmt = sniff(path)
    if fmt == "rwkv.cpp":
        from . import rwkvcpp
        return rwkvcpp.read(path)
    from . import pth
    return pth.read(path)


__all__ = ["Checkpoint", "QTensor", "read", "sniff", "to_float32", "type_name"]
