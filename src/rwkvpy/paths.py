"""Where rwkvpy keeps files of its own: one user cache folder, never the installed package's folder
nor (unless asked) the folder of a user's model.

The folder is ``$RWKVPY_CACHE_DIR`` when set, else the platform's cache folder:
``$XDG_CACHE_HOME/rwkvpy`` (default ``~/.cache/rwkvpy``) on Linux and other Unixes,
``~/Library/Caches/rwkvpy`` on macOS, ``%LOCALAPPDATA%\\rwkvpy\\Cache`` on Windows. The
environment is read at each call, so a process can point it elsewhere before loading a model.
"""

from __future__ import annotations

import os
import sys

ENV = "RWKVPY_CACHE_DIR"


def user_cache_dir(*parts: str) -> str:
    """The user cache folder (or a folder below it: ``parts``); not created here."""
    base = os.environ.get(ENV)
    if not base:
        home = os.path.expanduser("~")
        if sys.platform == "win32":
            local = os.environ.get("LOCALAPPDATA") or os.path.join(home, "AppData", "Local")
            base = os.path.join(local, "rwkvpy", "Cache")
        elif sys.platform == "darwin":
            base = os.path.join(home, "Library", "Caches", "rwkvpy")
        else:
            xdg = os.environ.get("XDG_CACHE_HOME")
            base = os.path.join(
                xdg if xdg and os.path.isabs(xdg) else os.path.join(home, ".cache"), "rwkvpy"
            )
    return os.path.join(base, *parts)
