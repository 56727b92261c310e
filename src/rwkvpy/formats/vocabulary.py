"""The tokenizer of a model file: the vocabulary the file holds, else the one it names.

Above :mod:`rwkvpy.tokenizers` (which knows vocabularies, not files) because it reads the
model file: a GGUF's ``tokenizer.*`` keys (:func:`rwkvpy.formats.gguf.read_vocab`), a Hugging
Face folder's vocabulary files.
"""

from __future__ import annotations

import os

from ..tokenizers import (
    WORLD_VOCAB_FILE,
    NeoXTokenizer,
    Tokenizer,
    TokenizerError,
    WorldTokenizer,
    check_fits,
    tokenizer_for,
)
from ..tokenizers.base import with_hint
from . import gguf


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
    return check_fits(tok, kind, vocab_size)
