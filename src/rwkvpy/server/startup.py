"""What a server process does before it serves: its error type and the first run of each code
path. Shared by ``rwkvpy serve`` and the Ray replicas."""

from __future__ import annotations

from ..errors import RwkvpyError


class ServeError(RwkvpyError):
    """A bad ``rwkvpy serve`` option (or a missing optional dependency)."""


def warm_up(model) -> None:
    """Run each code path once (JIT-compiled kernels load on first use)."""
    V = model.config.vocab_size
    t = [min(1, V - 1), min(2, V - 1)]
    _, s = model.forward(t)
    model.forward(t[:1], s)
    model.forward_batch([t[:1], t[1:]], [s, s])
