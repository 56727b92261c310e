"""Byte-level tokenizer: one token per UTF-8 byte (vocabulary 256)."""

from __future__ import annotations

from .base import Tokenizer, id_list, utf8


class ByteTokenizer(Tokenizer):
    """Token id = byte value, as in byte-level models (for example rwkv.cpp's tiny test models)."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(utf8(text, "ByteTokenizer"))

    def decode_bytes(self, ids) -> bytes:
        return bytes(id_list(ids, 256, "ByteTokenizer.decode"))

    def vocabulary_bytes(self) -> list[bytes]:
        return [bytes([i]) for i in range(256)]
