"""GGUF, rwkvpy's native model format, read and written with the ``gguf`` package.

Reading memory-maps the file (``GGUFReader``): float tensors are torch views of the map and
block-quantized ones :class:`QTensor` over it, no copy, except the few small tensors whose
layout has to be undone (transposed LoRA matrices).

RWKV v6 and v7 use llama.cpp's architectures ``rwkv6`` and ``rwkv7``: its metadata keys,
tensor names and layouts, as llama.cpp's ``convert_hf_to_gguf.py`` (``Rwkv6Model``,
``Rwkv7Model``) writes them and ``llama-model.cpp`` loads them. That converter transforms some
tensors; a GGUF written by rwkvpy applies the same transforms and the reader undoes each:

=========================  ===================================  ==================================
BlinkDL (canonical)        GGUF (``blk.N.`` prefix per layer)   transform (PyTorch shape order)
=========================  ===================================  ==================================
``emb.weight``             ``token_embd.weight``                --
``blocks.0.ln0.*``         ``token_embd_norm.*``                --
``blocks.N.ln1.* / ln2.*`` ``attn_norm.* / attn_norm_2.*``      --
``att.key/value/receptance/gate/output.weight``
                           ``time_mix_key/value/receptance/gate/output.weight``
``att.ln_x.*``             ``time_mix_ln.*``                    --
``ffn.key/value/receptance.weight``
                           ``channel_mix_key/value/receptance.weight``
``ln_out.*``               ``output_norm.*``                    --
``head.weight``            ``output.weight``                    --
**v6**
``att.time_maa_x``         ``time_mix_lerp_x.weight``           (1,1,C) -> (C,)
``att.time_maa_w/k/v/r/g`` ``time_mix_lerp_fused.weight``       w,k,v,r,g stacked: (5,1,1,C)
``att.time_maa_w1``        ``time_mix_w1.weight``               (C,5D) -> transposed (5D,C)
``att.time_maa_w2``        ``time_mix_w2.weight``               (5,D,C) -> (5,C,D)
``att.time_decay``         ``time_mix_decay.weight``            (1,1,A) -> (A,)
``att.time_decay_w1/w2``   ``time_mix_decay_w1/w2.weight``      transposed
``att.time_faaaa``         ``time_mix_first.weight``            (H,N)
``ffn.time_maa_k/r``       ``channel_mix_lerp_k/r.weight``      (1,1,C) -> (C,)
**v7**
``att.x_r/w/k/v/a/g``      ``time_mix_lerp_fused.weight``       r,w,k,v,a,g stacked: (6,1,1,C)
``att.w0/a0/v0``           ``time_mix_w0/a0/v0.weight``         (1,1,C) -> (C,)
``att.w1/w2/a1/a2/v1/v2/g1/g2``
                           ``time_mix_w1/.../g2.weight``        transposed
``att.k_k/k_a``            ``time_mix_k_k/k_a.weight``          (1,1,C) -> (C,)
``att.r_k``                ``time_mix_r_k.weight``              (H,N) -> flattened (A,)
``ffn.x_k``                ``channel_mix_lerp_k.weight``        (1,1,C) -> (C,)
=========================  ===================================  ==================================

More of llama.cpp's converter, undone on read:

* v6 ``rwkv6.rescale_every_n_layers = R > 0``: ``time_mix_output`` and ``channel_mix_value`` of
  layer N are divided by ``2 ** (N // R)`` (llama.cpp halves the hidden state every R layers
  instead); the reader multiplies them back (exact: a power of two; quantized tensors get their
  block scales multiplied). rwkvpy writes unscaled weights and ``R = 0``.
* v7 layer 0: BlinkDL's layer-0 ``v0/v1/v2`` are unused; llama.cpp's converter drops them and
  writes copies of ``a0/a1/a2`` in their place (llama.cpp's loader requires them). rwkvpy
  writes the same copies and the reader drops layer 0's ``time_mix_v*``.

RWKV v4 and v5 are not in llama.cpp: rwkvpy writes them as architectures ``rwkv4`` and
``rwkv5`` with the same names where the meaning is the same, and raw parameters (no ``exp``)
squeezed of BlinkDL's leading 1-dimensions:

==========================  ==========================================  ==============================
BlinkDL                     GGUF                                        shape
==========================  ==========================================  ==============================
``att.time_mix_k/v/r/g``    ``blk.N.time_mix_lerp_k/v/r/g.weight``      (C,)
``att.time_decay``          ``blk.N.time_mix_decay.weight``             v4 (A,), v5.0 (H,), v5.2 (H,N)
``att.time_first``          ``blk.N.time_mix_first.weight``             v4 (A,), v5.0 (H,)
``att.time_faaaa``          ``blk.N.time_mix_first.weight``             v5.2 (H,N)
``ffn.time_mix_k/r``        ``blk.N.channel_mix_lerp_k/r.weight``       (C,)
==========================  ==========================================  ==============================

and the rows of the first table for the rest. Keys: ``{arch}.version`` (string: ``"4"``,
``"5.0"`` = v5 without gate, rwkv.cpp's 5.1, ``"5.2"``), ``{arch}.wkv.head_size`` and
``{arch}.attention.group_norm_epsilon`` (v5: 64e-5, BlinkDL's ``ln_x`` eps; rwkv.cpp's own
engine uses 1e-5 for v5, which its ``.bin`` reader reproduces),
``{arch}.context_length``, ``embedding_length``, ``block_count``, ``feed_forward_length``,
``attention.layer_norm_epsilon``, ``attention.head_count`` (0), ``vocab_size``.

Every file rwkvpy writes also holds ``{arch}.vocab_size``, ``rwkvpy.tokenizer`` (``"world"``,
``"neox"`` or ``"bytes"``, when known) and the full vocabulary (:func:`vocab_for_file`), from
whatever source it was converted (a ``.pth``, ``.bin`` or ``.safetensors`` file, a Hugging Face
folder, a GGUF):

* World (RWKV v5-v7): the keys llama.cpp's converter writes for RWKV6/RWKV7
  (``_set_vocab_rwkv_world``): ``tokenizer.ggml.model = "rwkv"``; ``tokenizer.ggml.tokens``,
  one per id up to the model's vocabulary size: id 0 ``<s>`` (CONTROL), each vocabulary token
  as the body of its Python bytes literal (``repr(b)[2:-1]``, NORMAL), and ``[PAD<id>]``
  (UNUSED) for the ids the vocabulary does not define (``[PAD65530]`` .. ``[PAD65535]``);
  ``tokenizer.ggml.token_type``; ``bos_token_id = eos_token_id = 0`` and ``eot_token_id = 261``
  (``"\\n\\n"``); ``tokenizer.chat_template``, the template's text: rwkvpy's
  :data:`WORLD_CHAT_TEMPLATE` (the chat format of :mod:`rwkvpy.chat`), or the source GGUF's.
* NeoX (RWKV-4 Pile, vocabulary 50277 or 50304): ``tokenizer.ggml.model = "gpt2"`` with
  ``tokens`` (the byte-level BPE strings), ``token_type`` (CONTROL for special added tokens,
  USER_DEFINED for the other added ones, ``[PAD<id>]`` UNUSED up to the model's size),
  ``merges``, ``bos/eos_token_id`` (``<|endoftext|>``), and the whole ``tokenizer.json`` as
  ``tokenizer.huggingface.json``, which rwkvpy reads back. llama.cpp has no RWKV-4
  architecture, so no llama.cpp tool loads these files anyway.
* Bytes (vocabulary 256, e.g. rwkv.cpp's tiny models and rwkvpy's demo model): an RWKV
  vocabulary of the 256 single bytes (``tokenizer.ggml.model = "rwkv"``, token ``i`` = byte
  ``i`` escaped as above, all NORMAL, no special ids), plus ``rwkvpy.tokenizer = "bytes"``.
  llama.cpp's RWKV tokenizer matches byte strings greedily, so it tokenizes text into exactly
  the byte ids; rwkvpy reads the ``rwkvpy.tokenizer`` key.
* Unknown (random models of other sizes, no ``--tokenizer``): ``tokenizer.ggml.model = "none"``;
  llama.cpp then makes ``vocab_size`` placeholder tokens: it loads and runs the model on token
  ids, but cannot turn text into tokens.

Reading: :func:`read_vocab` returns those keys;
:func:`rwkvpy.formats.vocabulary.model_tokenizer` builds the tokenizer from them (llama.cpp's own
RWKV files included).

Tensor types read: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0. Types written follow rwkv.cpp's
rules (:mod:`rwkvpy.formats.plan`), which differ from llama.cpp's tools in two places, both
loadable by llama.cpp: v7's ``time_mix_w1/w2`` are F16 in F16 files (llama.cpp's converter keeps
them F32), and v6's ``time_mix_w1``, ``time_mix_decay_w1/w2`` are quantized in quantized files
(``llama-quantize`` keeps them float).
"""

