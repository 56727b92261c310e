"""How rwkvpy's threads behave when other processes want the same cores.

Two settings, both documented in docs/performance.md ("Under load", with the measurements):

1. **OpenMP's spin** (:func:`apply`). One OpenMP runtime runs every parallel region of an
   rwkvpy process: the libgomp that torch bundles (``torch/lib``), loaded by ``import torch``.
   torch's own parallel ops use it (the bf16 head on CPUs with native bf16, the sampler's
   reductions over the vocabulary, prompt GEMMs), and so do numba's parallel kernels: numba's
   'omp' threading layer links the system libgomp, but its OpenMP calls bind to the copy torch
   loaded first with global symbols, so both share one pool of threads (the system copy is
   loaded, reads the environment, and starts no thread). libgomp reads OMP_WAIT_POLICY and
   GOMP_SPINCOUNT once, as it is loaded. With neither set, a thread that finished its share of a
   parallel region, or waits for the next one, busy-waits 300000 rounds (milliseconds:
   docs/performance.md, "Under load") before it sleeps, taking a core from other processes and
   from rwkvpy's own threads that still have work. :func:`apply` sets :data:`SETTINGS` (10000
   rounds, a thirtieth of that: still longer than the gaps between the regions of a token, so a
   quiet machine's speed stays) in ``os.environ``, before torch is imported: ``import rwkvpy``
   calls it first thing, and so the ``rwkvpy`` command. It sets nothing if the user has set
   OMP_WAIT_POLICY or GOMP_SPINCOUNT (either one: the user's choice wins) or if torch is
   imported already (it would reach no runtime). The variable stays in the environment: child
   processes inherit it. A program that imports torch before rwkvpy and wants the setting sets
   it itself before ``import torch`` (``os.environ.setdefault("GOMP_SPINCOUNT", "10000")``) or
   in the shell.

2. **Fewer threads under load** (:class:`ThreadGovernor`). Each product of the one-token step
   is split across torch's thread count, and every split ends in a barrier that waits for the
   slowest thread. When other processes hold cores, one of rwkvpy's threads is often off its
   core at a barrier, and then two threads decode slower than one. When rwkvpy chooses the
   thread count (``rwkvpy.load(threads=None)``, the command line without ``--threads``), the
   governor lowers torch's thread count while other processes use the CPUs this process may run
   on, and raises it back when they are free. A count the user gives stays fixed.

Beside these, ``rwkvpy.load`` starts numba's thread pool (kernels/linear/threads.py: OpenMP
first, unless the user chose numba's threading layer) and changes no other process-wide
setting; its docstring lists what it changes.
"""

from __future__ import annotations

import os
import sys
import threading
import time

#: The variables libgomp reads for its waiting threads; a user's setting of either one wins.
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

#: What :func:`apply` sets when the user set neither variable.
SETTINGS = {"GOMP_SPINCOUNT": "10000"}


def apply(environ=None) -> dict:
    """Put :data:`SETTINGS` into ``environ`` (default ``os.environ``) if torch is not imported
    yet and neither of :data:`WAIT_VARIABLES` is set there. Returns what it set ({} if
    nothing)."""
    env = os.environ if environ is None else environ
    if "torch" in sys.modules or any(k in env for k in WAIT_VARIABLES):
        return {}
    env.update(SETTINGS)
    return dict(SETTINGS)


# -- threads under load ----------------------------------------------------------------------

#: Seconds between two looks at the machine (a look reads /proc/stat once).
WINDOW_S = 0.2
#: Cores that other processes' use must leave to this process, beyond the threads it runs.
#: On 2 cores: others busy on 0.75 of a core or more mean one thread.
MARGIN = 0.25
#: Consecutive looks that must agree before the count goes up (it goes down at the first).
UP_LOOKS = 2

_clock = time.monotonic  # the governor's clocks (module attributes: tests replace them)
_own_cpu = time.process_time


