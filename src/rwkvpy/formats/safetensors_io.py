"""``.safetensors`` files and Hugging Face model folders, mapped to BlinkDL's tensor names.

Safetensors files are read with the ``safetensors`` library (``safe_open``, framework ``pt``):
memory-mapped, and never through pickle. Three namings are recognised from the tensor names:

* BlinkDL's own (``emb.weight``, ``blocks.N.att.*``): taken as is;
* transformers' RWKV (``RwkvForCausalLM``, RWKV-4; also the RWKV-5/6 ports that share its
  naming): ``rwkv.embeddings`` -> ``emb``, ``rwkv.blocks.0.pre_ln`` -> ``blocks.0.ln0``,
  ``attention`` -> ``att``, ``feed_forward`` -> ``ffn``, ``time_mix_key/value/receptance/gate``
  -> ``time_mix_k/v/r/g``, ``rwkv.ln_out`` -> ``ln_out``; ``head`` stays. transformers stores
  these weights unscaled: its ``rescale_every`` only divides them at inference time (in eval
  mode) while halving the hidden state, which leaves the outputs unchanged, so it is recorded
  in ``meta`` and nothing is undone;
* flash-linear-attention's RWKV-7 (``RWKV7ForCausalLM`` of the fla-hub models, ``fla/models/
  rwkv7``): ``model.embeddings`` -> ``emb``, ``model.layers.0.pre_norm`` -> ``blocks.0.ln0``,
  ``attn_norm``/``ffn_norm`` -> ``ln1``/``ln2``, ``attn.x_r..x_g`` (or the older fused
  ``attn.x_x``) -> ``att.x_*``, ``attn.k_k/k_a/r_k`` -> ``att.k_k/k_a/r_k``,
  ``attn.r_proj/k_proj/v_proj/o_proj`` -> ``att.receptance/key/value/output``,
  ``attn.{w,a,v,g}_lora.lora.0.weight`` -> ``att.{w,a,v,g}1`` (transposed: fla stores
  ``nn.Linear`` weights), ``lora.2.weight`` -> ``att.*2`` (transposed), ``lora.2.bias`` ->
  ``att.w0/a0/v0``, ``attn.g_norm`` -> ``att.ln_x``, ``ffn.x_k/key/value`` -> ``ffn.*``,
  ``model.norm`` -> ``ln_out``, ``lm_head`` -> ``head``. BlinkDL-style leaves under
  ``model.layers.N.attn.`` (``w0``, ``w1``...) are taken in BlinkDL's orientation, as
  llama.cpp's converter does.

A Hugging Face folder is ``config.json`` plus ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``, or any ``*.safetensors``), or ``pytorch_model.bin``
(read with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import glob
import json
import os
import re

import torch

from ..errors import (
    MissingTensorError,
    NotAStateDictError,
    TruncatedFileError,
    UnknownFormatError,
    UnsupportedVersionError,
)
from .atomic import require_regular
from .base import Checkpoint, type_name

_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _load_safetensors(path) -> dict:
    from safetensors import safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as f:
            out = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError for bad files
        if isinstance(e, (MemoryError, KeyboardInterrupt)):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TruncatedFileError(
            path, f"cannot read the safetensors file (truncated or corrupt?): {msg[:200]}"
        ) from None
    for k, v in out.items():
        if v.dtype not in _FLOAT:
            raise NotAStateDictError(
                path, f"tensor '{k}' has dtype {v.dtype}, expected float32, float16 or bfloat16"
            )
    return out


# -- name mapping ------------------------------------------------------------------------------

_HF_LEAF = {
    "time_mix_key": "time_mix_k",
    "time_mix_value": "time_mix_v",
    "time_mix_receptance": "time_mix_r",
    "time_mix_gate": "time_mix_g",
}


def _from_transformers(name: str) -> str:
    if name.startswith("rwkv."):
        name = name[len("rwkv.") :]
    if name.startswith("embeddings."):
        return "emb." + name[len("embeddings.") :]
    name = name.replace("blocks.0.pre_ln.", "blocks.0.ln0.")
    name = name.replace(".attention.", ".att.").replace(".feed_forward.", ".ffn.")
    head, _, leaf = name.rpartition(".")
    return f"{head}.{_HF_LEAF.get(leaf, leaf)}" if head else name


_FLA_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_FLA_PROJ = {"r_proj": "receptance", "k_proj": "key", "v_proj": "value", "o_proj": "output"}


def _from_fla(tensors: dict, path) -> dict:
    out = {}
    for name, t in tensors.items():
        if name == "model.embeddings.weight":
            out["emb.weight"] = t
            continue
        if name.startswith("model.norm."):
            out["ln_out." + name.split(".")[-1]] = t
            continue
        if name == "lm_head.weight":
            out["head.weight"] = t
            continue
        m = _FLA_LAYER.match(name)
        if not m:
            out[name] = t
            continue
        bid, rest = m.group(1), m.group(2)
        p = f"blocks.{bid}."
        parts = rest.split(".")
        if parts[0] in ("pre_norm", "attn_norm", "ffn_norm") and len(parts) == 2:
            ln = {"pre_norm": "ln0", "attn_norm": "ln1", "ffn_norm": "ln2"}[parts[0]]
            out[f"{p}{ln}.{parts[1]}"] = t
        elif parts[0] in ("attn", "attention"):
            leaf = ".".join(parts[1:])
            if leaf == "x_x":
                for j, c in enumerate("rwkvag"):
                    out[f"{p}att.x_{c}"] = t.reshape(6, -1)[j].reshape(1, 1, -1)
            elif leaf.split(".")[0] in _FLA_PROJ and leaf.endswith(".weight"):
                out[f"{p}att.{_FLA_PROJ[leaf.split('.')[0]]}.weight"] = t
            elif leaf.startswith("g_norm."):
                out[f"{p}att.ln_x.{leaf.split('.')[-1]}"] = t
            elif "_lora.lora." in leaf:
                which = leaf[0]  # w, a, v, g
                tail = leaf.split("_lora.lora.", 1)[1]
                if tail == "0.weight":
                    out[f"{p}att.{which}1"] = t.t()
                elif tail == "2.weight":
                    out[f"{p}att.{which}2"] = t.t()
                elif tail == "2.bias":
                    out[f"{p}att.{which}0"] = t.reshape(1, 1, -1)
                else:
                    out[name] = t
            elif leaf in ("k_k", "k_a") or re.fullmatch(r"x_[rwkvag]", leaf):
                out[f"{p}att.{leaf}"] = t.reshape(1, 1, -1)
            else:  # r_k and BlinkDL-style leaves (w0, w1, key.weight, ...)
                out[f"{p}att.{leaf}"] = t
        elif parts[0] in ("ffn", "feed_forward"):
            leaf = ".".join(parts[1:])
            out[f"{p}ffn.{leaf}"] = t.reshape(1, 1, -1) if leaf == "x_k" else t
        else:
            out[name] = t
    return out


def to_blinkdl(tensors: dict, path="<model>") -> tuple[dict, str]:
    """Map a state dict in any known naming to BlinkDL's; returns (tensors, naming)."""
    names = list(tensors)
    if "emb.weight" in tensors:
        return tensors, "blinkdl"
    if any(n.startswith("rwkv.") for n in names):
        return {_from_transformers(n): t for n, t in tensors.items()}, "transformers"
    if any(n.startswith("model.layers.") or n.startswith("model.embeddings") for n in names):
        return _from_fla(tensors, path), "fla"
    if any(n.startswith("rwkv7.") for n in names):  # BlinkDL names under a prefix
        return {_from_transformers(n[len("rwkv7.") :]): t for n, t in tensors.items()}, "prefixed"
    raise MissingTensorError(
        path,
        "no RWKV tensor naming recognised: expected BlinkDL's "
        "('emb.weight'), transformers' ('rwkv.embeddings.weight') or fla's "
        f"('model.embeddings.weight'); found e.g. {sorted(names)[:3]}",
    )


