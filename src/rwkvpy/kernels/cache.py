"""The repack cache: weights that a fast kernel needs in another layout, computed once per model
file and kept next to it as ``MODEL.rwkvpy-cache``.

At load, repacking is CPU work proportional to the model. On CPUs with AVX2 (mode "fast"):
Q4_0..Q8_0 matrices into Int8DotLinear's groups of 8 interleaved rows (the same bytes, moved:
1.5-2.8 GB/s; a 1.5B model loads in 1.7-2.1 s without a cache, 2.6 s when the cache is written;
measured on the 2-vCPU AVX2 machine of the README, 2 threads).
Without AVX2: Q4_0/Q4_1 onto torch's int4 kernel (~6 s) and Q5_0/Q5_1 as int8 rows (~16 s).
With the cache a later load memory-maps the repacked tensors (0.3-0.6 s for 1.5B;
``torch.load(weights_only=True, mmap=True)``: no code runs, nothing is copied), and the model
file's own pages of those matrices are never read.

Never silently stale: the cache records the model file's size, its modification time (ns), a
SHA-256 of its first and last MiB, the cache format, torch's version and the mode; any difference
and the repacked tensors are computed again and the cache is rewritten (atomically). A cache that
cannot be read is treated as absent; one that cannot be written is skipped, and so is a folder
without any write permission bit (shared read-only data, even when running as root).
Only repacked block matrices are kept; F16 -> F32 conversions and transposed copies of small
tensors are memory-speed copies and stay in memory only.
"""

from __future__ import annotations

import hashlib
import os

import torch

FORMAT = 2
SUFFIX = ".rwkvpy-cache"
_EDGE = 1 << 20  # bytes hashed at each end of the model file


def cache_path(model_path) -> str:
    return os.fspath(model_path) + SUFFIX


def source_key(model_path, mode: str) -> dict:
    """What identifies the model file (and the code) the repacked tensors were made from."""
    path = os.fspath(model_path)
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_EDGE))
        if st.st_size > _EDGE:
            f.seek(max(_EDGE, st.st_size - _EDGE))
            h.update(f.read(_EDGE))
    return {"format": FORMAT, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "edges_sha256": h.hexdigest(), "torch": str(torch.__version__), "mode": mode}


class RepackCache:
    """The cache of one model file. ``get(name)`` gives the cached tensors of a weight (or None);
    ``put(name, tensors)`` records freshly computed ones; ``save()`` writes the file if anything
    was computed. ``status``: "hit" (everything came from the cache), "written", "none" (nothing
    to cache), or "not written: <why>"."""

    def __init__(self, model_path, mode: str):
        self.path = cache_path(model_path)
        self.key = source_key(model_path, mode)
        self._cached: dict = {}
        self._fresh: dict = {}
        self.status = "none"
        try:
            data = torch.load(self.path, weights_only=True, mmap=True)
        except FileNotFoundError:
            return
        except Exception:  # noqa: BLE001 - unreadable or foreign: rebuilt, never trusted
            return
        if isinstance(data, dict) and data.get("key") == self.key:
            self._cached = data.get("tensors", {})

    def get(self, name: str):
        return self._cached.get(name)

    def used(self) -> None:
        """A weight's cached tensors were used."""
        self.status = "hit" if self.status in ("none", "hit") else self.status

    def put(self, name: str, tensors: dict) -> None:
        self._fresh[name] = tensors

    def save(self) -> None:
        if not self._fresh:
            return
        from ..formats.atomic import atomic_write

        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.stat(folder).st_mode & 0o222:  # read-only for everyone: respected even by root
            self.status = "not written: the model's folder is read-only"
            return

        tensors = {**{k: v for k, v in self._cached.items()}, **self._fresh}
        try:
            with atomic_write(self.path) as f:
                torch.save({"key": self.key, "tensors": tensors}, f)
            self.status = "written"
        except OSError as e:
            self.status = f"not written: {e.strerror or e}"