from __future__ import annotations

import codecs
import json
import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import ModelConfig, Version
from ..errors import (
    MissingTensorError,
    ModelFileError,
    TensorShapeError,
    TruncatedFileError,
    UnknownFormatError,
    UnsupportedTensorTypeError,
    UnsupportedVersionError,
)
from .base import Checkpoint, QTensor, to_float32
from .plan import Entry, resolve_shapes, split_name

ARCHITECTURES = {
    Version.V4: "rwkv4",
    Version.V5_0: "rwkv5",
    Version.V5_2: "rwkv5",
    Version.V6: "rwkv6",
    Version.V7: "rwkv7",
}
KEY_VERSION = "{arch}.version"
KEY_TOKENIZER = "rwkvpy.tokenizer"
KEY_GROUP_NORM_EPS = "{arch}.attention.group_norm_epsilon"  # written for rwkv5
GROUP_NORM_EPS = 64e-5  # BlinkDL's ln_x eps (1e-5 * 64); rwkv.cpp computes v5 with 1e-5
TOKENIZERS = ("world", "neox", "bytes")
CONTEXT_LENGTH = 1 << 20  # what llama.cpp's converter writes: RWKV has no context limit
LAYER_NORM_EPS = 1e-5


def _types_read() -> str:
    """The tensor types rwkvpy reads, for error messages: quant's formats (imported when
    needed, as every use of quant here: it compiles numba code)."""
    from ..quant import FORMATS

    return ", ".join(FORMATS)


# File types (llama.cpp's LlamaFileType) of the files rwkvpy writes.
FILE_TYPES = {
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q8_0": 7,
    "Q5_0": 8,
    "Q5_1": 9,
    "BF16": 32,
    "Q4_K": 14,
    "Q4_K_M": 15,
    "Q5_K": 16,
    "Q5_K_M": 17,
    "Q6_K": 18,
}

# -- names and layouts ----------------------------------------------------------------------

SAME, SQUEEZE, FLAT, T, P021 = "same", "squeeze", "flat", "T", "P021"

_GLOBAL = {
    "emb.weight": "token_embd.weight",
    "blocks.0.ln0.weight": "token_embd_norm.weight",
    "blocks.0.ln0.bias": "token_embd_norm.bias",
    "ln_out.weight": "output_norm.weight",
    "ln_out.bias": "output_norm.bias",
    "head.weight": "output.weight",
}

_COMMON = {
    "ln1.weight": ("attn_norm.weight", SAME),
    "ln1.bias": ("attn_norm.bias", SAME),
    "ln2.weight": ("attn_norm_2.weight", SAME),
    "ln2.bias": ("attn_norm_2.bias", SAME),
    "att.key.weight": ("time_mix_key.weight", SAME),
    "att.value.weight": ("time_mix_value.weight", SAME),
    "att.receptance.weight": ("time_mix_receptance.weight", SAME),
    "att.gate.weight": ("time_mix_gate.weight", SAME),
    "att.output.weight": ("time_mix_output.weight", SAME),
    "att.ln_x.weight": ("time_mix_ln.weight", SAME),
    "att.ln_x.bias": ("time_mix_ln.bias", SAME),
    "ffn.key.weight": ("channel_mix_key.weight", SAME),
    "ffn.value.weight": ("channel_mix_value.weight", SAME),
    "ffn.receptance.weight": ("channel_mix_receptance.weight", SAME),
}

