"""A model's first run on a machine: the one-token step's kernels compiled in a second process.

numba compiles rwkvpy's kernels at their first call and keeps them in its cache
(rwkvpy.numba_cache). A model's first run on a machine compiles tens of them, on one core, before
its first token (docs/performance.md, "Cold start"); most of that time goes to the fused
one-token step (kernels.decode: every layer as one numba call, and its parallel twins). So on a
first run :func:`start` spawns a second process (``python -m rwkvpy.warm``) that compiles those
kernels into the cache, on a small model with the same kinds of tensors (the same version, the
same storage type for each tensor of a layer, the same mode and CPU level; zeros for weights),
while the model itself runs every token on its sequence path (models/' code with the plan's
products and recurrences: the same kernels its prompts use, which it compiles itself). The
model takes the fused step as soon as the second process is done: its kernels then load from the
cache. Both paths keep the mode's accuracy contract (docs/accuracy.md); in mode "fast" on block
formats a token's logits on the two paths differ as a prompt's and one token's do.

Which kernels the step needs is keyed by the model's kinds of tensors (:func:`kinds`), the mode,
the CPU level, the interpreter, numba and the kernels' sources: a marker file in numba's cache
folder (``warm/KEY.done``) records that the second process compiled them. Where the marker is,
nothing is spawned. One second process runs per key (an exclusive lock on ``warm/KEY.lock``):
a process that finds one running waits for it the same way; and one at a time in all
(``warm/running.lock``): a model of another kind loaded meanwhile compiles its kernels itself.
If the second process fails, is killed or runs past :data:`MAX_WAIT_S`, the model takes the
fused step anyway and compiles what it lacks itself.

Not used where numba's cache is a temporary folder of the process (nothing to share), on
Windows (no ``fcntl`` locks), or when ``$RWKVPY_BACKGROUND_COMPILE`` is ``0`` at load (then a
first run compiles every kernel in its own process before its first token).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time

from .formats.atomic import atomic_write

#: ``0``: no second process (read at each load, not at import).
ENV = "RWKVPY_BACKGROUND_COMPILE"
#: Seconds between two looks at the second process (a look: a stat, maybe a lock attempt).
POLL_S = 0.2
#: Seconds a model waits for a second process at most: past them it takes its fused step and
#: compiles what it lacks itself (a second process that hangs costs speed, never progress).
MAX_WAIT_S = 600.0
#: The second process's program (after the interpreter): rwkvpy.warm.
COMMAND = ("-m", "rwkvpy.warm")
#: Held by the second process that is running: at most one at a time on a machine (a
#: program that loads many kinds of model compiles the others itself).
RUNNING = "running.lock"
#: The vocabulary of the small model (its embedding and head rows).
SMALL_VOCAB = 4096

_LAYER = re.compile(r"^blocks\.(\d+)\.(.+)$")


def kinds(ckpt) -> dict:
    """What the kernels are compiled for: the storage type of each tensor (``F16``, ``Q4_0``,
    ...) by name, the layers given as one entry per distinct combination (``layers``: each
    layer's ``{suffix: type}``; the first layer always, as v7's differs, then each new
    combination in order) and the others as ``{name: type}`` (``other``)."""
    from .formats.base import type_name

    per_layer: dict = {}
    other = {}
    for name, t in ckpt.tensors.items():
        m = _LAYER.match(name)
        typ = type_name(t)  # what the kernels get: the tensor as loaded
        if m:
            per_layer.setdefault(int(m.group(1)), {})[m.group(2)] = typ
        else:
            other[name] = typ
    layers, seen = [], set()
    for i in sorted(per_layer):
        sig = json.dumps(per_layer[i], sort_keys=True)
        if i == 0 or sig not in seen:
            seen.add(sig)
            layers.append(i)
    return {"layers": layers, "types": {str(i): per_layer[i] for i in layers}, "other": other}


def spec(ckpt, cfg, mode: str, level: str) -> dict:
    """Everything the second process needs to build the small model and run it: the kinds
    (:func:`kinds`), the real tensors' shapes for the layers it keeps (the vocabulary cut to
    :data:`SMALL_VOCAB` rows), the version and the eps that the formats set."""
    k = kinds(ckpt)
    layer_of = {real: small for small, real in enumerate(k["layers"])}
    shapes = {}
    for name, t in ckpt.tensors.items():
        m = _LAYER.match(name)
        shape = list(t.shape)
        if m:
            real = int(m.group(1))
            if real not in layer_of:
                continue
            name = f"blocks.{layer_of[real]}.{m.group(2)}"
        elif name in ("emb.weight", "head.weight"):
            shape[0] = min(shape[0], SMALL_VOCAB)
        shapes[name] = shape
    return {
        "version": cfg.version.value,
        "mode": mode,
        "cpu_capability": level,
        "ln_x_eps": getattr(ckpt, "ln_x_eps", None),
        "kinds": k,
        "shapes": shapes,
    }


def key(s: dict) -> str:
    """The marker's name for a spec: its kinds, mode and level (not its sizes: the kernels do
    not depend on them), the interpreter, numba, llvm's CPU and rwkvpy's kernel sources."""
    from . import numba_cache

    h = hashlib.sha256()
    fixed = {k: s[k] for k in ("version", "mode", "cpu_capability", "kinds")}
    h.update(json.dumps(fixed, sort_keys=True).encode())
    h.update(numba_cache.sources_stamp())
    try:
        import llvmlite.binding as llvm
        import numba

        h.update(numba.__version__.encode())
        h.update(llvm.get_host_cpu_name().encode())
        h.update(llvm.get_host_cpu_features().flatten().encode())
    except ImportError:  # pragma: no cover - numba is optional
        pass
    h.update(f"{sys.version} {platform.machine()}".encode())
    return h.hexdigest()[:24]


def folder() -> str:
    """Where markers, locks and specs live: ``warm`` in numba's cache folder."""
    from . import numba_cache

    return os.path.join(numba_cache.cache_dir(), "warm")


