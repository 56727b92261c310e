"""ggml weight formats, bit-exact with ggml: one :class:`WeightFormat` per tensor data type.

Example::

    from rwkvpy.quant import get_format, quantize, dequantize
    fmt = get_format("q5_1")                     # FORMATS["Q5_1"]
    raw = quantize("Q5_1", weights)              # ggml's bytes, 1-D uint8
    w = dequantize("Q5_1", raw, weights.shape)   # float32, same shape

Shapes are in PyTorch order (the last dimension is the row, ggml's ``ne[0]``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from ..errors import QuantizationError
from .base import WeightFormat
from .float import BF16, F16, F32
from .q2_k import Q2_K
from .q3_k import Q3_K
from .q4_0 import Q4_0
from .q4_1 import Q4_1
from .q4_k import Q4_K
from .q5_0 import Q5_0
from .q5_1 import Q5_1
from .q5_k import Q5_K
from .q6_k import Q6_K
from .q8_0 import Q8_0

#: Every supported format by ggml name.
FORMATS: dict[str, WeightFormat] = {
    f.name: f for f in (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)
}

#: Every supported format by ggml type number (``enum ggml_type``, GGUF's tensor type).
FORMATS_BY_GGML_TYPE: dict[int, WeightFormat] = {f.ggml_type: f for f in FORMATS.values()}

_ALIASES = {
    "FP32": "F32",
    "FLOAT32": "F32",
    "FLOAT": "F32",
    "FP16": "F16",
    "FLOAT16": "F16",
    "HALF": "F16",
    "BFLOAT16": "BF16",
}


def get_format(name: str | int | WeightFormat) -> WeightFormat:
    """The format called ``name``: case-insensitive, ``-`` or ``_`` (``"q5_1"``, ``"Q5-1"``),
    with the aliases ``fp32``/``float32``, ``fp16``/``float16``/``half``, ``bfloat16``; an
    ``int`` is taken as a ggml type number, and a :class:`WeightFormat` is returned as is.

    Raises:
        QuantizationError: for a name or number no supported format has.
    """
    if isinstance(name, WeightFormat):
        return name
    if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
        fmt = FORMATS_BY_GGML_TYPE.get(int(name))
        if fmt is None:
            known = ", ".join(f"{f.name}={t}" for t, f in FORMATS_BY_GGML_TYPE.items())
            raise QuantizationError(f"unsupported ggml type {int(name)}; supported types: {known}")
        return fmt
    if isinstance(name, str):
        key = name.strip().upper().replace("-", "_")
        key = _ALIASES.get(key, key)
        fmt = FORMATS.get(key)
        if fmt is not None:
            return fmt
    raise QuantizationError(f"unknown weight format {name!r}; known formats: {', '.join(FORMATS)}")


def dequantize(name: str | int | WeightFormat, data: Any, shape: Iterable[int]) -> np.ndarray:
    """Decode a tensor's bytes in format ``name`` into a new float32 array of ``shape``."""
    return get_format(name).dequantize(data, shape)


def quantize(name: str | int | WeightFormat, array: Any) -> np.ndarray:
    """Encode a float array (shape ``(..., K)``) in format ``name``: ggml's bytes, 1-D uint8."""
    return get_format(name).quantize(array)


__all__ = [
    "FORMATS",
    "FORMATS_BY_GGML_TYPE",
    "WeightFormat",
    "dequantize",
    "get_format",
    "quantize",
    "BF16",
    "F16",
    "F32",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q8_0",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
]