_V4V5 = {
    "att.time_mix_k": ("time_mix_lerp_k.weight", SQUEEZE),
    "att.time_mix_v": ("time_mix_lerp_v.weight", SQUEEZE),
    "att.time_mix_r": ("time_mix_lerp_r.weight", SQUEEZE),
    "att.time_mix_g": ("time_mix_lerp_g.weight", SQUEEZE),
    "att.time_decay": ("time_mix_decay.weight", SQUEEZE),
    "att.time_first": ("time_mix_first.weight", SQUEEZE),
    "att.time_faaaa": ("time_mix_first.weight", SQUEEZE),
    "ffn.time_mix_k": ("channel_mix_lerp_k.weight", SQUEEZE),
    "ffn.time_mix_r": ("channel_mix_lerp_r.weight", SQUEEZE),
}

_V6 = {
    "att.time_maa_x": ("time_mix_lerp_x.weight", SQUEEZE),
    "att.time_maa_w1": ("time_mix_w1.weight", T),
    "att.time_maa_w2": ("time_mix_w2.weight", P021),
    "att.time_decay": ("time_mix_decay.weight", SQUEEZE),
    "att.time_decay_w1": ("time_mix_decay_w1.weight", T),
    "att.time_decay_w2": ("time_mix_decay_w2.weight", T),
    "att.time_faaaa": ("time_mix_first.weight", SAME),
    "ffn.time_maa_k": ("channel_mix_lerp_k.weight", SQUEEZE),
    "ffn.time_maa_r": ("channel_mix_lerp_r.weight", SQUEEZE),
}
# unfused lerps: llama.cpp loads them too (its converter writes the fused form)
_V6_UNFUSED = {f"time_mix_lerp_{c}.weight": f"att.time_maa_{c}" for c in "wkvrg"}

_V7 = {
    **{f"att.{p}0": (f"time_mix_{p}0.weight", SQUEEZE) for p in "wav"},
    **{f"att.{p}{i}": (f"time_mix_{p}{i}.weight", T) for p in "wavg" for i in (1, 2)},
    "att.k_k": ("time_mix_k_k.weight", SQUEEZE),
    "att.k_a": ("time_mix_k_a.weight", SQUEEZE),
    "att.r_k": ("time_mix_r_k.weight", FLAT),
    "ffn.x_k": ("channel_mix_lerp_k.weight", SQUEEZE),
}

_RULES = {
    Version.V4: _V4V5,
    Version.V5_0: _V4V5,
    Version.V5_2: _V4V5,
    Version.V6: _V6,
    Version.V7: _V7,
}
_FUSED_NAME = "time_mix_lerp_fused.weight"
MAX_ARRAY_DEPTH = 8  # key-value arrays of arrays, at most this deep
MAX_RESCALE_EXPONENT = 64  # v6 rescaling multiplies a layer by 2^(layer // every), at most this
_FUSED = {
    Version.V6: tuple(f"att.time_maa_{c}" for c in "wkvrg"),
    Version.V7: tuple(f"att.x_{c}" for c in "rwkvag"),
}


def _layer_rules(version):
    rules = dict(_COMMON)
    rules.update(_RULES[version])
    return rules


# -- writing: the plan -----------------------------------------------------------------------


def _transpose(ts):
    return ts[0].transpose(0, 1)


def _permute021(ts):
    return ts[0].permute(0, 2, 1)


def _stack(ts):
    return torch.stack([t.reshape(-1) for t in ts]).reshape(len(ts), 1, 1, -1)


def _entry(gname, cname, kind, shape):
    if kind == T:
        return Entry(gname, (cname,), _transpose)
    if kind == P021:
        return Entry(gname, (cname,), _permute021)
    if kind == FLAT:
        n = 1
        for s in shape:
            n *= s
        return Entry(gname, (cname,), None, shape=(n,))
    if kind == SQUEEZE:
        return Entry(gname, (cname,), None, shape=tuple(s for s in shape if s != 1) or (1,))
    return Entry(gname, (cname,), None)


def gguf_entries(names, shapes: dict, version: Version, cfg: ModelConfig):
    """The tensors of the GGUF file for a checkpoint: (entries, names rwkvpy could not place).

    ``names``: canonical names in the order to write them; ``shapes``: their shapes.
    """
    from .plan import blinkdl_shape

    rules = _layer_rules(version)
    fused_members = _FUSED.get(version, ())
    entries, unknown, fused_done = [], [], set()
    for name in names:
        if name in _GLOBAL:
            entries.append(Entry(_GLOBAL[name], (name,), None))
            continue
        bid, leaf = split_name(name)
        if bid is None:
            unknown.append(name)
            continue
        prefix = f"blocks.{bid}."
        if version is Version.V7 and bid == 0 and leaf in ("att.v0", "att.v1", "att.v2"):
            continue  # unused; replaced by copies of a0/a1/a2 below, as llama.cpp does
        if leaf in fused_members:
            if bid not in fused_done:
                fused_done.add(bid)
                entries.append(
                    Entry(
                        f"blk.{bid}.{_FUSED_NAME}", tuple(prefix + m for m in fused_members), _stack
                    )
                )
            continue
        rule = rules.get(leaf)
        if rule is None:
            unknown.append(name)
            continue
        gleaf, kind = rule
        bshape = blinkdl_shape(version, cfg, name, shapes[name])
        entries.append(_entry(f"blk.{bid}.{gleaf}", name, kind, bshape))
        if version is Version.V7 and bid == 0 and leaf in ("att.a0", "att.a1", "att.a2"):
            dummy = _entry(f"blk.0.time_mix_v{leaf[-1]}.weight", name, kind, bshape)
            dummy.extra["dummy"] = True
            entries.append(dummy)
    resolve_shapes(entries, shapes, version, cfg)
    return entries, unknown


# -- writing: metadata and file ----------------------------------------------------------------


def guess_tokenizer(vocab_size: int) -> str | None:
    """The tokenizer RWKV releases of this vocabulary size use (None when unknown): rwkvpy's one
    table, :data:`rwkvpy.tokenizers.KIND_BY_VOCAB_SIZE`."""
    from ..tokenizers import kind_for_vocab_size

    return kind_for_vocab_size(vocab_size)


