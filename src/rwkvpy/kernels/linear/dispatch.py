"""The one dispatch over formats: a numba function ``call(kind, args)`` that runs the kernel of
format ``kind`` on the tuple ``args``, for a run of consecutive kinds (kernels.kinds.Kind: the
five block formats, the three float ones; the K-quants' kinds of kernels/ir/kquants.py).

numba can neither index a tuple of different functions at run time nor inline a call with
``*args`` in its signature, so the branches are spelled out here, once per number of formats;
the result is inlined where it is called (the same code as a chain of ``if kind == ...`` there).
"""

from __future__ import annotations

from numba import njit


def by_kind(fns: tuple, first: int = 0):
    """``call(kind, args)`` = ``fns[kind - first](*args)``; ``kind`` past the last runs the last
    (3 or 5 functions)."""
    assert len(fns) in (3, 5), len(fns)
    if len(fns) == 3:
        f0, f1, f2 = fns

        @njit(inline="always", nogil=True)
        def call3(kind, args):
            if kind == first:
                return f0(*args)
            elif kind == first + 1:
                return f1(*args)
            return f2(*args)

        return call3
    f0, f1, f2, f3, f4 = fns

    @njit(inline="always", nogil=True)
    def call5(kind, args):
        if kind == first:
            return f0(*args)
        elif kind == first + 1:
            return f1(*args)
        elif kind == first + 2:
            return f2(*args)
        elif kind == first + 3:
            return f3(*args)
        return f4(*args)

    return call5
