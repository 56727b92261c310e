"""The hook of the generation loop: a change to each step's logits before the token is drawn
(:class:`LogitsProcessor`). :mod:`rwkvpy.constrain`'s grammars are one; the loop
(:mod:`rwkvpy.generation`) applies them in order after the sampler's bias, penalties and bans."""

from __future__ import annotations

import torch

__all__ = ["LogitsProcessor"]


class LogitsProcessor:
    """A change to each step's logits before the token is drawn (one object per sequence: it
    may keep state). ``__call__`` gets the float32 logits after the sampler's bias, penalties
    and bans and returns the logits to draw from (it may change them in place); ``accept`` is
    told each token the sequence takes; ``finished`` ends the sequence with "stop" when True."""

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def accept(self, token: int) -> None:
        """``token`` was chosen and the state has read it."""

    def finished(self) -> bool:
        return False
