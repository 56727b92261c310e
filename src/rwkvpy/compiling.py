"""numba compiling rwkvpy's kernels: the first-run notice, and the compile time that speeds leave
out.

numba compiles a kernel at its first call, or loads it from its cache (numba_cache.py)
when an earlier run compiled it. With an empty cache the first load and the first tokens of a
model compile tens of kernels, for tens of seconds (docs/performance.md, "Cold start"). While
that happens, stderr shows :data:`NOTICE`: at the first compile of the process, and on a
terminal also as a line that counts the kernels and seconds in place (a new line for each
stretch of compiling that lasts over :data:`SHOW_AFTER_S`). Nothing is shown when every kernel
comes from the cache, or while :func:`quiet` is on (the command line's ``--quiet`` and
``--json``).

The seconds a thread spends compiling are added up per thread (:func:`thread_seconds`), so that
a caller can take them out of a measured time: ``generate`` reports tokens per second without
them (rwkvpy.generate.Timings.compile_seconds).

Counted: functions of the rwkvpy package, each time numba compiles one (a kernel called by
another compiles inside the caller's compile; the seconds are those of the outermost one).
This module imports nothing from numba at import time; numba_cache.py installs the
listener when it registers the cache.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time

NOTICE = "compiling kernels for this CPU (first run only)"
#: On a terminal, the counting line appears once a stretch of compiling has lasted this long.
SHOW_AFTER_S = 1.0

_tls = threading.local()  # depth: rwkvpy compiles in progress; seconds: finished, this thread
_lock = threading.Lock()
_state = {
    "quiet": False,
    "noticed": False,
    "kernels": 0,
    "seconds": 0.0,
    "line": False,
    "installed": False,
}


def thread_seconds() -> float:
    """Seconds this thread has spent compiling rwkvpy kernels (outermost compiles, finished)."""
    return getattr(_tls, "seconds", 0.0)


def kernels_compiled() -> int:
    """How many rwkvpy kernels numba has compiled in this process (not loaded from its cache)."""
    return int(_state["kernels"])


def set_quiet(on: bool) -> bool:
    """Show the notice (False) or not (True); returns the previous setting."""
    with _lock:
        before, _state["quiet"] = _state["quiet"], bool(on)
    return bool(before)


@contextlib.contextmanager
def quiet(on: bool = True):
    """Within the block, the notice is shown or not (``on``); then as before."""
    before = set_quiet(on)
    try:
        yield
    finally:
        set_quiet(before)


def _ours(event) -> bool:
    data = event.data if isinstance(event.data, dict) else {}
    func = getattr(data.get("dispatcher"), "py_func", None)
    return getattr(func, "__module__", "").startswith("rwkvpy.")


def _write(text: str) -> None:
    err = sys.stderr
    try:
        err.write(text)
        err.flush()
    except (AttributeError, OSError, ValueError):  # no stderr, or a closed one
        pass


def note(text: str) -> None:
    """One line on stderr about compiling (``rwkvpy: TEXT``), unless :func:`quiet` is on."""
    if not _state["quiet"]:
        _write(f"rwkvpy: {text}\n")


def _tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, OSError, ValueError):
        return False


def _start() -> None:
    depth = getattr(_tls, "depth", 0)
    _tls.depth = depth + 1
    if depth:
        return
    _tls.t0 = time.perf_counter()
    if not _state["quiet"] and not _state["noticed"]:
        _state["noticed"] = True
        if not _tty():
            _write(f"rwkvpy: {NOTICE} ...\n")


def _end() -> None:
    _tls.depth = depth = max(0, getattr(_tls, "depth", 1) - 1)
    _state["kernels"] += 1
    elapsed = time.perf_counter() - getattr(_tls, "t0", time.perf_counter())
    if not depth:
        _tls.seconds = thread_seconds() + elapsed
        _state["seconds"] += elapsed
    if not _state["quiet"] and _tty() and (_state["line"] or elapsed >= SHOW_AFTER_S):
        total = _state["seconds"] + (elapsed if depth else 0.0)
        _write(f"\rrwkvpy: {NOTICE} ... {_state['kernels']} kernels, {total:.0f} s")
        _state["line"] = True
    if not depth and _state["line"]:  # the stretch is over: end the line before other output
        _write("\n")
        _state["line"] = False


def install() -> None:
    """Listen to numba's compile events (once per process)."""
    with _lock:
        if _state["installed"]:
            return
        _state["installed"] = True
    from numba.core import event

    class _Listener(event.Listener):
        def on_start(self, ev):
            if _ours(ev):
                _start()

        def on_end(self, ev):
            if _ours(ev):
                _end()

    event.register("numba:compile", _Listener())