#: The chat template written into World GGUFs: the chat format of :mod:`rwkvpy.chat`
#: (``System: ...``, ``User: ...``, ``Assistant: ...``, turns separated by a blank line, and
#: ``Assistant:`` to ask for a reply).
WORLD_CHAT_TEMPLATE = (
    "{%- for message in messages -%}\n"
    "{%- if message['content'] is not none -%}\n"
    "{%- if message['role'] == 'system' -%}\n"
    "{{- 'System: ' + (message['content'] | trim) + '\\n\\n' -}}\n"
    "{%- elif message['role'] == 'user' -%}\n"
    "{{- 'User: ' + (message['content'] | trim) + '\\n\\n' -}}\n"
    "{%- elif message['role'] == 'assistant' -%}\n"
    "{{- 'Assistant: ' + (message['content'] | trim) + '\\n\\n' -}}\n"
    "{%- endif -%}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- 'Assistant:' -}}\n"
    "{%- endif -%}\n"
)
WORLD_SPECIAL = {"bos": 0, "eos": 0, "eot": 261}  # as llama.cpp's converter sets them
KEY_HF_JSON = "tokenizer.huggingface.json"
_SPECIAL_KEYS = ("bos", "eos", "eot", "eom", "unk", "sep", "pad", "mask")

# gguf.TokenType values, without importing gguf at module import
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass
class Vocab:
    """A GGUF file's vocabulary: the values of its ``tokenizer.*`` keys."""

    model: str  # tokenizer.ggml.model: "rwkv", "gpt2", "none"
    tokens: list = field(default_factory=list)  # tokenizer.ggml.tokens as stored (bytes)
    types: list = field(default_factory=list)  # tokenizer.ggml.token_type
    merges: list | None = None  # tokenizer.ggml.merges (bytes)
    special: dict = field(default_factory=dict)  # "bos"/"eos"/"eot"/... -> id
    chat_template: str | None = None
    hf_json: str | None = None  # tokenizer.huggingface.json
    kind: str | None = None  # rwkvpy.tokenizer
    pre: str | None = None  # tokenizer.ggml.pre

    def token_bytes(self) -> list[bytes]:
        """The bytes of each id (``b""`` for control, padding and unused tokens) of an RWKV
        vocabulary; the stored texts of other models."""
        if self.model != "rwkv":
            return list(self.tokens)
        from ..tokenizers.base import TokenizerError

        types = self.types or [NORMAL] * len(self.tokens)
        out = []
        for i, (t, k) in enumerate(zip(self.tokens, types)):
            try:
                out.append(_unescape_token(t) if k == NORMAL else b"")
            except ValueError as e:  # a broken escape: "\\x" without two hex digits, a lone "\\"
                raise TokenizerError(
                    f"tokenizer.ggml.tokens: token {i} ({bytes(t)[:40]!r}) is "
                    f"not an escaped RWKV token: {e}"
                ) from None
        return out


def _escape_token(tok: bytes) -> str:
    # llama.cpp's converter stores each RWKV world token as the body of its Python bytes literal
    return repr(bytes(tok))[2:-1]


def _unescape_token(text: bytes) -> bytes:
    return codecs.escape_decode(bytes(text))[0]


def _pad(texts: list, types: list, vocab_size: int) -> None:
    for i in range(len(texts), vocab_size):  # named by id, as llama.cpp's converter does
        texts.append(f"[PAD{i}]".encode())
        types.append(UNUSED)


def world_vocab(
    tokens, vocab_size: int, *, special: dict | None = None, chat_template: str | None = None
) -> Vocab:
    """llama.cpp's RWKV World vocabulary for a model of ``vocab_size`` logits from ``tokens``:
    bytes per id (index = id; ``b""`` for ids it does not define; id 0 is always ``<s>``)."""
    from ..errors import ConversionError

    tokens = [bytes(t) for t in tokens]
    if len(tokens) > vocab_size:
        raise ConversionError(
            f"the vocabulary has {len(tokens)} tokens, more than the model's {vocab_size}"
        )
    texts, types = [b"<s>"], [CONTROL]
    for i in range(1, len(tokens)):
        if tokens[i]:
            texts.append(_escape_token(tokens[i]).encode("utf-8"))
            types.append(NORMAL)
        else:
            texts.append(f"[PAD{i}]".encode())
            types.append(UNUSED)
    _pad(texts, types, vocab_size)
    sp = dict(WORLD_SPECIAL if special is None else special)
    return Vocab(
        "rwkv",
        texts,
        types,
        special={k: v for k, v in sp.items() if v < vocab_size},
        chat_template=WORLD_CHAT_TEMPLATE if chat_template is None else chat_template,
        kind="world",
    )


def bytes_vocab(vocab_size: int = 256) -> Vocab:
    """The 256 single bytes as an RWKV vocabulary (token i = byte i), padded to ``vocab_size``."""
    texts = [_escape_token(bytes([i])).encode("utf-8") for i in range(256)]
    types = [NORMAL] * 256
    _pad(texts, types, vocab_size)
    return Vocab("rwkv", texts, types, kind="bytes")


def neox_vocab(json_text: str, vocab_size: int) -> Vocab:
    """A ``tokenizer.json`` (the 20B one) as a GPT-2 style GGUF vocabulary, its JSON kept."""
    from tokenizers import Tokenizer as HFTokenizer

    from ..errors import ConversionError

    try:
        tok = HFTokenizer.from_str(json_text)
    except Exception as e:  # the library raises its own Exception type
        raise ConversionError(f"not a tokenizers JSON file: {e}") from None
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise ConversionError(f"the tokenizer has {n} tokens, more than the model's {vocab_size}")
    added = tok.get_added_tokens_decoder()
    texts, types = [], []
    for i in range(n):
        piece = tok.id_to_token(i)
        if piece is None:
            texts.append(f"[PAD{i}]".encode())
            types.append(UNUSED)
            continue
        texts.append(piece.encode("utf-8"))
        a = added.get(i)
        types.append(NORMAL if a is None else CONTROL if a.special else USER_DEFINED)
    _pad(texts, types, vocab_size)
    merges = json.loads(json_text).get("model", {}).get("merges") or []
    merges = [(m if isinstance(m, str) else " ".join(m)).encode("utf-8") for m in merges]
    eot = tok.token_to_id("<|endoftext|>")
    special = {"bos": eot, "eos": eot} if eot is not None else {}
    return Vocab(
        "gpt2", texts, types, merges=merges, special=special, hf_json=json_text, kind="neox"
    )


