"""The repack cache: weights that a fast kernel needs in another layout, computed once per model
file and kept in the user cache folder (rwkvpy.paths: ``<cache>/repack/``), or, when asked
(``load(cache="beside")``), next to the model as ``MODEL.rwkvpy-cache``.

At load, repacking is CPU work proportional to the model: in mode "fast" at CPU level avx2 and
up, Q4_0..Q8_0 matrices into Int8DotLinear's groups of 8 interleaved rows and Q4_K/Q5_K/Q6_K
ones into KQuantX8Linear's (the same bytes, moved; Q5_K's and Q6_K's codes recoded). With the cache a later load memory-maps the
repacked tensors (``torch.load(weights_only=True, mmap=True)``: no code runs, nothing is
copied), and the model file's own pages of those matrices are never read.

The user folder's entries are named after the model file's name and a hash of its absolute
path; together they are kept under a size limit (:func:`max_bytes`): after a write, the entries
used least recently (a hit touches its file) are removed until the rest fit.

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

#: The layout of the repacked tensors; a cache of another format is computed again. 3: Q5_K's
#: and Q6_K's codes recoded (kernels/ir/kquants_x8.py, Q5K_QUARTER and Q6K_QUARTER).
FORMAT = 3
SUFFIX = ".rwkvpy-cache"
_EDGE = 1 << 20  # bytes hashed at each end of the model file
#: The environment variable that sets the user folder's size limit in GB (read at each write).
MAX_ENV = "RWKVPY_CACHE_MAX_GB"
#: The default limit: a few models' block matrices.
DEFAULT_MAX_GB = 16.0


def folder() -> str:
    """The repack cache's folder in the user cache folder."""
    from ..paths import user_cache_dir

    return user_cache_dir("repack")


def cache_path(model_path, beside: bool = False) -> str:
    """The cache file of a model: in :func:`folder`, or next to the model with ``beside``."""
    path = os.fspath(model_path)
    if beside:
        return path + SUFFIX
    tag = hashlib.sha256(os.path.abspath(path).encode("utf-8", "surrogateescape")).hexdigest()
    return os.path.join(folder(), f"{os.path.basename(path)}-{tag[:16]}{SUFFIX}")


def max_bytes() -> int:
    """The user folder's size limit: ``$RWKVPY_CACHE_MAX_GB`` (GB) or :data:`DEFAULT_MAX_GB`."""
    try:
        gb = float(os.environ.get(MAX_ENV, DEFAULT_MAX_GB))
    except ValueError:
        gb = DEFAULT_MAX_GB
    return int(max(gb, 0.0) * 1e9)


def entries() -> list:
    """The user folder's cache files, most recently used first: dicts of ``path``, ``bytes``,
    ``used`` (modification time: the last write or hit), ``model`` (the model file it was made
    from, when readable)."""
    base = folder()
    try:
        names = [n for n in os.listdir(base) if n.endswith(SUFFIX)]
    except OSError:
        return []
    out = []
    for name in names:
        p = os.path.join(base, name)
        try:
            st = os.stat(p)
        except OSError:
            continue
        model = None
        try:
            key = torch.load(p, weights_only=True, mmap=True).get("key", {})
            model = key.get("path")
        except Exception:  # noqa: BLE001 - a foreign or broken file: listed without its model
            pass
        out.append({"path": p, "bytes": st.st_size, "used": st.st_mtime, "model": model})
    return sorted(out, key=lambda e: -e["used"])


def prune(limit: int | None = None, keep: str | None = None) -> list:
    """Remove the least recently used entries of the user folder until the rest fit in
    ``limit`` bytes (default :func:`max_bytes`), never ``keep``; returns the removed paths."""
    limit = max_bytes() if limit is None else limit
    removed, total = [], 0
    for e in entries():
        total += e["bytes"]
        if total > limit and e["path"] != keep:
            try:
                os.remove(e["path"])
                removed.append(e["path"])
                total -= e["bytes"]
            except OSError:
                pass
    return removed


def clear() -> list:
    """Remove every entry of the user folder; returns the removed paths."""
    return prune(limit=0)


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
    return {
        "format": FORMAT,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "edges_sha256": h.hexdigest(),
        "torch": str(torch.__version__),
        "mode": mode,
    }


class RepackCache:
    """The cache of one model file. ``get(name)`` gives the cached tensors of a weight (or None);
    ``put(name, tensors)`` records freshly computed ones; ``save()`` writes the file if anything
    was computed. ``status``: "hit" (everything came from the cache), "written", "none" (nothing
    to cache), or "not written: <why>"."""

    def __init__(self, model_path, mode: str, beside: bool = False):
        self.path = cache_path(model_path, beside)
        self.beside = beside
        self.key = {**source_key(model_path, mode), "path": os.path.abspath(model_path)}
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
        if self.status == "none":
            try:
                os.utime(self.path)  # the least recently used entries are pruned first
            except OSError:
                pass
        self.status = "hit" if self.status in ("none", "hit") else self.status

    def put(self, name: str, tensors: dict) -> None:
        self._fresh[name] = tensors

    def save(self) -> None:
        if not self._fresh:
            return
        from ..formats.atomic import atomic_write, torch_save

        where = os.path.dirname(os.path.abspath(self.path))
        if self.beside and not os.stat(where).st_mode & 0o222:
            # read-only for everyone: respected even by root
            self.status = "not written: the model's folder is read-only"
            return
        try:
            os.makedirs(where, exist_ok=True)
        except OSError as e:
            self.status = f"not written: {where}: {e.strerror or e}"
            return

        tensors = {**{k: v for k, v in self._cached.items()}, **self._fresh}
        try:
            with atomic_write(self.path) as f:
                torch_save({"key": self.key, "tensors": tensors}, f)
            self.status = "written"
        except OSError as e:  # a full disk: skipped (FileWriteError is an OSError)
            self.status = f"not written: {e.strerror or e}"
            return
        if not self.beside:
            prune(keep=self.path)
