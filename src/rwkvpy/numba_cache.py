"""numba's on-disk cache of rwkvpy's compiled functions: in the user cache folder, keyed on all
kernel sources.

Where. numba's own default keeps a function's compiled code next to its source
(``__pycache__`` of the installed package), which writes into site-packages at the first call
and fails where that folder is read-only. Every numba function defined in the rwkvpy package is
cached in :func:`cache_dir` instead: ``$NUMBA_CACHE_DIR`` when the user set it (numba's own
setting, ``numba.config.CACHE_DIR``), else ``rwkvpy.paths.user_cache_dir("numba")``:
``$RWKVPY_CACHE_DIR/numba``, else ``$XDG_CACHE_HOME/rwkvpy/numba`` (``~/.cache/rwkvpy/numba``),
``~/Library/Caches/rwkvpy/numba`` on macOS, ``%LOCALAPPDATA%\\rwkvpy\\Cache\\numba`` on
Windows. Inside it, one subfolder per source folder, named as numba names them (the folder's
name and a hash of its path), so two installations never share entries. Deleting the folder
clears the cache; the next run compiles again. Where that folder cannot be written, the
functions are cached in a temporary folder of the process, removed when it exits: every run
compiles, and none fails for want of a writable cache (a RuntimeWarning says so once).

Freshness. numba stamps each cached function with the hash of its own source file only. The
kernels compile code from other files into theirs: linear/ and decode/ inline the LLVM
intrinsics of ir/, and decode/ links linear/'s products. After a change to the intrinsics alone,
numba would load the products' stale machine code as fresh (a product keeps computing the old
way until its cache files are deleted), and so would an upgrade that leaves old cache files
behind. Here every function defined in the kernels folder (or below it) is
stamped with the hash of every ``.py`` file of that folder and its subfolders (kernels/ir/: the
intrinsics), so a change to any of them recompiles them all; functions elsewhere in the package
keep numba's stamp (their own file's hash).

Registered when imported (by ``rwkvpy.kernels``, ``rwkvpy.quant.q_k`` and the tokenizer's kernels) before any of
those functions is decorated: numba chooses a function's locator when it is decorated. numba's
locator classes are not a public API: where they differ from what is expected here, nothing is
registered and numba's own locators stay (tests/test_cold_start.py checks the registration).
Importing this module also installs rwkvpy.compiling's listener (the first-run notice).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import shutil
import tempfile
import warnings

_PKG = os.path.dirname(os.path.abspath(__file__))  # the rwkvpy package
_DIR = os.path.join(_PKG, "kernels")  # the kernels, stamped together
#: the rwkvpy package folder: the functions defined below it are cached by this module


def _sources(folder: str) -> list:
    """The ``.py`` files under ``folder`` (its subfolders included), as relative paths with
    '/' separators, in name order."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        rel = os.path.relpath(root, folder)
        out += [
            name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}"
            for name in files
            if name.endswith(".py")
        ]
    return sorted(out)


def sources_stamp(folder: str = _DIR) -> bytes:
    """sha256 over the relative names and contents of the ``.py`` files under the folder
    (subfolders included), in name order."""
    h = hashlib.sha256()
    for name in _sources(folder):
        with open(os.path.join(folder, *name.split("/")), "rb") as f:
            h.update(name.encode() + b"\0" + f.read() + b"\0")
    return h.digest()


def _in_kernels(py_file: str) -> bool:
    path = os.path.abspath(py_file)
    try:
        return os.path.commonpath([path, _DIR]) == _DIR
    except ValueError:  # another drive (Windows)
        return False