def vocab_for_file(
    kind: str | None, vocab_size: int, *, tokens=None, vocab_file=None, source: Vocab | None = None
) -> Vocab:
    """The vocabulary to write for a model of ``kind`` (None: unknown) and ``vocab_size``.

    In order: ``tokens`` (World: bytes per id); ``vocab_file`` (a World vocabulary file or a
    ``tokenizer.json``); ``source``, the vocabulary of a source GGUF (its special ids and chat
    template are kept); the files rwkvpy ships.
    """
    from ..errors import ConversionError
    from ..tokenizers import TokenizerError, default_neox_path, default_world_vocab_path
    from ..tokenizers.base import with_hint
    from ..tokenizers.world import read_world_vocab

    try:
        if kind == "world":
            special = template = None
            if (
                tokens is None
                and vocab_file is None
                and source is not None
                and source.tokens
                and source.model == "rwkv"
            ):
                tokens = source.token_bytes()
                special = {**WORLD_SPECIAL, **source.special}
                # a template's name (earlier rwkvpy files wrote "rwkv-world") becomes the text
                template = source.chat_template if source.chat_template != "rwkv-world" else None
            if tokens is None:
                v = read_world_vocab(vocab_file or default_world_vocab_path())
                tokens = [b""] * (max(v) + 1)
                for i, t in v.items():
                    tokens[i] = t
            return world_vocab(tokens, vocab_size, special=special, chat_template=template)
        if kind == "neox":
            if vocab_file is None and source is not None and source.hf_json:
                return neox_vocab(source.hf_json, vocab_size)
            with open(vocab_file or default_neox_path(), encoding="utf-8") as f:
                return neox_vocab(f.read(), vocab_size)
        if kind == "bytes":
            return bytes_vocab(vocab_size)
    except TokenizerError as e:
        raise ConversionError(f"cannot write the {kind} vocabulary: {with_hint(e)}") from None
    except (OSError, ValueError) as e:
        raise ConversionError(
            f"cannot write the {kind} vocabulary: {e}; give the vocabulary file with --vocab PATH"
        ) from None
    if kind is not None:
        raise ConversionError(
            f"unknown tokenizer {kind!r}; expected one of {', '.join(TOKENIZERS)}"
        )
    return Vocab("none")


def _add_vocab(w, vocab: Vocab) -> None:
    import gguf

    if vocab.kind:
        w.add_string(KEY_TOKENIZER, vocab.kind)
    w.add_tokenizer_model(vocab.model)
    if vocab.pre:
        w.add_tokenizer_pre(vocab.pre)
    if vocab.tokens:
        w.add_token_list(vocab.tokens)
        w.add_token_types([gguf.TokenType(t) for t in vocab.types])
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    for name in _SPECIAL_KEYS:
        if name in vocab.special:
            w.add_uint32(f"tokenizer.ggml.{name}_token_id", int(vocab.special[name]))
    if vocab.chat_template is not None:
        w.add_chat_template(vocab.chat_template)
    if vocab.hf_json is not None:
        w.add_string(KEY_HF_JSON, vocab.hf_json)


def _add_metadata(w, version, cfg, shapes, file_type, vocab, name):
    import gguf

    arch = ARCHITECTURES[version]
    C = cfg.n_embd
    w.add_type("model")
    if name:
        w.add_name(name)
    w.add_context_length(CONTEXT_LENGTH)
    w.add_embedding_length(C)
    w.add_block_count(cfg.n_layer)
    w.add_layer_norm_eps(LAYER_NORM_EPS)
    w.add_feed_forward_length(cfg.n_ffn)
    w.add_vocab_size(cfg.vocab_size)
    if version is Version.V6:
        w.add_rescale_every_n_layers(0)
        w.add_wkv_head_size(cfg.head_size)
        w.add_time_mix_extra_dim(int(shapes["blocks.0.att.time_maa_w1"][-1]) // 5)
        w.add_time_decay_extra_dim(int(shapes["blocks.0.att.time_decay_w1"][-1]))
    elif version is Version.V7:
        w.add_wkv_head_size(cfg.head_size)
        iclr = int(shapes["blocks.0.att.a1"][-1])
        w.add_decay_lora_rank(int(shapes["blocks.0.att.w1"][-1]))
        w.add_iclr_lora_rank(iclr)
        v1 = shapes.get("blocks.1.att.v1")
        w.add_value_residual_mix_lora_rank(int(v1[-1]) if v1 is not None else iclr)
        w.add_gate_lora_rank(int(shapes["blocks.0.att.g1"][-1]))
    else:
        w.add_string(KEY_VERSION.format(arch=arch), version.value)
        if version.has_heads:
            w.add_wkv_head_size(cfg.head_size)
            w.add_float32(KEY_GROUP_NORM_EPS.format(arch=arch), GROUP_NORM_EPS)
    w.add_file_type(FILE_TYPES[file_type])
    w.add_head_count(0)  # required by llama.cpp, unused
    _add_vocab(w, vocab if vocab is not None else vocab_for_file(None, cfg.vocab_size))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write(
    path,
    version: Version,
    cfg: ModelConfig,
    entries,
    chunks,
    *,
    shapes: dict,
    file_type: str,
    vocab: Vocab | None = None,
    name: str | None = None,
    on_bytes=None,
) -> None:
    """Write a GGUF file atomically (temp file, then rename), streaming the tensor data.

    entries: resolved :class:`Entry` list with types; chunks: one iterable of uint8 arrays per
    entry, in order (produced lazily: only the current tensor is in memory); vocab: the
    vocabulary (:func:`vocab_for_file`; None: unknown, ``tokenizer.ggml.model = "none"``).
    """
    import gguf

    from ..quant import get_format
    from .atomic import atomic_path

    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, ARCHITECTURES[version])
        try:
            _add_metadata(w, version, cfg, shapes, file_type, vocab, name)
            sizes = []
            for e in entries:
                nbytes = get_format(e.type).nbytes(e.shape)
                sizes.append(nbytes)
                w.add_tensor_info(
                    e.name,
                    e.shape,
                    np.dtype(np.float32),
                    nbytes,
                    raw_dtype=gguf.GGMLQuantizationType[e.type],
                )
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            f = w.fout[0]
            align = w.data_alignment
            for e, nbytes, parts in zip(entries, sizes, chunks):
                f.write(b"\0" * (-f.tell() % align))
                done = 0
                for part in parts:
                    f.write(np.ascontiguousarray(part).data.cast("B"))
                    done += part.nbytes
                    if on_bytes:
                        on_bytes(part.nbytes)
                if done != nbytes:  # a bug, never user input
                    raise AssertionError(f"{e.name}: wrote {done} bytes, expected {nbytes}")
                f.write(b"\0" * (-nbytes % align))
            f.flush()
        finally:
            w.close()


