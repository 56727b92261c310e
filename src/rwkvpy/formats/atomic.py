"""Safe file access.

Reading: :func:`require_regular` refuses paths that are not regular files (FIFOs, devices,
sockets) before anything opens them: opening a FIFO blocks until a writer comes, and a device
such as the zero device never ends.

Writing: :func:`atomic_write` and :func:`atomic_path` write a temp file next to the target and
rename it over the target only when complete; a destination that exists and is not a regular
file is refused (renaming over it would replace the device node or FIFO). A writer killed
mid-write (SIGKILL, power loss) cannot clean up after itself, so temp names carry this host's
tag and the writer's pid, ``.NAME.HOST-PID.RANDOM.tmp``, and each writer of NAME first removes
the temps of writers on this host whose process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import socket
import stat
import tempfile

from ..errors import FileWriteError, NotARegularFileError

_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def not_regular(path) -> str | None:
    """What ``path`` is when it exists and is not a regular file (``"a FIFO (named pipe)"``,
    ``"a character device"``...); None for a regular file (or a link to one) and for a path
    that does not exist (the caller's own open reports that)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # missing, unreadable, or a name with a NUL
        return None
    if stat.S_ISREG(mode):
        return None
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return "not a regular file"


def require_regular(path, error=None) -> None:
    """Refuse to read ``path`` unless it is a regular file: raises ``error(message)`` (by
    default :class:`NotARegularFileError` naming the path)."""
    kind = not_regular(path)
    if kind is not None:
        msg = f"is {kind}, not a regular file: refusing to read it (it could block or never end)"
        raise error(f"{os.fspath(path)}: {msg}") if error else NotARegularFileError(path, msg)


# -- temp files ------------------------------------------------------------------------------------

_HOST = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
_BASE_CHARS = 160  # of the target's name kept in its temp names (names are at most 255 bytes)


def _temp_prefix(base: str) -> str:
    return "." + base[:_BASE_CHARS] + "."


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's process, alive
        return True
    try:  # a zombie (killed, not yet reaped by its parent) writes nothing more
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def clean_dead_temps(path) -> list:
    """Remove the temp files of ``path`` that writers on this host left when they died; returns
    their paths. Temps of live writers, of other hosts and other files are left alone."""
    folder = os.path.dirname(os.path.abspath(path))
    pattern = re.compile(
        re.escape(_temp_prefix(os.path.basename(path)))
        + r"([0-9a-f]{8})-(\d+)\.[A-Za-z0-9_]+\.tmp\Z"
    )
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = pattern.match(name)
        if m and m.group(1) == _HOST and not _alive(int(m.group(2))):
            p = os.path.join(folder, name)
            with contextlib.suppress(OSError):
                os.unlink(p)
                removed.append(p)
    return removed


def _write_error(path, e: OSError) -> FileWriteError:
    if isinstance(e, FileWriteError):
        return e
    return FileWriteError(path, f"cannot write: {e.strerror or e}", e.errno)


#: errors of a write that mean the destination's disk or folder, not the data written
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO}


def failed_write(path, e: BaseException):
    """``e`` as the FileWriteError naming ``path`` when it is a failed write (a full disk, a
    file size limit, a read-only or failing device); None otherwise."""
    if isinstance(e, FileWriteError):
        return e
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
        return _write_error(path, e)
    return None


class _Recorder:
    """A file object's write and flush, the first OSError they raise kept: torch.save reports
    a failed write as a RuntimeError without its cause."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self):
        try:
            return self.f.flush()
        except OSError as e:
            self.error = self.error or e
            raise


def torch_save(obj, f) -> None:
    """``torch.save(obj, f)`` into an open binary file, a failed write raised as the OSError
    that caused it (which atomic_write turns into a FileWriteError naming the file)."""
    import torch

    rec = _Recorder(f)
    try:
        torch.save(obj, rec)  # type: ignore[arg-type]  # a file-like object, as torch takes
    except RuntimeError:
        if rec.error is not None:
            raise rec.error from None
        raise


def _check_destination(path) -> None:
    kind = not_regular(path)
    if kind is not None:
        raise FileWriteError(path, f"is {kind}, not a regular file: refusing to replace it")


def check_writable(path) -> None:
    """Raise FileWriteError naming ``path`` now if it cannot be written later: its folder is
    missing, not a folder or not writable, or ``path`` is something other than a regular file.
    For commands that write a file at the end of long work (``generate --save-state``)."""
    path = os.fspath(path)
    _check_destination(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        what = "does not exist" if not os.path.exists(folder) else "is not a folder"
        raise FileWriteError(path, f"cannot create a file in {folder}: it {what}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FileWriteError(path, f"cannot create a file in {folder}: Permission denied")


def temp_next_to(path, suffix=".tmp"):
    """(fd, path) of a new empty temp file beside ``path``, named so that a later writer of
    ``path`` removes it if this process dies, with the permissions a plain open() would give.
    Raises FileWriteError (naming ``path``) when the folder is missing or not writable."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    clean_dead_temps(path)
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f"{_temp_prefix(os.path.basename(path))}{_HOST}-{os.getpid()}.",
            suffix=suffix,
            dir=folder,
        )
    except OSError as e:
        raise FileWriteError(
            path, f"cannot create a file in {folder}: {e.strerror or e}", e.errno
        ) from None
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600
    return fd, tmp


@contextlib.contextmanager
def _removed_on_failure(path, tmp):
    """The temp file ``tmp`` removed when the block raises, and a failed write raised as the
    FileWriteError naming ``path`` (:func:`failed_write`); any other error as it is."""
    try:
        yield
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        mapped = failed_write(path, e)
        if mapped is not None and mapped is not e:
            raise mapped from None
        raise


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Yield a file object; on success its content replaces ``path`` in one rename. A
    destination that is not a regular file, a missing or read-only folder, and a failed flush
    or rename raise FileWriteError naming ``path``; the temp file never stays behind."""
    path = os.fspath(path)
    _check_destination(path)
    fd, tmp = temp_next_to(path)
    with _removed_on_failure(path, tmp):
        with os.fdopen(fd, mode) as f:
            yield f
            try:
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:
                raise _write_error(path, e) from None
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise _write_error(path, e) from None


@contextlib.contextmanager
def atomic_path(path):
    """Like :func:`atomic_write`, for writers that open the file themselves: yields the path of
    a temp file next to ``path`` (closed, empty), renamed over ``path`` when the block ends
    without an exception and removed when it raises."""
    path = os.fspath(path)
    _check_destination(path)
    fd, tmp = temp_next_to(path)
    os.close(fd)
    with _removed_on_failure(path, tmp):
        yield tmp
        try:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            raise _write_error(path, e) from None
