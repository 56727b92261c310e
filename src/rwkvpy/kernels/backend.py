"""Assembles the fast paths into a :class:`~rwkvpy.models.base.Backend` for a mode.

Modes:
- ``"reference"``: the float32 model code as written in models/ (the oracle of every test).
- ``"exact"``: the same numbers up to float32 rounding (summation order, the last bit of an
  exp): weights exactly as stored (dequantized exactly), float32 activations, compiled
  recurrences for sequences, fused glue for single tokens.
- ``"fast"`` (default): like exact, but block formats (Q4_0..Q8_0) multiply their weights by
  activations rounded to integers (int8, int16 for Q8_0) where the CPU level allows it
  (kernels/cpu.py), as ggml does; F32/F16/BF16 weights are multiplied exactly on every CPU.

On a GPU the same modes pick the weights' types there (see kernels/gpu.py): "fast" keeps F16 and
BF16 as stored and expands block-quantized types to float16; "exact" holds every weight in float32.
"""

from __future__ import annotations

from ..errors import RwkvpyError
from ..models.base import REFERENCE, Backend
from .cpu import CpuKernels

MODES = ("fast", "exact", "reference")


def make_backend(mode: str, cache=None, cpu: CpuKernels | None = None) -> Backend:
    """The backend of ``mode``; ``cache``: a kernels.cache.RepackCache for the CPU's repacked
    weights (or None); ``cpu``: the CPU kernels to use (kernels.cpu; None: the host's)."""
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
            return make_linear(w, policy=mode, cpu=cpu)
        cached = cache.get(name)
        lin = make_linear(w, policy=mode, repacked=cached, cpu=cpu)
        if hasattr(lin, "repacked"):  # a repacking kernel was chosen
            if cached is None:
                cache.put(name, lin.repacked())
            else:
                cache.used()
        return lin

    return Backend(
        name=mode, make_linear=linear, wkv4=wkv4_serial, wkv5=wkv5_serial, wkv7=wkv7_serial
    )