# -- reading ----------------------------------------------------------------------------------

_READER = None


def _reader_class():
    """gguf.GGUFReader, with arrays (a vocabulary: 65536 tokens and their types) parsed in one
    pass: the library takes two memory-map slices per element, seconds for a World vocabulary,
    on every load. The fields are the same (same parts, indices and types); anything but an
    array of strings or scalars in the host's byte order goes to the library's own code."""
    global _READER
    if _READER is not None:
        return _READER
    import gguf

    base = gguf.GGUFReader
    vt = gguf.GGUFValueType
    scalars = getattr(base, "gguf_scalar_to_np", None)

    class Reader(base):
        _depth = 0

        def _get_field_parts(self, orig_offs, raw_type):
            if raw_type == vt.ARRAY:  # before any array is parsed: its count against the file
                self._check_array(orig_offs)
                self._depth += 1
                try:
                    return self._array_parts(orig_offs, raw_type)
                finally:
                    self._depth -= 1
            return super()._get_field_parts(orig_offs, raw_type)

        def _check_array(self, offs):
            """An array's item count times its smallest item size must fit in the bytes left
            (one announcing 2^40 items once took half a minute and 664 MB to fail), and arrays
            nest at most MAX_ARRAY_DEPTH deep (2,000 deep once hit the recursion limit)."""
            if self._depth >= MAX_ARRAY_DEPTH:
                raise ValueError(f"arrays nested more than {MAX_ARRAY_DEPTH} deep")
            itype, n = self._get(offs, np.uint32), self._get(offs + 4, np.uint64)
            if len(itype) != 1 or len(n) != 1:
                raise IndexError("array header past the end of the file")
            itype, n = int(itype[0]), int(n[0])
            scalar = scalars.get(itype) if scalars is not None else None
            least = {int(vt.STRING): 8, int(vt.ARRAY): 12}.get(
                itype, np.dtype(scalar).itemsize if scalar is not None else 1
            )
            left = len(self.data) - offs - 12
            if n * least > left:
                raise IndexError(
                    f"an array of {n} items needs at least {n * least} bytes, "
                    f"{max(0, left)} are left"
                )

        def _array_parts(self, orig_offs, raw_type):
            if self.byte_order != "I" or scalars is None or sys.byteorder != "little":
                return super()._get_field_parts(orig_offs, raw_type)
            plain = self.data.view(np.ndarray)
            raw_itype = plain[orig_offs : orig_offs + 4].view(np.uint32)
            alen = plain[orig_offs + 4 : orig_offs + 12].view(np.uint64)
            if len(raw_itype) != 1 or len(alen) != 1:
                return super()._get_field_parts(orig_offs, raw_type)
            itype, n = int(raw_itype[0]), int(alen[0])
            offs = orig_offs + 12
            parts = [raw_itype, alen]
            if itype == vt.STRING:
                buf = memoryview(plain)
                end = len(plain)
                for _ in range(n):
                    k = int.from_bytes(buf[offs : offs + 8], "little")
                    if offs + 8 + k > end:
                        raise IndexError("string past the end of the file")
                    parts.append(plain[offs : offs + 8].view(np.uint64))
                    parts.append(plain[offs + 8 : offs + 8 + k])
                    offs += 8 + k
                idxs = list(range(3, 2 + 2 * n + 1, 2))
            elif itype in (int(t) for t in scalars):
                dtype = np.dtype(scalars[vt(itype)])
                vals = plain[offs : offs + n * dtype.itemsize]
                if len(vals) != n * dtype.itemsize:
                    raise IndexError("array past the end of the file")
                parts += list(vals.view(dtype).reshape(n, 1))
                offs += n * dtype.itemsize
                idxs = list(range(2, 2 + n))
            else:
                return super()._get_field_parts(orig_offs, raw_type)
            types = [vt.ARRAY] + ([vt(itype)] if n else [])
            return offs - orig_offs, parts, idxs, types

    _READER = Reader
    return Reader


def _open(path):
    try:
        return _reader_class()(path, "c")
    except ValueError as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "GGMLQuantizationType" in msg:
            raise UnsupportedTensorTypeError(
                path,
                f"a tensor has an unknown ggml type ({msg}); rwkvpy reads " + _types_read(),
            ) from None
        if "magic" in msg:
            raise UnknownFormatError(path, f"not a GGUF file ({msg})") from None
        if "version" in msg:
            raise UnsupportedVersionError(path, msg) from None
        raise TruncatedFileError(
            path, f"cannot read the GGUF file (truncated or corrupt?): {msg[:200]}"
        ) from None
    except (IndexError, OverflowError, KeyError, EOFError) as e:
        raise TruncatedFileError(
            path,
            f"cannot read the GGUF file (truncated or corrupt?): "
            f"{type(e).__name__}: {str(e)[:200]}",
        ) from None
    except Exception as e:  # noqa: BLE001 - whatever else the library raises on a corrupt file
        raise TruncatedFileError(
            path, f"cannot read the GGUF file (corrupt?): {type(e).__name__}: {str(e)[:200]}"
        ) from None


def _value(reader, key, default=None):
    field = reader.get_field(key)
    if field is None:
        return default
    try:
        return field.contents()
    except Exception as e:  # noqa: BLE001 - a string that is not UTF-8, a truncated value
        raise UnknownFormatError(
            getattr(reader.data, "filename", None) or "<gguf>",
            f"GGUF key '{key}' cannot be read: {type(e).__name__}: {str(e)[:120]}",
        ) from None


def _meta(path, reader, key, kind, default=None, lo=None):
    """A metadata value checked for its type: ``str``, ``int`` (not a bool) or ``float`` (a
    finite number), and at least ``lo``; UnknownFormatError naming the key otherwise."""
    v = _value(reader, key)
    if v is None:
        return default
    if kind is str:
        ok = isinstance(v, str)
    elif kind is int:
        ok = isinstance(v, int) and not isinstance(v, bool)
    else:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or (lo is not None and v < lo):
        shown = repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."
        raise UnknownFormatError(
            path,
            f"GGUF key '{key}' is {shown}, expected "
            + {str: "a string", int: "an integer", float: "a finite number"}[kind]
            + (f" >= {lo}" if lo is not None else ""),
        )
    return v


