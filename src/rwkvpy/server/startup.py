"""What a server process does before it serves: its error type, starting states from files,
the first run of each code path. Shared by ``rwkvpy serve`` and the Ray replicas."""

from __future__ import annotations

from ..errors import RwkvpyError


class ServeError(RwkvpyError):
    """A bad ``rwkvpy serve`` option (or a missing optional dependency)."""


def load_state_file(path, model):
    """A starting state from a file: an rwkvpy state file (``State.save``) or a BlinkDL
    state-tuned ``.pth`` (``blocks.N.att.time_state``)."""
    from ..formats.atomic import require_regular
    from ..state import MAGIC, State

    require_regular(path, ServeError)  # a FIFO would block the open below
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC))
    except OSError as e:
        raise ServeError(f"{path}: cannot read: {e.strerror}") from None
    if head == MAGIC:
        return State.load(path, model)
    return State.from_time_state(path, model)


def warm_up(model) -> None:
    """Run each code path once (JIT-compiled kernels load on first use)."""
    V = model.config.vocab_size
    t = [min(1, V - 1), min(2, V - 1)]
    _, s = model.forward(t)
    model.forward(t[:1], s)
    model.forward_batch([t[:1], t[1:]], [s, s])
