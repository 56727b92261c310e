"""Token-by-token decoding that never splits a UTF-8 character."""

from __future__ import annotations

import codecs


class StreamDecoder:
    """Turns token ids, fed a few at a time, into text.

    A token may end inside a multi-byte UTF-8 character (World and byte-level tokenizers do
    this for CJK text and emoji): ``feed`` holds back the bytes of an incomplete character until
    the tokens that complete it arrive. Bytes that can never form a valid character come out as
    U+FFFD, never as an exception. ``flush`` ends the stream: held-back bytes of a character that
    never completed come out as U+FFFD. Concatenating every ``feed`` and the ``flush`` gives
    exactly ``tokenizer.decode(all ids)``.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_ids) -> str:
        """Text completed by these tokens (possibly "")."""
        return self._utf8.decode(self.tokenizer.decode_bytes(token_ids))

    def feed_bytes(self, data: bytes) -> str:
        """Like ``feed``, for bytes already decoded from tokens."""
        return self._utf8.decode(data)

    @property
    def pending(self) -> bytes:
        """The held-back bytes of an incomplete character."""
        return self._utf8.getstate()[0]

    def flush(self) -> str:
        """End of stream: the held-back bytes (U+FFFD each invalid run); then start afresh."""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out

    def reset(self) -> None:
        """Drop held-back bytes."""
        self._utf8.reset()
