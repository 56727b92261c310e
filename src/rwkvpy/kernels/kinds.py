"""The weight formats of the CPU product kernels, as one enum.

:class:`Kind` is the number a numba driver receives for a weight's format (one compiled driver
serves every format: its ``kind`` argument selects the branch), and it answers what the
kernels need to know of a format's blocks. Those facts are read from the format classes of
:mod:`rwkvpy.quant` (bytes and elements per block, the fields of ggml's block struct), so that
no kernel repeats them as literals. The K-quants (256-element blocks) have kernels of their own
(kernels/ir/kquants.py).
"""

from __future__ import annotations

import enum

from ..quant import get_format

#: Values per chunk of a row kernel: one block of the 32-element formats, 32 float values.
CHUNK = 32


class Kind(enum.IntEnum):
    """A weight format of the row and interleaved-group kernels (the value: numba's ``kind``)."""

    Q4_0 = 0
    Q4_1 = 1
    Q5_0 = 2
    Q5_1 = 3
    Q8_0 = 4
    F16 = 5
    BF16 = 6
    F32 = 7

    @property
    def format(self):
        """The format class of :mod:`rwkvpy.quant` (a WeightFormat)."""
        return get_format(self.name)

    @property
    def quantized(self) -> bool:
        return self.format.quantized

    @property
    def chunk_bytes(self) -> int:
        """Bytes of :data:`CHUNK` values: one ggml block of the block formats."""
        f = self.format
        return f.type_size * CHUNK // f.block_size

    @property
    def has_min(self) -> bool:
        """The block holds a minimum ``m`` (w = q * d + m): Q4_1, Q5_1."""
        return self.quantized and "m" in self.format.block_dtype.names

    @property
    def has_high_bits(self) -> bool:
        """The block holds a fifth bit of each code in ``qh``: Q5_0, Q5_1."""
        return self.quantized and "qh" in self.format.block_dtype.names

    @property
    def signed(self) -> bool:
        """The codes are signed bytes: Q8_0."""
        return self.quantized and self.format.block_dtype["qs"].base.kind == "i"

    @property
    def code_offset(self) -> int:
        """What ggml subtracts from the unsigned codes of a format without a minimum, half
        their range (Q4_0: 8, Q5_0: 16); 0 for the others."""
        if not self.quantized or self.has_min or self.signed:
            return 0
        return 1 << (3 + self.has_high_bits)


#: The block formats (32-element blocks), in order of their kinds.
BLOCK_KINDS = tuple(k for k in Kind if k.quantized)
#: The float formats, in order of their kinds.
FLOAT_KINDS = tuple(k for k in Kind if not k.quantized)


def kind_of(fmt_name: str) -> Kind:
    """The kind of a format by ggml's name ("Q4_0", "F16", ...)."""
    return Kind[fmt_name]
