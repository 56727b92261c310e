"""Tokenizers for RWKV models, and streaming UTF-8-safe decoding.

Every tokenizer has ``encode(str) -> list[int]``, ``decode(ids) -> str`` (invalid UTF-8 becomes
U+FFFD), ``decode_bytes(ids) -> bytes``, ``vocab_size`` and ``name``:

- :class:`ByteTokenizer` ("bytes"): token = UTF-8 byte, vocabulary 256;
- :class:`WorldTokenizer` ("world"): the RWKV World tokenizer, from the vocabulary file
  ``rwkv_vocab_v20230424.txt`` or a model file's token list;
- :class:`NeoXTokenizer` ("neox"): a ``tokenizer.json`` (the 20B tokenizer of Pile models)
  through the ``tokenizers`` library.

rwkvpy ships both vocabularies in ``rwkvpy/tokenizers/data/`` (see the README there), so they
work with no file argument:

- ``rwkv_vocab_v20230424.txt``: the RWKV World vocabulary by Bo Peng (BlinkDL), distributed
  with ChatRWKV and BlinkDL's ``rwkv`` package (Apache-2.0) and with rwkv.cpp (MIT);
- ``20B_tokenizer.json``: EleutherAI's GPT-NeoX-20B tokenizer (Apache-2.0), distributed with
  ChatRWKV and rwkv.cpp.

:func:`tokenizer_for` picks one for a model's vocabulary size
(:func:`rwkvpy.formats.vocabulary.model_tokenizer` the one of a model file, its own vocabulary
first); :class:`StreamDecoder` decodes tokens as they are
generated without splitting a character. Every error about a missing or unusable vocabulary
names ``--vocab``, the command line's way to give another one.
"""

from __future__ import annotations

from .base import VOCAB_HINT, Tokenizer, TokenizerError
from .byte import ByteTokenizer
from .neox import NEOX_TOKENIZER_FILE, NeoXTokenizer, default_neox_path
from .stream import StreamDecoder
from .world import WORLD_VOCAB_FILE, WorldTokenizer, default_world_vocab_path, read_world_vocab

__all__ = [
    "ByteTokenizer",
    "KIND_BY_VOCAB_SIZE",
    "NEOX_TOKENIZER_FILE",
    "NeoXTokenizer",
    "StreamDecoder",
    "Tokenizer",
    "TokenizerError",
    "WORLD_VOCAB_FILE",
    "WorldTokenizer",
    "default_neox_path",
    "default_world_vocab_path",
    "check_fits",
    "kind_for_vocab_size",
    "read_world_vocab",
    "tokenizer_for",
]

KINDS = ("bytes", "world", "neox")
#: The tokenizer RWKV releases of each vocabulary size (logits) use: rwkvpy's one table.
KIND_BY_VOCAB_SIZE = {256: "bytes", 50277: "neox", 50304: "neox", 65536: "world"}
_BY_SIZE = KIND_BY_VOCAB_SIZE  # the name the command line's info uses
_WORLD_SIZE = 65530  # ids 0..65529 of rwkv_vocab_v20230424.txt


def kind_for_vocab_size(vocab_size: int) -> str | None:
    """ "bytes", "world" or "neox" for a vocabulary size of RWKV's releases, else None."""
    return KIND_BY_VOCAB_SIZE.get(int(vocab_size))


def _sizes() -> str:
    by_kind: dict = {}
    for n, k in KIND_BY_VOCAB_SIZE.items():
        by_kind.setdefault(k, []).append(str(n))
    return ", ".join(f"{'/'.join(ns)} {k}" for k, ns in by_kind.items())


def check_fits(tok: Tokenizer, kind: str, vocab_size: int) -> Tokenizer:
    """``tok``, unless it can produce ids a model of ``vocab_size`` logits does not have."""
    if tok.vocab_size > vocab_size:
        raise TokenizerError(
            f"the {kind} tokenizer (vocab size {tok.vocab_size}) does not fit "
            f"a model with vocab size {vocab_size}; {VOCAB_HINT}"
        )
    return tok


def tokenizer_for(vocab_size: int, kind: str | None = None, path=None) -> Tokenizer:
    """The tokenizer for a model with ``vocab_size`` logits.

    ``kind``: "bytes", "world" or "neox"; None chooses from the size (:data:`KIND_BY_VOCAB_SIZE`:
    256 bytes, 65536 world, 50277 or 50304 neox). ``path``: the World vocabulary file or the
    NeoX ``tokenizer.json`` (default: the ones rwkvpy ships). A tokenizer that can produce ids
    the model does not have (its ``vocab_size`` is larger than the model's) is a TokenizerError
    naming both sizes.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise TokenizerError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if kind is None:
        kind = KIND_BY_VOCAB_SIZE.get(vocab_size)
        if kind is None:
            raise TokenizerError(
                f"no tokenizer is known for a vocabulary of {vocab_size} tokens (known sizes: "
                f"{_sizes()}): choose one with --tokenizer KIND and {VOCAB_HINT} "
                f"(Python: kind=, path=)"
            )
    elif kind not in KINDS:
        raise TokenizerError(f"unknown tokenizer kind {kind!r}: expected one of {', '.join(KINDS)}")
    nominal = {"bytes": 256, "world": _WORLD_SIZE}.get(kind)
    if nominal is not None and nominal > vocab_size:  # fail before reading any file
        raise TokenizerError(
            f"the {kind} tokenizer (vocab size {nominal}) does not fit a model "
            f"with vocab size {vocab_size}"
        )
    if kind == "bytes":
        if path is not None:
            raise TokenizerError("the bytes tokenizer takes no vocabulary file (--vocab)")
        tok: Tokenizer = ByteTokenizer()
    elif kind == "world":
        tok = WorldTokenizer(path)
    else:
        tok = NeoXTokenizer(path)
    return check_fits(tok, kind, vocab_size)