def read_metadata(path) -> dict:
    """Every GGUF key -> value (the token arrays and the tokenizer.json text left out), without
    mapping tensors."""
    reader = _open(os.fspath(path))
    out = {}
    for key, fld in reader.fields.items():
        if (
            key.startswith("GGUF.")
            or key == KEY_HF_JSON
            or key.startswith("tokenizer.ggml.")
            and key.endswith(("tokens", "token_type", "scores", "merges"))
        ):
            continue
        out[key] = fld.contents()
    return out


def _strings(field) -> list[bytes]:
    return [field.parts[i].tobytes() for i in field.data]


def read_vocab(path) -> Vocab | None:
    """The vocabulary stored in a GGUF file (None when it has no ``tokenizer.ggml.model``)."""
    reader = _open(os.fspath(path))
    model = _value(reader, "tokenizer.ggml.model")
    if model is None:
        return None
    f = reader.get_field("tokenizer.ggml.tokens")
    tokens = _strings(f) if f is not None else []
    f = reader.get_field("tokenizer.ggml.token_type")
    types = [int(t) for t in f.contents()] if f is not None else []
    f = reader.get_field("tokenizer.ggml.merges")
    merges = _strings(f) if f is not None else None
    special = {}
    for name in _SPECIAL_KEYS:
        v = _value(reader, f"tokenizer.ggml.{name}_token_id")
        if v is not None:
            special[name] = int(v)
    return Vocab(
        str(model),
        tokens,
        types,
        merges,
        special,
        chat_template=_value(reader, "tokenizer.chat_template"),
        hf_json=_value(reader, KEY_HF_JSON),
        kind=_value(reader, KEY_TOKENIZER),
        pre=_value(reader, "tokenizer.ggml.pre"),
    )


def read_tokens(path) -> list[bytes] | None:
    """The vocabulary stored in a GGUF file as bytes per token id (None when it holds none).

    For an RWKV vocabulary (``tokenizer.ggml.model = "rwkv"``) the escaped texts are decoded
    back to bytes; control and padding tokens give ``b""``.
    """
    vocab = read_vocab(path)
    if vocab is None or not vocab.tokens:
        return None
    return vocab.token_bytes()


def _version(path, reader, arch) -> Version:
    if arch == "rwkv6":
        return Version.V6
    if arch == "rwkv7":
        return Version.V7
    if arch == "rwkv4":
        return Version.V4
    if arch == "rwkv5":
        v = _meta(path, reader, KEY_VERSION.format(arch=arch), str)
        if v in ("5.0", "5.2"):
            return Version.V5_0 if v == "5.0" else Version.V5_2
        if v is not None:
            raise UnsupportedVersionError(
                path, f"'{KEY_VERSION.format(arch=arch)}' is {v!r}, expected '5.0' or '5.2'"
            )
        names = {t.name for t in reader.tensors}
        return Version.V5_2 if "blk.0.time_mix_gate.weight" in names else Version.V5_0
    raise UnsupportedVersionError(
        path,
        f"GGUF architecture '{arch}' is not one rwkvpy runs; expected rwkv4, rwkv5, rwkv6 or rwkv7",
    )


def _tensor(path, reader, t):
    """A GGUF tensor as a torch view (float types) or QTensor (block types), PyTorch order."""
    from ..quant import FORMATS

    fmt = t.tensor_type.name
    if fmt not in FORMATS:
        raise UnsupportedTensorTypeError(
            path, f"tensor '{t.name}' has type {fmt}; rwkvpy reads " + _types_read()
        )
    shape = tuple(int(s) for s in reversed(t.shape.tolist()))
    # offset and size in Python ints: the library's numpy uint64 sums wrap around (an offset of
    # 2^64 - 1 would point at the byte before the data: a model that loads with NaN logits)
    start = int(reader.data_offset) + int(t.field.parts[-1][0])
    n_bytes = FORMATS[fmt].nbytes(shape) if all(d > 0 for d in shape) else 0
    if n_bytes == 0 or start + n_bytes > reader.data.size:
        raise TruncatedFileError(
            path,
            f"tensor '{t.name}' ({fmt}, shape {shape}) needs "
            f"{n_bytes} bytes at offset {start}, the file has "
            f"{max(0, reader.data.size - start)} left",
        )
    raw = reader.data[start : start + n_bytes]
    if fmt == "F32":
        return torch.from_numpy(raw.view(np.float32)).view(shape), fmt
    if fmt == "F16":
        return torch.from_numpy(raw.view(np.float16)).view(shape), fmt
    if fmt == "BF16":
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).view(shape), fmt
    return QTensor(fmt, shape, raw), fmt


def _rescaled(t, factor: float):
    """t * factor for a power of two, exactly; quantized tensors keep their type (block
    scales multiplied) unless that overflows float16."""
    if factor == 1:
        return t
    if isinstance(t, QTensor):
        from ..quant import get_format

        fmt = get_format(t.fmt)
        rec = np.array(np.asarray(t.data).view(fmt.block_dtype))  # a copy
        with np.errstate(over="ignore"):
            for fld in ("d", "m", "dmin"):  # every float16 factor of the weights
                if fld in rec.dtype.names:
                    rec[fld] = rec[fld] * np.float16(factor)
        if all(np.isfinite(rec[f]).all() for f in ("d", "m", "dmin") if f in rec.dtype.names):
            return QTensor(t.fmt, t.shape, rec.view(np.uint8).reshape(-1))
        return to_float32(t) * factor
    if t.dtype == torch.float32:
        return t * factor
    out = t * factor
    return out if torch.isfinite(out).all() else t.float() * factor


