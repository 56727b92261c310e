"""Assembles the fast paths into a :class:`~rwkvpy.models.base.Backend` for a mode.

Modes:
- ``"reference"``: the float32 model code as written in models/ (the oracle of every test).
- ``"exact"``: the same numbers up to float32 rounding (summation order, the last bit of an
  exp): weights exactly as stored (dequantized exactly), float32 activations, compiled
  recurrences for sequences, fused glue for single tokens.
- ``"fast"`` (default): like exact, but uses a lossy kernel where it is much faster, each one
  chosen by measurement and documented in kernels/linear.py (e.g. int8 activations and integer
  dot products for Q4_0..Q5_1 on AVX2 CPUs).

On a GPU the same modes pick the weights' types there (see kernels/gpu.py): "fast" keeps F16 and
BF16 as stored and expands block-quantized types to float16; "exact" holds every weight in float32.
"""

from __future__ import annotations

from ..errors import RwkvpyError
from ..models.base import REFERENCE, Backend

MODES = ("fast", "exact", "reference")


def make_backend(mode: str, cache=None) -> Backend:
    """The backend of ``mode``; ``cache``: a kernels.cache.RepackCache for the CPU's repacked
    weights (or None)."""
    if mode not in MODES:
        raise RwkvpyError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "reference":
        return REFERENCE
    from .gpu import DeviceLinear
    from .linear import make_linear
    from .wkv import wkv4_serial, wkv5_serial, wkv7_serial

    def linear(w, device, name=None):
        if device.type != "cpu":
            return DeviceLinear(w, device, mode)
        if cache is None or name is None:
            return make_linear(w, policy=mode)
        cached = cache.get(name)
        lin = make_linear(w, policy=mode, repacked=cached)
        if hasattr(lin, "repacked"):  # a repacking kernel was chosen
            if cached is None:
                cache.put(name, lin.repacked())
            else:
                cache.used()
        return lin

    return Backend(name=mode, make_linear=linear, wkv4=wkv4_serial, wkv5=wkv5_serial,
                   wkv7=wkv7_serial)