def _checkpoint(path, fmt, tensors, meta) -> Checkpoint:
    tensors, naming = to_blinkdl(tensors, path)
    meta = dict(meta)
    if naming != "blinkdl":
        meta["naming"] = naming
    size = (
        sum(os.path.getsize(f) for f in meta.pop("_files", [path]))
        if os.path.isdir(path)
        else os.path.getsize(path)
    )
    return Checkpoint(
        path=os.fspath(path),
        format=fmt,
        tensors=tensors,
        file_types={k: type_name(v) for k, v in tensors.items()},
        file_size=size,
        meta=meta,
    )


def read_safetensors(path) -> Checkpoint:
    path = os.fspath(path)
    return _checkpoint(path, "safetensors", _load_safetensors(path), {})


# -- Hugging Face folders ----------------------------------------------------------------------


def _read_json(folder, name):
    """A JSON file of a Hugging Face folder (refused unless a regular file), parsed."""
    path = os.path.join(folder, name)
    require_regular(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested too deep
        raise UnknownFormatError(
            folder, f"cannot read {name}: {type(e).__name__}: {str(e)[:200]}"
        ) from None


def _inside(folder, index, ref) -> str:
    """The path of a file an index names, which must stay inside the folder: a relative path
    without '..' components (symbolic links inside the folder are followed, as the Hugging Face
    cache's are)."""
    if not isinstance(ref, str) or not ref or "\0" in ref:
        raise UnknownFormatError(
            folder, f"{index}: weight_map names {str(ref)[:80]!r}, expected a file name"
        )
    if os.path.isabs(ref) or ".." in ref.replace("\\", "/").split("/"):
        raise UnknownFormatError(
            folder,
            f"{index}: weight_map names {ref[:120]!r}, a file outside the model folder: refused",
        )
    return os.path.join(folder, os.path.normpath(ref))


def _weight_files(folder) -> list[str]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        p = os.path.join(folder, index)
        if os.path.exists(p):
            doc = _read_json(folder, index)
            wmap = doc.get("weight_map", {}) if isinstance(doc, dict) else None
            if not isinstance(wmap, dict):
                raise UnknownFormatError(
                    folder,
                    f"{index}: expected an object with a 'weight_map' object (tensor name -> file)",
                )
            files = sorted({_inside(folder, index, x) for x in wmap.values()})
            for f in files:
                require_regular(f)
            return files
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return [single]
    found = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if found:
        return found
    for name in ("pytorch_model.bin", "model.pth"):
        p = os.path.join(folder, name)
        if os.path.exists(p):
            return [p]
    return []


def read_hf(folder) -> Checkpoint:
    """A Hugging Face model folder: ``config.json`` and its weights."""
    folder = os.fspath(folder)
    config = _read_json(folder, "config.json")
    if not isinstance(config, dict):
        raise UnknownFormatError(
            folder, f"config.json holds a {type(config).__name__}, expected an object"
        )
    for key, ok, want in (
        (
            "architectures",
            lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
            "a list of strings",
        ),
        ("model_type", lambda v: isinstance(v, str), "a string"),
        ("rescale_every", _is_count, "an int >= 0"),
        ("vocab_size", _is_count, "an int >= 0"),
    ):
        if config.get(key) is not None and not ok(config[key]):
            raise UnknownFormatError(
                folder, f"config.json: '{key}' is {str(config[key])[:60]!r}, expected {want}"
            )
    arch = (config.get("architectures") or [config.get("model_type") or "?"])[0]
    if config.get("attn"):
        raise UnsupportedVersionError(
            folder,
            f"{arch} with attention layers (a hybrid model) "
            "is not a pure RWKV model; rwkvpy cannot run it",
        )
    files = _weight_files(folder)
    if not files:
        raise MissingTensorError(
            folder,
            "no weights found: expected model.safetensors, "
            "*.safetensors shards or pytorch_model.bin next to config.json",
        )
    tensors = {}
    for p in files:
        if p.endswith(".safetensors"):
            tensors.update(_load_safetensors(p))
        else:
            from .pth import read as read_pth

            tensors.update(read_pth(p).tensors)
    meta = {"hf_architecture": arch, "_files": files}
    if config.get("rescale_every"):
        meta["rescale_every"] = int(config["rescale_every"])
    vocab_file = os.path.join(folder, "rwkv_vocab_v20230424.txt")
    if os.path.exists(vocab_file):
        meta["tokenizer"] = "world"
        meta["vocab_file"] = vocab_file
    elif (
        os.path.exists(os.path.join(folder, "tokenizer.json"))
        and 50000 <= (config.get("vocab_size") or 0) <= 50304
    ):
        meta["tokenizer"] = "neox"
        meta["vocab_file"] = os.path.join(folder, "tokenizer.json")
    ckpt = _checkpoint(folder, "hf", tensors, meta)
    if (
        "head.weight" not in ckpt.tensors
        and config.get("tie_word_embeddings")
        and "emb.weight" in ckpt.tensors
    ):
        ckpt.tensors["head.weight"] = ckpt.tensors["emb.weight"]
        ckpt.file_types["head.weight"] = ckpt.file_types["emb.weight"]
    return ckpt
