"""BlinkDL's PyTorch checkpoints (``.pth``): a plain dict of tensor name -> tensor.

Loaded with ``torch.load(weights_only=True, mmap=True)``: a model file is data and can never
run code, and tensors stay in the file's pages until used.
"""

from __future__ import annotations

import os
import pickle

import torch

from ..errors import NotAStateDictError, TruncatedFileError
from .base import Checkpoint, type_name


def read(path) -> Checkpoint:
    path = os.fspath(path)
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "zip" not in str(e).lower() and "mmap" not in str(e).lower():
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy, non-zip file
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NotAStateDictError(path, "not a plain state dict of tensors: loading it would run "
                                 f"code or build objects ({first[:200]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TruncatedFileError(path, f"cannot read the PyTorch archive (truncated or corrupt?): "
                                 f"{msg[:200]}") from None
    if not isinstance(obj, dict):
        raise NotAStateDictError(path, f"holds a {type(obj).__name__}, expected a dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        k = bad[0]
        raise NotAStateDictError(path, f"entry {k!r} is a {type(obj[k]).__name__}, "
                                 "expected only name -> tensor entries")
    tensors = {k: v for k, v in obj.items()}
    for k, v in tensors.items():
        if not v.is_floating_point():
            raise NotAStateDictError(path, f"tensor '{k}' has dtype {v.dtype}, expected float32, "
                                     "float16 or bfloat16")
    return Checkpoint(path=path, format="pth", tensors=tensors,
                      file_types={k: type_name(v) for k, v in tensors.items()},
                      file_size=os.path.getsize(path))
