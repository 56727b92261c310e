"""What every rwkvpy tokenizer offers, and the error they raise."""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod

from ..errors import RwkvpyError


class TokenizerError(RwkvpyError):
    """A tokenizer that cannot be built or used: a missing or malformed vocabulary file, a
    token id outside the vocabulary, text that is not valid Unicode, a tokenizer that does not
    fit a model's vocabulary."""


#: What every error about a missing or unusable vocabulary tells the user to do.
VOCAB_HINT = "give the vocabulary file with --vocab PATH (Python: path=)"


def with_hint(e: TokenizerError) -> TokenizerError:
    """``e`` with :data:`VOCAB_HINT` appended (once)."""
    msg = str(e)
    return e if "--vocab" in msg else TokenizerError(f"{msg}; {VOCAB_HINT}")


class Tokenizer(ABC):
    """Text <-> token ids.

    ``encode(str) -> list[int]``; ``decode_bytes(ids) -> bytes`` (exact, may end inside a UTF-8
    character); ``decode(ids) -> str`` (invalid UTF-8 becomes U+FFFD, never an exception).
    ``vocab_size`` is one more than the largest id the tokenizer can produce or decode.
    """

    name: str = "tokenizer"
    vocab_size: int = 0

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""

    @abstractmethod
    def decode_bytes(self, ids) -> bytes:
        """The bytes the token ids stand for, concatenated."""

    def decode(self, ids) -> str:
        """The text the token ids stand for; invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def vocabulary_bytes(self) -> list[bytes]:
        """The bytes of every token id, ``0..vocab_size-1`` (``b""`` for an id that stands for
        no text, such as an end-of-text or padding token): what a byte-level grammar engine
        needs to know which tokens can continue a text."""
        return [self.decode_bytes([i]) for i in range(self.vocab_size)]

    def __repr__(self) -> str:
        return f"<rwkvpy {type(self).__name__} {self.name} vocab={self.vocab_size}>"


def utf8(text, who: str) -> bytes:
    """``text`` as UTF-8; a TokenizerError (naming the position) for a lone surrogate."""
    if not isinstance(text, str):
        raise TokenizerError(f"{who}.encode takes a str, got {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(
            f"{who}.encode: the text is not valid Unicode: {text[e.start]!r} "
            f"(a lone surrogate) at position {e.start}"
        ) from None


def id_list(ids, vocab_size: int, who: str) -> list[int]:
    """``ids`` (a list/tuple of ints, a 1-D tensor or array, or one int) as a list of Python ints
    in ``0..vocab_size-1``; a TokenizerError naming the first bad id otherwise."""
    if hasattr(ids, "tolist"):  # torch.Tensor, numpy array or scalar
        ids = ids.tolist()
    if isinstance(ids, int):
        ids = [ids]
    try:
        out = [operator.index(i) for i in ids]
    except TypeError:
        raise TokenizerError(f"{who}: token ids must be ints, got {ids!r:.80}") from None
    if out and (min(out) < 0 or max(out) >= vocab_size):
        pos, bad = next((p, i) for p, i in enumerate(out) if i < 0 or i >= vocab_size)
        raise TokenizerError(
            f"{who}: token id {bad} at position {pos} is out of range: "
            f"the vocabulary has ids 0..{vocab_size - 1}"
        )
    return out
