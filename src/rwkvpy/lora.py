"""Merge a LoRA checkpoint into a model (``rwkvpy merge-lora``), for RWKV v4, v5, v6 and v7.

LoRA checkpoints in the layout of Blealtan's RWKV-LM-LoRA (the layout rwkv.cpp's
merge_lora_into_ggml.py reads), a plain .pth of BlinkDL-named tensors:

- ``NAME.lora_A`` (r, in) and ``NAME.lora_B`` (out, r), with or without a ``.weight`` suffix,
  for a matrix ``NAME.weight`` (out, in): merged as W + B @ A * (alpha / r);
- any other tensor under a model tensor's name (e.g. trained ``time_*`` vectors, layer norms)
  replaces that tensor.

The merge happens in rwkvpy's canonical form (BlinkDL names and shapes, raw parameters), so it
is the same for every version and every input format; the result is written as GGUF, rwkv.cpp
.bin or .pth through :func:`rwkvpy.convert.convert`. The base must hold float weights (F32, F16,
BF16): merging into quantized weights would quantize twice, so quantize after merging
(``--type``). The merged model is built in memory in float32 (one copy of the model).
"""

from __future__ import annotations

import os
import warnings

from .errors import ConversionError, OutputExistsError


def _squeezed(shape):
    return tuple(int(s) for s in shape if s != 1)


def merge(base: dict, lora: dict, alpha: float, base_name="base", lora_name="lora"):
    """Merge ``lora`` into ``base`` (both canonical name -> float tensor dicts).

    Returns (merged dict, report dict with lists 'merged', 'replaced', 'unused').
    """
    from .formats import QTensor, to_float32

    out, merged, replaced = {}, [], []
    used = set()
    for name, t in base.items():
        if isinstance(t, QTensor):
            raise ConversionError(
                f"{base_name}: tensor '{name}' is {t.fmt}: merge a LoRA into a "
                "float model (F32, F16, BF16), then quantize (--type)"
            )
        w = to_float32(t).clone()
        if name in lora:
            rep = to_float32(lora[name])
            if _squeezed(rep.shape) != _squeezed(w.shape):
                raise ConversionError(
                    f"{lora_name}: tensor '{name}' has shape {tuple(rep.shape)}, "
                    f"the model's has {tuple(w.shape)}"
                )
            w = rep.reshape(w.shape).clone()
            used.add(name)
            replaced.append(name)
        stem = name[: -len(".weight")] if name.endswith(".weight") else name
        for suffix in (".weight", ""):
            ka, kb = f"{stem}.lora_A{suffix}", f"{stem}.lora_B{suffix}"
            if ka in lora or kb in lora:
                if ka not in lora or kb not in lora:
                    raise ConversionError(f"{lora_name}: '{ka}' and '{kb}' must come together")
                a, b = to_float32(lora[ka]), to_float32(lora[kb])
                if (
                    a.dim() != 2
                    or b.dim() != 2
                    or b.shape[1] != a.shape[0]
                    or (b.shape[0], a.shape[1]) != tuple(w.shape)
                ):
                    raise ConversionError(
                        f"{lora_name}: LoRA for '{name}' has A {tuple(a.shape)} and B "
                        f"{tuple(b.shape)}; expected A (r, {w.shape[-1]}) and B "
                        f"({w.shape[0]}, r) for the model's {tuple(w.shape)}"
                    )
                w = w + (b @ a) * (alpha / b.shape[1])
                used.update((ka, kb))
                merged.append(name)
                break
        out[name] = w
    unused = sorted(set(lora) - used)
    return out, {"merged": merged, "replaced": replaced, "unused": unused}


def merge_lora(
    base_path, lora_path, dst, alpha: float, type: str = "f16", force=False, progress=True
) -> dict:
    """Merge the LoRA checkpoint at ``lora_path`` into the model at ``base_path`` and write
    ``dst`` (.gguf, .bin, or .pth for a float32 BlinkDL checkpoint). Returns the report."""
    from .convert import convert
    from .formats import read
    from .formats.atomic import atomic_write, failed_write, temp_next_to, torch_save

    dst = os.fspath(dst)
    if os.path.exists(dst) and not force:
        raise OutputExistsError(f"{dst}: already exists; use force=True (--force) to overwrite it")
    if not isinstance(alpha, (int, float)) or alpha != alpha or alpha <= 0:
        raise ConversionError(f"lora alpha must be a positive number, got {alpha!r}")
    from .hub import resolve_model

    base = read(resolve_model(base_path))
    lora = read(lora_path)
    if lora.format != "pth":
        raise ConversionError(f"{lora_path}: a LoRA checkpoint is a .pth, this is {lora.format}")
    tensors, report = merge(base.tensors, lora.tensors, float(alpha), base.path, lora.path)
    if not report["merged"] and not report["replaced"]:
        raise ConversionError(
            f"{lora_path}: no tensor of it matches the model "
            f"({len(report['unused'])} tensors, e.g. {report['unused'][:3]})"
        )
    for name in report["unused"]:
        warnings.warn(
            f"{lora_path}: tensor '{name}' matches nothing in the model; not used", stacklevel=2
        )
    if dst.endswith(".pth"):
        with atomic_write(dst) as f:
            torch_save(tensors, f)
        return report
    fd, tmp = temp_next_to(dst)  # a float32 .pth for convert, removed by a later writer if killed
    try:
        with os.fdopen(fd, "wb") as f:
            torch_save(tensors, f)
        del tensors
        convert(tmp, dst, type=type, force=force, progress=progress)
    except BaseException as e:
        mapped = failed_write(dst, e)  # a full disk while writing the intermediate file
        if mapped is not None and mapped is not e:
            raise mapped from None
        raise
    finally:
        os.unlink(tmp)
    return report
