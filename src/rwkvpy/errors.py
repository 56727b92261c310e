"""Typed exceptions of rwkvpy.

Every error a user can cause (a bad file, a bad token, a bad argument) is a subclass of
:class:`RwkvpyError` and of :class:`ValueError`, and its message names the file, the tensor or
field, what was found and what was expected. The CLI prints the message as one line and exits
non-zero; it never shows a traceback for these.
"""

from __future__ import annotations


class RwkvpyError(ValueError):
    """Base class of every error rwkvpy raises for bad input."""


class ModelFileError(RwkvpyError):
    """A model file cannot be read: the message starts with the file's path."""

    def __init__(self, path, message: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


class UnknownFormatError(ModelFileError):
    """The file's content matches no format rwkvpy reads (wrong magic)."""


class TruncatedFileError(ModelFileError):
    """The file ends before the data its headers announce."""


class UnsupportedVersionError(ModelFileError):
    """A file version (or model architecture version) rwkvpy does not read."""


class UnsupportedTensorTypeError(ModelFileError):
    """A tensor data type rwkvpy does not read."""


class MissingTensorError(ModelFileError):
    """A tensor the model's version needs is not in the file."""


class TensorShapeError(ModelFileError):
    """A tensor has a shape other than the one the model's dimensions imply."""


class NotARegularFileError(ModelFileError):
    """A path that names a FIFO, a device or a socket where a file is read or written: reading
    one could block forever or never end, and replacing one would destroy it."""


class FileWriteError(RwkvpyError, OSError):
    """A file cannot be written (missing or read-only folder, full disk, a destination that is
    not a regular file): the message names the file and the cause. Also an OSError, so that
    callers which handle failed writes as OSError keep doing so."""

    def __init__(self, path, message: str, errno: int | None = None):
        self.path = str(path)
        self.message = f"{self.path}: {message}"
        super().__init__(self.message)
        self.errno = errno
        self.strerror = message

    def __str__(self) -> str:
        return self.message


class NotAStateDictError(ModelFileError):
    """A .pth file that is not a plain mapping of names to tensors."""


class QuantizationError(RwkvpyError):
    """Quantized data whose size or shape does not fit its block format."""


class TokenError(RwkvpyError):
    """A token id outside the model's vocabulary, or an empty token list."""


class SamplingError(RwkvpyError):
    """Sampling parameters out of range, or logits that cannot be sampled from."""


class StateError(RwkvpyError):
    """A state that does not belong to the model it is used with."""


class CpuCapabilityError(RwkvpyError):
    """A CPU capability level (``cpu_capability``, ``$RWKVPY_CPU_CAPABILITY``) that is not a
    known level, or whose kernels cannot run on this CPU."""


class ConversionError(RwkvpyError):
    """A conversion that cannot be done: an unknown target type or file extension, a type the
    target format cannot hold (BF16 in an rwkv.cpp .bin), a source that is also the target."""


class OutputExistsError(ConversionError):
    """The output file exists and overwriting was not asked for (``force=True``/``--force``)."""