def _possible() -> bool:
    if os.environ.get(ENV, "1").strip() == "0" or os.name != "posix":
        return False
    if not os.path.basename(sys.executable or "").startswith("python"):
        return False  # an embedding program (a server's own binary): nothing to run -m with
    try:
        import fcntl  # noqa: F401

        import numba  # noqa: F401

        from . import numba_cache
    except ImportError:  # pragma: no cover - numba is optional
        return False
    return bool(numba_cache.LOCATORS) and numba_cache.cache_dir() not in numba_cache._unwritable


def _try_lock(path: str):
    """An open file holding an exclusive lock on ``path``, or None if another process holds
    it."""
    import fcntl

    f = open(path, "a+b")  # noqa: SIM115 - held open for the lock's life
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


class Background:
    """The second process compiling a model's step (or another process's, found running).
    :meth:`ready`: whether the model may take its fused step now."""

    def __init__(self, marker: str, lock: str, proc: subprocess.Popen | None):
        self.marker, self.lock, self.proc = marker, lock, proc
        self._next = 0.0
        self._done = False
        self.started = time.monotonic()

    def _look(self) -> bool:
        if os.path.exists(self.marker) or time.monotonic() - self.started > MAX_WAIT_S:
            return True
        if self.proc is not None:
            return self.proc.poll() is not None  # ended without its marker: failed
        held = _try_lock(self.lock)  # another process's second process: done once it lets go
        if held is None:
            return False
        held.close()
        return True

    def ready(self) -> bool:
        """True once the second process has ended (looked at most every :data:`POLL_S`)."""
        if not self._done:
            now = time.monotonic()
            if now < self._next:
                return False
            self._next = now + POLL_S
            self._done = self._look()
        return self._done

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until :meth:`ready` (or ``timeout`` seconds); returns it."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.ready():
            if end is not None and time.monotonic() >= end:
                return False
            time.sleep(POLL_S)
        return True

    @property
    def succeeded(self) -> bool:
        """The marker is there: the step's kernels are in the cache."""
        return os.path.exists(self.marker)


def start(ckpt, cfg, mode: str, level: str) -> Background | None:
    """On a model's first run on this machine, the second process compiling its step (spawned
    here, or found running); None when the step's kernels are in the cache already or a
    second process is not possible here (see the module docstring)."""
    if not _possible():
        return None
    s = spec(ckpt, cfg, mode, level)
    k = key(s)
    base = folder()
    marker, lock = os.path.join(base, k + ".done"), os.path.join(base, k + ".lock")
    if os.path.exists(marker):
        return None
    try:
        os.makedirs(base, exist_ok=True)
        held = _try_lock(lock)
    except OSError:
        return None
    if held is None:  # another process's second process is compiling the same kernels
        return Background(marker, lock, None)
    busy = _try_lock(os.path.join(base, RUNNING))
    if busy is None:  # one for another kind of model is running: this model compiles here
        held.close()
        return None
    busy.close()
    try:
        spec_path = os.path.join(base, k + ".json")
        with atomic_write(spec_path, "w") as f:
            json.dump(s, f)
        env = dict(os.environ)
        env[ENV] = "0"  # the second process runs its small model in place
        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH", "")) if p)
        with open(os.path.join(base, k + ".log"), "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, *COMMAND, spec_path, marker, lock],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                # a process group of its own (a Ctrl-C at the terminal stops the caller, not
                # it); the caller's session, so the scheduler's group and priority of the
                # caller's (it lowers its own within them: rwkvpy.warm)
                process_group=0,
                close_fds=True,
            )
    except OSError:  # FileWriteError included
        return None
    finally:
        held.close()  # the second process takes the lock itself
    from . import compiling

    compiling.note(
        "the one-token step's kernels compile in a second process (first run only); "
        "until it is done, tokens run on the sequence path"
    )
    return Background(marker, lock, proc)
