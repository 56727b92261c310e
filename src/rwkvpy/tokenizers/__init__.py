"""Tokenizers for RWKV models, and streaming UTF-8-safe decoding.

Every tokenizer has ``encode(str) -> list[int]``, ``decode(ids) -> str`` (invalid UTF-8 becomes
U+FFFD), ``decode_bytes(ids) -> bytes``, ``vocab_size`` and ``name``:

- :class:`ByteTokenizer` ("bytes"): token = UTF-8 byte, vocabulary 256;
- :class:`WorldTokenizer` ("world"): the RWKV World tokenizer, from the vocabulary file
  ``rwkv_vocab_v20230424.txt`` (not shipped with rwkvpy: see :func:`default_world_vocab_path`);
- :class:`NeoXTokenizer` ("neox"): a ``tokenizer.json`` (the 20B tokenizer of Pile models)
  through the ``tokenizers`` library.

:func:`tokenizer_for` picks one for a model's vocabulary size; :class:`StreamDecoder` decodes
tokens as they are generated without splitting a character.
"""

from __future__ import annotations

from .base import Tokenizer, TokenizerError
from .byte import ByteTokenizer
from .neox import NeoXTokenizer
from .stream import StreamDecoder
from .world import WORLD_VOCAB_FILE, WorldTokenizer, default_world_vocab_path, read_world_vocab

__all__ = [
    "ByteTokenizer", "NeoXTokenizer", "StreamDecoder", "Tokenizer", "TokenizerError",
    "WORLD_VOCAB_FILE", "WorldTokenizer", "default_world_vocab_path", "read_world_vocab",
    "tokenizer_for",
]

KINDS = ("bytes", "world", "neox")
_BY_SIZE = {256: "bytes", 65536: "world", 50277: "neox", 50304: "neox"}
_WORLD_SIZE = 65530  # ids 0..65529 of rwkv_vocab_v20230424.txt


def tokenizer_for(vocab_size: int, kind: str | None = None, path=None) -> Tokenizer:
    """The tokenizer for a model with ``vocab_size`` logits.

    ``kind``: "bytes", "world" or "neox"; None chooses from the size (256: bytes, 65536: world,
    50277 or 50304: neox). ``path``: the World vocabulary file (default:
    :func:`default_world_vocab_path`) or the NeoX ``tokenizer.json`` (required). A tokenizer
    that can produce ids the model does not have (its ``vocab_size`` is larger than the
    model's) is a TokenizerError naming both sizes.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise TokenizerError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if kind is None:
        kind = _BY_SIZE.get(vocab_size)
        if kind is None:
            raise TokenizerError(
                f"no tokenizer is known for a vocabulary of {vocab_size} tokens (known sizes: "
                f"256 bytes, 65536 world, 50277/50304 neox): pass kind= and path=")
    elif kind not in KINDS:
        raise TokenizerError(f"unknown tokenizer kind {kind!r}: expected one of {', '.join(KINDS)}")
    nominal = {"bytes": 256, "world": _WORLD_SIZE}.get(kind)
    if nominal is not None and nominal > vocab_size:  # fail before reading any file
        raise TokenizerError(f"the {kind} tokenizer (vocab size {nominal}) does not fit a model "
                             f"with vocab size {vocab_size}")
    if kind == "bytes":
        if path is not None:
            raise TokenizerError("the bytes tokenizer takes no path")
        tok: Tokenizer = ByteTokenizer()
    elif kind == "world":
        tok = WorldTokenizer(path)
    else:
        if path is None:
            raise TokenizerError("the neox tokenizer needs the path of its tokenizer.json "
                                 "(for Pile models: 20B_tokenizer.json)")
        tok = NeoXTokenizer(path)
    if tok.vocab_size > vocab_size:
        raise TokenizerError(f"the {kind} tokenizer (vocab size {tok.vocab_size}) does not fit "
                             f"a model with vocab size {vocab_size}")
    return tok