def _file_stamp(path: str) -> bytes:
    """numba's own stamp of a source file: sha256 of its contents."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).digest()


def cache_dir() -> str:
    """The folder of rwkvpy's numba cache: ``$NUMBA_CACHE_DIR`` if set, else the user cache
    folder's ``numba`` (see the module's docstring). Read when a function is decorated."""
    try:
        from numba.core import config

        if config.CACHE_DIR:
            return os.path.abspath(config.CACHE_DIR)
    except ImportError:  # pragma: no cover - numba is optional
        pass
    from .paths import user_cache_dir

    return os.path.abspath(user_cache_dir("numba"))


_unwritable: set = set()  # cache folders found not writable in this process
_temp: list = []  # the process's temporary cache folder, once made


def _temp_dir() -> str | None:
    if not _temp:
        try:
            path = tempfile.mkdtemp(prefix="rwkvpy-numba-")
        except OSError:
            return None
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        _temp.append(path)
    return _temp[0]


def _in_package(py_file: str) -> bool:
    path = os.path.abspath(py_file)
    try:
        return os.path.commonpath([path, _PKG]) == _PKG
    except ValueError:  # another drive (Windows)
        return False


def _register() -> tuple:
    try:
        from numba.core import caching

        base = caching._CacheLocator
        classes = caching.CacheImpl._locator_classes
        base.get_suitable_cache_subpath  # noqa: B018 - present in the numba this expects
    except (ImportError, AttributeError):  # pragma: no cover - another numba
        return ()
    kernels_stamp = sources_stamp()

    class PackageLocator(base):
        """A numba locator for the functions defined in the rwkvpy package: cached in
        :func:`cache_dir` (else a temporary folder), stamped as the module's docstring says."""

        def __init__(self, py_func, py_file, root):
            self._py_file = py_file
            self._lineno = py_func.__code__.co_firstlineno
            self._cache_path = os.path.join(root, self.get_suitable_cache_subpath(py_file))

        def get_cache_path(self):
            return self._cache_path

        def get_source_stamp(self):
            if _in_kernels(self._py_file):
                return kernels_stamp
            return _file_stamp(self._py_file)

        def get_disambiguator(self):
            return str(self._lineno)

        @classmethod
        def from_function(cls, py_func, py_file):
            if not _in_package(py_file) or not os.path.isfile(py_file):
                return None
            root = cache_dir()
            if root not in _unwritable:
                self = cls(py_func, py_file, root)
                try:
                    self.ensure_cache_path()  # numba's check: makes the folder, writes a file
                    return self
                except OSError as e:
                    _unwritable.add(root)
                    warnings.warn(
                        f"rwkvpy: numba's cache folder {root} cannot be written "
                        f"({e.strerror or e}): kernels are compiled in every run",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            temp = _temp_dir()
            if temp is not None:
                self = cls(py_func, py_file, temp)
                try:
                    self.ensure_cache_path()
                    return self
                except OSError:
                    pass
            return None  # nothing writable: numba's own locators decide

    if not any(getattr(c, "__name__", "") == "PackageLocator" for c in classes):
        classes.insert(0, PackageLocator)
        _guard_saves(caching.Cache, PackageLocator)
    else:  # pragma: no cover - registered by an earlier import of this module
        PackageLocator = next(c for c in classes if getattr(c, "__name__", "") == "PackageLocator")
    return (PackageLocator,)


_save_failed: list = []  # the first failed save of this process (its warning said)


@contextlib.contextmanager
def _saving(folder: str):
    """Held while one function's compiled code is saved into ``folder``: an exclusive lock on
    ``folder/rwkvpy-save.lock`` across processes. numba's save reads the function's index,
    picks the first free data file name and writes both; two processes saving two signatures
    of one function at once could pick the same name, and the index would then point one
    signature at the other's code. (Loads need no lock: every file is replaced whole.)"""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: numba's own behaviour
        yield
        return
    with open(os.path.join(folder, "rwkvpy-save.lock"), "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _guard_saves(cache_class, locator_class) -> None:
    """A kernel of rwkvpy whose compiled code cannot be saved (a full disk, a file size limit,
    a folder made read-only meanwhile) still runs: the save's OSError becomes one warning per
    process instead of an error out of the first call. numba's own handling is unchanged for
    every other function (numba raises such errors, except EACCES on Windows)."""
    save = cache_class.save_overload

    def save_overload(self, sig, data):
        locator = getattr(self._impl, "locator", None)
        if not isinstance(locator, locator_class):
            return save(self, sig, data)
        try:
            with _saving(locator.get_cache_path()):
                save(self, sig, data)
        except OSError as e:
            if not _save_failed:
                _save_failed.append(str(e))
                warnings.warn(
                    f"rwkvpy: a compiled kernel could not be saved in numba's cache "
                    f"({e.strerror or e}): it runs, and is compiled again in the next run",
                    RuntimeWarning,
                    stacklevel=2,
                )

    cache_class.save_overload = save_overload


#: the locator classes registered with numba (empty where numba's internals differ)
LOCATORS = _register()

try:
    from . import compiling

    compiling.install()
except ImportError:  # pragma: no cover - numba is optional
    pass
