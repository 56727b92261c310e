"""numba's on-disk cache for this package's kernels, keyed on all of their sources.

numba stamps each cached function with the hash of its own source file only. The kernels here
compile code from other files into theirs: linear.py and fused.py inline the LLVM intrinsics of
simd.py, and fused.py links linear.py's products. After a change to simd.py alone, numba loaded
the old machine code of linear.py's products as fresh (measured: a product kept its old result
until ``kernels/__pycache__/*.nbi`` was deleted), and an upgrade that leaves the old cache files
behind would do the same. Here every function defined in this folder is stamped with the hash of
every ``.py`` file of the folder, so a change to any of them recompiles them all.

Imported by ``rwkvpy.kernels`` before any of its kernels is defined (the locator is chosen when a
function is decorated). numba's locator classes are not a public API: where they differ from
what is expected here, nothing is registered and numba's own stamps stay.
"""

from __future__ import annotations

import hashlib
import os

_DIR = os.path.dirname(os.path.abspath(__file__))


def sources_stamp(folder: str = _DIR) -> bytes:
    """sha256 over the names and contents of the folder's ``.py`` files, in name order."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read() + b"\0")
    return h.digest()


def _register() -> tuple:
    try:
        from numba.core import caching
        bases = (caching.UserProvidedCacheLocator, caching.InTreeCacheLocator,
                 caching.UserWideCacheLocator)
        classes = caching.CacheImpl._locator_classes
    except (ImportError, AttributeError):  # pragma: no cover - another numba
        return ()
    stamp = sources_stamp()

    class _KernelsStamp:
        """A numba locator for functions defined in this folder: the folder's stamp."""

        def get_source_stamp(self):
            return stamp

        @classmethod
        def from_function(cls, py_func, py_file):
            if os.path.dirname(os.path.abspath(py_file)) != _DIR:
                return None
            return super().from_function(py_func, py_file)

    ours = tuple(type("Kernels" + base.__name__, (_KernelsStamp, base), {}) for base in bases)
    if not any(getattr(c, "__name__", "").startswith("Kernels") for c in classes):
        classes[:0] = ours
    return ours


#: the locator classes registered with numba (empty where numba's internals differ)
LOCATORS = _register()
