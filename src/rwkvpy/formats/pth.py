"""BlinkDL's PyTorch checkpoints (``.pth``): a plain dict of tensor name -> tensor.

Loaded with ``torch.load(weights_only=True, mmap=True)``: a model file is data and can never
run code, and tensors stay in the file's pages until used.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile

import torch

from ..errors import NotAStateDictError, TruncatedFileError
from .base import Checkpoint, type_name

# bytes per element of the storage types a PyTorch archive names
_ELEMENT_BYTES = {
    "FloatStorage": 4,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "DoubleStorage": 8,
    "LongStorage": 8,
    "IntStorage": 4,
    "ShortStorage": 2,
    "CharStorage": 1,
    "ByteStorage": 1,
    "BoolStorage": 1,
    "UntypedStorage": 1,
}


def _first_line(e) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


class _Stub:
    """Stands for every object data.pkl names: takes any arguments and items, runs nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


class _StorageLister(pickle._Unpickler):  # the Python one: its memo is a dict, never sized by
    # an index in the data (the C one allocates a table up to a memo index read from the file)
    """Reads data.pkl without building anything (every class is a :class:`_Stub`) to list the
    storages it refers to: {key: (storage type name, element count)}."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.storages: dict = {}

    def find_class(self, module, name):
        return type(name, (_Stub,), {})

    def persistent_load(self, pid):
        if (
            not isinstance(pid, tuple)
            or len(pid) != 5
            or pid[0] != "storage"
            or not isinstance(pid[2], str)
            or isinstance(pid[4], bool)
            or not isinstance(pid[4], int)
            or pid[4] < 0
        ):
            raise ValueError(f"a persistent id {str(pid)[:80]} that is not a storage")
        self.storages[pid[2]] = (
            type(pid[1]).__name__ if not isinstance(pid[1], type) else pid[1].__name__,
            pid[4],
        )
        return _Stub()


def _check_records(path) -> None:
    """Check a zip archive's storage records before torch maps them: torch's mmap load takes
    each storage's size from data.pkl and would read past a record that is shorter (an empty
    or truncated record with a valid CRC), so each record data.pkl names must exist, hold
    exactly its element count times the element size, and lie inside the file."""
    size = os.path.getsize(path)
    with zipfile.ZipFile(path) as z:
        infos = {i.filename: i for i in z.infolist()}
        pkls = [n for n in infos if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise TruncatedFileError(
                path, f"a PyTorch archive holds one data.pkl, this one {len(pkls)}"
            )
        if infos[pkls[0]].file_size > size:
            raise TruncatedFileError(path, "data.pkl is larger than the file")
        lister = _StorageLister(z.read(pkls[0]))
        try:
            lister.load()
        except (TruncatedFileError, NotAStateDictError):
            raise
        except (Exception, MemoryError) as e:  # noqa: BLE001 - a corrupt pickle, any way
            raise TruncatedFileError(
                path, f"data.pkl is corrupt: {type(e).__name__}: {_first_line(e)}"
            ) from None
        prefix = pkls[0][: -len("data.pkl")]
        with open(path, "rb") as f:
            for key, (kind, count) in lister.storages.items():
                name = f"{prefix}data/{key}"
                rec = infos.get(name)
                if rec is None:
                    raise TruncatedFileError(path, f"storage record '{name}' is missing")
                if kind not in _ELEMENT_BYTES:
                    raise NotAStateDictError(
                        path, f"storage '{name}' has type {kind[:40]!r}, expected a tensor storage"
                    )
                want = count * _ELEMENT_BYTES[kind]
                if rec.file_size != want:
                    raise TruncatedFileError(
                        path,
                        f"storage record '{name}' holds {rec.file_size} bytes, its "
                        f"{count} {kind} elements need {want} (truncated or corrupt?)",
                    )
                f.seek(rec.header_offset)
                local = f.read(30)
                if len(local) < 30 or local[:4] != b"PK\x03\x04":
                    raise TruncatedFileError(path, f"storage record '{name}': no local header")
                n_name, n_extra = struct.unpack_from("<HH", local, 26)
                if rec.header_offset + 30 + n_name + n_extra + rec.file_size > size:
                    raise TruncatedFileError(
                        path, f"storage record '{name}' ends past the end of the file"
                    )


class _Clamped(io.FileIO):
    """A file whose reads never ask for more than the bytes left: a pickle opcode announcing a
    3 GB string in a 7-byte file is then "truncated", not a 3 GB allocation."""

    def __init__(self, path):
        super().__init__(path, "rb")
        self._size = os.fstat(self.fileno()).st_size

    def read(self, n=-1):
        if n is not None and n >= 0:
            n = min(n, max(0, self._size - self.tell()))
        return super().read(n)

    def readinto(self, b):
        left = max(0, self._size - self.tell())
        if len(b) > left:
            return super().readinto(memoryview(b)[:left])
        return super().readinto(b)


def read(path) -> Checkpoint:
    path = os.fspath(path)
    try:
        if zipfile.is_zipfile(path):
            _check_records(path)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "zip" not in str(e).lower() and "mmap" not in str(e).lower():
                raise
            with _Clamped(path) as f:  # legacy, non-zip file
                obj = torch.load(f, map_location="cpu", weights_only=True)
    except (TruncatedFileError, NotAStateDictError):
        raise
    except pickle.UnpicklingError as e:
        raise NotAStateDictError(
            path,
            "not a plain state dict of tensors: loading it would run "
            f"code or build objects ({_first_line(e)})",
        ) from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the zip reader or the unpickler raise
        # (KeyError, TypeError, IndexError, BadZipFile, RecursionError ... on a corrupt file)
        raise TruncatedFileError(
            path,
            f"cannot read the PyTorch archive (truncated or corrupt?): "
            f"{type(e).__name__}: {_first_line(e)}",
        ) from None
    if not isinstance(obj, dict):
        raise NotAStateDictError(path, f"holds a {type(obj).__name__}, expected a dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        k = bad[0]
        raise NotAStateDictError(
            path, f"entry {k!r} is a {type(obj[k]).__name__}, expected only name -> tensor entries"
        )
    tensors = {k: v for k, v in obj.items()}
    for k, v in tensors.items():
        if not v.is_floating_point():
            raise NotAStateDictError(
                path, f"tensor '{k}' has dtype {v.dtype}, expected float32, float16 or bfloat16"
            )
        storage = v.untyped_storage().nbytes() // v.element_size()
        extent = v.storage_offset() + sum((n - 1) * st for n, st in zip(v.shape, v.stride())) + 1
        if v.numel() and (min(v.stride(), default=0) < 0 or extent > storage):
            raise TruncatedFileError(
                path,
                f"tensor '{k}' (shape {tuple(v.shape)}, offset "
                f"{v.storage_offset()}) reaches past its storage of "
                f"{storage} elements",
            )
    return Checkpoint(
        path=path,
        format="pth",
        tensors=tensors,
        file_types={k: type_name(v) for k, v in tensors.items()},
        file_size=os.path.getsize(path),
    )