def read(path) -> Checkpoint:
    path = os.fspath(path)
    reader = _open(path)
    arch = _meta(path, reader, "general.architecture", str)
    if arch is None:
        raise UnknownFormatError(path, "GGUF file without 'general.architecture'")
    version = _version(path, reader, arch)
    head_size = _meta(path, reader, f"{arch}.wkv.head_size", int, lo=1)
    rescale = _meta(path, reader, f"{arch}.rescale_every_n_layers", int, 0, lo=0)

    inv_layer = {g: (c, kind) for c, (g, kind) in _layer_rules(version).items()}
    if version is Version.V6:
        inv_layer.update({g: (c, SQUEEZE) for g, c in _V6_UNFUSED.items()})
    if version in (Version.V4, Version.V5_0):  # time_mix_first is time_first there
        inv_layer["time_mix_first.weight"] = ("att.time_first", SQUEEZE)
    inv_global = {g: c for c, g in _GLOBAL.items()}
    fused_members = _FUSED.get(version, ())

    tensors, types = {}, {}

    def put(name, value, fmt):
        tensors[name] = value
        types[name] = fmt

    def put_layer(t, bid, gleaf, value, fmt):
        prefix = f"blocks.{bid}."
        if (
            version is Version.V7
            and bid == 0
            and gleaf in ("time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight")
        ):
            return  # copies of a0/a1/a2 (see the module docstring)
        if gleaf == _FUSED_NAME and fused_members:
            n = math.prod(value.shape)
            if n % len(fused_members):
                raise TensorShapeError(
                    path,
                    f"tensor '{t.name}' has shape {tuple(value.shape)}: "
                    f"{n} values do not split into {len(fused_members)} mixes",
                )
            f = to_float32(value) if isinstance(value, QTensor) else value
            f = f.reshape(len(fused_members), -1)
            for j, m in enumerate(fused_members):
                put(prefix + m, f[j], fmt)
            return
        rule = inv_layer.get(gleaf)
        if rule is None:
            put(t.name, value, fmt)
            return
        cleaf, kind = rule
        if kind in (T, P021) and len(value.shape) != (2 if kind == T else 3):
            raise TensorShapeError(
                path,
                f"tensor '{t.name}' has shape {tuple(value.shape)}, "
                f"expected {2 if kind == T else 3} dimensions",
            )
        if (
            kind in (T, P021)
            and version in (Version.V6, Version.V7)
            and not isinstance(value, QTensor)
        ):  # LoRAs: views, in the file's dtype
            value = value.transpose(0, 1) if kind == T else value.permute(0, 2, 1)
        elif kind in (T, P021):
            value = to_float32(value)
            value = (value.transpose(0, 1) if kind == T else value.permute(0, 2, 1)).contiguous()
        elif kind == FLAT and version is Version.V7 and cleaf == "att.r_k":
            if not head_size:
                raise UnknownFormatError(path, f"GGUF key '{arch}.wkv.head_size' is missing")
            n = math.prod(value.shape)
            if n % head_size:
                raise TensorShapeError(
                    path,
                    f"tensor '{t.name}' has {n} values, not heads of "
                    f"'{arch}.wkv.head_size' = {head_size}",
                )
            if isinstance(value, QTensor):
                value = to_float32(value)
            value = value.reshape(-1, head_size)
        if rescale > 0 and cleaf in ("att.output.weight", "ffn.value.weight"):
            k = bid // rescale
            if k > MAX_RESCALE_EXPONENT:
                raise UnknownFormatError(
                    path,
                    f"tensor '{t.name}': rescaling every {rescale} "
                    f"layers would multiply it by 2^{k} (corrupt file?)",
                )
            value = _rescaled(value, float(2**k))
        put(prefix + cleaf, value, fmt)

    for t in reader.tensors:
        value, fmt = _tensor(path, reader, t)
        if t.name in inv_global:
            put(inv_global[t.name], value, fmt)
            continue
        parts = t.name.split(".", 2)
        if (
            len(parts) < 3 or parts[0] != "blk" or not parts[1].isascii() or not parts[1].isdigit()
        ):  # ASCII digits only: str.isdigit() takes "²"
            put(t.name, value, fmt)  # not an RWKV tensor: kept under its GGUF name
            continue
        bid = int(parts[1])
        if bid >= len(reader.tensors):  # each layer holds tensors: a larger number is corrupt
            raise UnknownFormatError(
                path, f"tensor '{t.name}': layer {bid} in a file of {len(reader.tensors)} tensors"
            )
        try:
            put_layer(t, bid, parts[2], value, fmt)
        except (RuntimeError, IndexError, ValueError) as e:  # a shape no rule takes
            if isinstance(e, ModelFileError):
                raise
            raise TensorShapeError(
                path,
                f"tensor '{t.name}' has shape {tuple(value.shape)}, "
                f"which its rule cannot take ({str(e)[:120]})",
            ) from None

    if "emb.weight" not in tensors:
        raise MissingTensorError(path, "tensor 'token_embd.weight' not found: not an RWKV model")
    tokenizer = _meta(path, reader, KEY_TOKENIZER, str)
    if tokenizer is None:
        model = _meta(path, reader, "tokenizer.ggml.model", str)
        tokenizer = {"rwkv": "world", "gpt2": "neox"}.get(model)
    meta = {"gguf_version": int(_value(reader, "GGUF.version", 3)), "architecture": arch}
    ftype = _meta(path, reader, "general.file_type", int)
    if ftype is not None:
        names = {v: k for k, v in FILE_TYPES.items()}
        meta["file_type"] = names.get(ftype, ftype)
    if tokenizer:
        meta["tokenizer"] = tokenizer
    tok_field = reader.get_field("tokenizer.ggml.tokens")
    if tok_field is not None:
        meta["n_tokens"] = len(tok_field.data)
    vocab = _meta(path, reader, f"{arch}.vocab_size", int, lo=0)
    if vocab is not None:
        meta["vocab_size"] = vocab
    if rescale:
        meta["rescale_every_n_layers"] = rescale
    name = _meta(path, reader, "general.name", str)
    if name:
        meta["name"] = name
    eps = _meta(path, reader, KEY_GROUP_NORM_EPS.format(arch=arch), float)
    if eps is not None and not 0 < eps < 1:  # a norm's epsilon: NaN or 0 gives NaN logits
        raise UnknownFormatError(
            path,
            f"GGUF key '{KEY_GROUP_NORM_EPS.format(arch=arch)}' is "
            f"{eps}, expected a small number > 0",
        )
    return Checkpoint(
        path=path,
        format="gguf",
        tensors=tensors,
        file_types=types,
        file_size=os.path.getsize(path),
        meta=meta,
        ln_x_eps=float(eps) if eps is not None and version.has_heads else None,
    )
