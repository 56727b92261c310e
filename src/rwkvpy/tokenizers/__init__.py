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

:func:`tokenizer_for` picks one for a model's vocabulary size; :func:`model_tokenizer` the one of
a model file (its own vocabulary first); :class:`StreamDecoder` decodes tokens as they are
generated without splitting a character. Every error about a missing or unusable vocabulary
names ``--vocab``, the command line's way to give another one.
"""

from __future__ import annotations

import os

from .base import VOCAB_HINT, Tokenizer, TokenizerError, with_hint
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
    "kind_for_vocab_size",
    "model_tokenizer",
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


def _check_fits(tok: Tokenizer, kind: str, vocab_size: int) -> Tokenizer:
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
    return _check_fits(tok, kind, vocab_size)


def _file_vocabulary(model_path, vocab_size: int):
    """(the kind the model file names or None, a function making the tokenizer of the
    vocabulary the file holds or None)."""
    model_path = os.fspath(model_path)
    if os.path.isdir(model_path):  # a Hugging Face folder
        world = os.path.join(model_path, WORLD_VOCAB_FILE)
        if os.path.isfile(world):
            return "world", lambda: WorldTokenizer(world)
        neox = os.path.join(model_path, "tokenizer.json")
        if os.path.isfile(neox) and 50000 <= vocab_size <= 50304:  # as formats.safetensors_io
            return "neox", lambda: NeoXTokenizer(neox)
        return None, None
    try:
        with open(model_path, "rb") as f:
            magic = f.read(4)
    except OSError:
        return None, None
    if magic != b"GGUF":
        return None, None
    from ..formats import gguf

    vocab = gguf.read_vocab(model_path)
    if vocab is None:
        return None, None
    named = vocab.kind or {"rwkv": "world", "gpt2": "neox"}.get(vocab.model)
    if named == "world" and vocab.model == "rwkv" and vocab.tokens:
        where = f"{model_path} (tokenizer.ggml.tokens)"
        return named, lambda: WorldTokenizer(tokens=vocab.token_bytes(), source=where)
    if named == "neox" and vocab.hf_json:
        where = f"{model_path} (tokenizer.huggingface.json)"
        return named, lambda: NeoXTokenizer(json_text=vocab.hf_json, source=where)
    return named, None


def model_tokenizer(model_path, vocab_size: int, kind: str | None = None, path=None) -> Tokenizer:
    """The tokenizer of the model file ``model_path`` (``vocab_size`` logits).

    In order: ``path`` (``--vocab``), a vocabulary file of ``kind``, else of the kind the model
    file names, else of the kind its vocabulary size picks; the vocabulary the model file holds
    (a GGUF's ``tokenizer.ggml.*`` keys, llama.cpp's files included, or rwkvpy's
    ``tokenizer.huggingface.json``; a Hugging Face folder's ``rwkv_vocab_v20230424.txt`` or
    ``tokenizer.json``); the vocabulary rwkvpy ships for the kind the file names
    (``rwkvpy.tokenizer``) or, failing that, for the vocabulary size (:func:`tokenizer_for`).
    A ``kind`` other than the one the file names is a TokenizerError.
    """
    named, stored = _file_vocabulary(model_path, vocab_size)
    if kind is not None and named is not None and kind != named:
        raise TokenizerError(
            f"{os.fspath(model_path)}: the model's file names the {named} tokenizer, not {kind}"
        )
    kind = kind or named
    if path is not None or stored is None:
        return tokenizer_for(vocab_size, kind, path)
    try:
        tok = stored()
    except TokenizerError as e:
        where = os.fspath(model_path)
        raise with_hint(e if where in str(e) else TokenizerError(f"{where}: {e}")) from None
    return _check_fits(tok, kind, vocab_size)
