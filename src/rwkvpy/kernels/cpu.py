"""Which CPU kernels run: the capability level, detected or forced, and what each level allows.

Levels, like torch's ``ATEN_CPU_CAPABILITY``, from the plainest up:

=============  ============================================================================
level          kernels (mode ``"fast"``; mode ``"exact"`` is the same at every level)
=============  ============================================================================
generic        portable numba vector code only: every format multiplied exactly (float32
               activations), block formats included. Any CPU numba compiles for (ARM too).
avx2           + the x86 integer products for block formats (Q4_0..Q5_1: int8 activations,
               Q8_0: int16 activations), written with AVX2 instructions.
avx512         the avx2 kernels. They are explicit LLVM vector code with a fixed operation
               order, compiled for the host: an AVX-512 CPU runs them with the same numbers.
avx512_bf16    the avx512 kernels. No product uses native bf16: torch's CPU bf16 products
amx            return bf16 outputs (8 significant bits), which breaks the accuracy contract
               (docs/accuracy.md), so F16/BF16 weights are multiplied exactly at every level.
=============  ============================================================================

So the numbers of a level depend only on which of the two kernel families it selects, and a
level above the host's is emulated exactly by running that family here; a level whose family
cannot run here (avx2 and up on a CPU without AVX2, e.g. ARM) is refused with a clear error.

The level is chosen once per :func:`rwkvpy.load`: the ``cpu_capability`` argument, else the
environment variable ``RWKVPY_CPU_CAPABILITY`` (read at load, not at import), else the host's.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from ..errors import CpuCapabilityError

LEVELS = ("generic", "avx2", "avx512", "avx512_bf16", "amx")
#: The environment variable that forces a level (read by :func:`resolve`, at each load).
ENV = "RWKVPY_CPU_CAPABILITY"
#: The lowest level whose fast path uses the x86 integer products.
_INT8_LEVEL = LEVELS.index("avx2")


@functools.cache
def _host_features() -> frozenset:
    """The host CPU's features as LLVM names them ('avx2', 'avx512f', 'avx512bf16',
    'amx-tile', ...), the ones numba compiles for; empty without numba."""
    try:
        import llvmlite.binding as llvm
        from numba.core import config
    except ImportError:  # pragma: no cover - numba is optional
        return frozenset()
    if config.CPU_NAME not in (None, "host"):  # numba compiles for another CPU: assume nothing
        return frozenset()
    return frozenset(k for k, on in llvm.get_host_cpu_features().items() if on)


def host_level() -> str:
    """The highest level this CPU offers natively."""
    f = _host_features()
    if "amx-tile" in f and "amx-bf16" in f:
        return "amx"
    if "avx512bf16" in f:
        return "avx512_bf16"
    if "avx512f" in f and "avx512bw" in f:
        return "avx512"
    if "avx2" in f and "fma" in f:
        return "avx2"
    return "generic"


def integer_kernels_run() -> bool:
    """Whether the x86 integer products (AVX2 code) run on this CPU."""
    return {"avx2", "fma"} <= _host_features()


@dataclass(frozen=True)
class CpuKernels:
    """The CPU kernels chosen for one model: ``level`` (one of :data:`LEVELS`), ``host`` (the
    CPU's own level), ``forced`` (the level was asked for, not detected), and what the level
    selects: ``int8_dot`` (the x86 integer products for block formats in mode "fast")."""

    level: str
    host: str
    forced: bool

    @property
    def int8_dot(self) -> bool:
        return LEVELS.index(self.level) >= _INT8_LEVEL

    @property
    def emulated(self) -> bool:
        """The level is above the host's (its kernels run here with the same numbers)."""
        return LEVELS.index(self.level) > LEVELS.index(self.host)

    def to_dict(self) -> dict:
        return {
            "level": self.level,
            "host": self.host,
            "forced": self.forced,
            "emulated": self.emulated,
        }


def resolve(requested: str | None = None) -> CpuKernels:
    """The kernels for ``requested`` (a level name, case-insensitive), else for the level named
    by ``$RWKVPY_CPU_CAPABILITY``, else for the host's level."""
    source = "cpu_capability"
    if requested is None:
        requested = os.environ.get(ENV) or None
        source = ENV
    host = host_level()
    if requested is None:
        return host_kernels()
    if not isinstance(requested, str) or requested.strip().lower() not in LEVELS:
        raise CpuCapabilityError(f"{source}={requested!r} is not one of {', '.join(LEVELS)}")
    level = requested.strip().lower()
    if LEVELS.index(level) >= _INT8_LEVEL and not integer_kernels_run():
        raise CpuCapabilityError(
            f"{source}={level!r}: its integer kernels are AVX2 code, and this CPU (level "
            f"{host}) has no AVX2; use 'generic' (exact products on any CPU)"
        )
    return CpuKernels(level=level, host=host, forced=True)


def host_kernels() -> CpuKernels:
    """The kernels of the host's own level (detected, not forced)."""
    host = host_level()
    return CpuKernels(level=host, host=host, forced=False)
