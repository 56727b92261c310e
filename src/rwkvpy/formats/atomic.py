"""Atomic file writes: a temp file next to the target, renamed over it only when complete."""

from __future__ import annotations

import contextlib
import os
import tempfile


def _temp_next_to(path):
    """A new empty temp file beside path, with the permissions a plain open() would give."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600
    return fd, tmp


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    path = os.fspath(path)
    fd, tmp = _temp_next_to(path)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path):
    """Like :func:`atomic_write`, for writers that open the file themselves: yields the path of
    a temp file next to ``path`` (closed, empty), renamed over ``path`` when the block ends
    without an exception and removed when it raises."""
    path = os.fspath(path)
    fd, tmp = _temp_next_to(path)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