def cpu_busy(cpus) -> tuple:
    """(busy CPU seconds of the given CPUs, summed, since boot; their count found), from
    /proc/stat: every state but idle and iowait (steal counts as busy: a hypervisor's other
    guests take that time)."""
    busy, found = 0, 0
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            name, *v = line.split()
            if name == "cpu" or int(name[3:]) not in cpus:
                continue
            v = [int(x) for x in v[:8]]
            busy += sum(v) - v[3] - v[4]
            found += 1
    return busy / os.sysconf("SC_CLK_TCK"), found


class ThreadGovernor:
    """Chooses torch's thread count between 1 and a ceiling from what other processes use.

    At most every :data:`WINDOW_S` (on :meth:`tick`, which ``Model.forward`` and
    ``forward_batch`` call first), it takes the busy time of the CPUs this process may use
    (/proc/stat) less this process's own CPU time: the cores others used meanwhile. The count it
    wants is ``int(cpus - others + MARGIN)``, within 1 .. ceiling; it goes down at once and up
    after :data:`UP_LOOKS` looks in a row. It governs only a count rwkvpy chose itself
    (:meth:`start` with ``threads=None``), stops for good when the count was changed by
    someone else in between (``torch.set_num_threads``: theirs wins), and does nothing where
    /proc/stat cannot be read. One look costs one read of /proc/stat."""

    def __init__(self):
        self._lock = threading.Lock()
        self.active = False
        self.ceiling = self.current = 1
        self._mark = None
        self._ups = 0

    def start(self, threads: int | None, default: int) -> int:
        """Set torch's thread count for a load: ``threads`` if given (fixed: the user's choice
        wins), else ``default``, governed from now on. Returns the count set."""
        import torch

        n = threads or default
        with self._lock:
            self.active = False
            torch.set_num_threads(n)
            self.ceiling = self.current = n
            self._ups = 0
            if threads is None and n > 1:
                try:
                    self._cpus = os.sched_getaffinity(0)
                    self._mark = self._look()
                except (OSError, ValueError, AttributeError):  # no /proc (not Linux)
                    return n
                self.active = True
        return n

    def _look(self) -> tuple:
        busy, found = cpu_busy(self._cpus)
        if not found:
            raise ValueError("no CPU lines in /proc/stat")
        return _clock(), busy, _own_cpu(), found

    def tick(self) -> None:
        """Look at the machine if :data:`WINDOW_S` has passed, and set torch's thread count to
        what the look says (see the class). Cheap otherwise: one clock read."""
        if not self.active or _clock() - self._mark[0] < WINDOW_S:
            return
        if not self._lock.acquire(blocking=False):
            return  # another thread is looking
        try:
            import torch

            if torch.get_num_threads() != self.current:
                self.active = False  # changed by someone else: theirs wins
                return
            try:
                now = self._look()
            except (OSError, ValueError):
                self.active = False
                return
            t0, busy0, own0, _ = self._mark
            dt = now[0] - t0
            others = max(0.0, (now[1] - busy0) - (now[2] - own0)) / dt
            want = max(1, min(self.ceiling, int(now[3] - others + MARGIN)))
            self._mark = now
            if want < self.current:
                self._set(torch, want)
            elif want > self.current:
                self._ups += 1
                if self._ups >= UP_LOOKS:
                    self._set(torch, want)
            else:
                self._ups = 0
        finally:
            self._lock.release()

    def _set(self, torch, n: int) -> None:
        torch.set_num_threads(n)
        self.current = n
        self._ups = 0


#: The process's governor (one thread count per process, as torch has).
GOVERNOR = ThreadGovernor()


def start_threads(threads: int | None, default: int) -> int:
    """``GOVERNOR.start``: torch's thread count for a load (``rwkvpy.load``)."""
    return GOVERNOR.start(threads, default)


def tick() -> None:
    """``GOVERNOR.tick``: called before each forward pass."""
    GOVERNOR.tick()


def settle_seconds() -> float:
    """Seconds of forward calls a governed thread count needs to come back up once other
    processes have stopped (a look that lowers it, then UP_LOOKS that raise it); 0 when the
    count is fixed. A benchmark warms up at least this long (bench.time_decode)."""
    return (UP_LOOKS + 1) * WINDOW_S if GOVERNOR.active else 0.0
