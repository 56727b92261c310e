"""Which tensor of a GGUF gets which K-quant type: llama-quantize's choices for the RWKV
architectures (llama.cpp src/llama-quant.cpp, ``tensor_allows_quantization``,
``llama_tensor_get_type`` and ``tensor_type_fallback``), without an importance matrix.

Types of ``rwkvpy convert --type``:

=========  ==================================================================================
type       tensors llama-quantize quantizes                       ``output.weight``
=========  ==================================================================================
q4_k       Q4_K (``llama-quantize --pure ... Q4_K_M``)            Q4_K
q5_k       Q5_K (``--pure ... Q5_K_M``)                           Q5_K
q6_k       Q6_K (``... Q6_K``)                                    Q6_K
q4_k_m     Q4_K (``... Q4_K_M``)                                  Q6_K
q5_k_m     Q5_K (``... Q5_K_M``)                                  Q6_K
=========  ==================================================================================

llama-quantize quantizes a tensor when it has two or more dimensions (trailing ones of ggml's
order, leading ones here, do not count), its name ends in ``weight``, is no ``*_norm.weight``
and is none of RWKV's small matrices (``time_mix_first``, ``w0/w1/w2``, ``a0/a1/a2``,
``v0/v1/v2``, ``g1/g2``, ``decay_w1/decay_w2``, ``lerp_fused``). For RWKV-6/7 files that is
every projection (``time_mix_key/value/receptance/gate/output``,
``channel_mix_key/value/receptance``), ``token_embd.weight`` and ``output.weight``. llama.cpp
has no RWKV-4/5 architecture; their files get the same rule, and v5.2's per-head
``time_mix_decay.weight`` (2-D only there) stays float, as the decays of every other version do.

The Q4_K_M and Q5_K_M mixes of other models raise some tensors (``attn_v``, ``ffn_down``,
``attn_qkv``) to Q5_K/Q6_K by name; no RWKV tensor has those names, so for RWKV the mixes differ
from the plain type only in ``output.weight``: Q6_K, or Q8_0 when its rows (the embedding size)
are not a multiple of 256. Any other tensor whose rows are not a multiple of 256 falls back as
llama.cpp does: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and to F16 when the rows are not a
multiple of 32 either.
"""

from __future__ import annotations

#: ``--type`` name -> (the quantized tensors' type, ``output.weight``'s type or None for the same,
#: llama.cpp's file type ``general.file_type``: LLAMA_FTYPE_MOSTLY_*).
MIXES = {
    "q4_k": ("Q4_K", None, 14),  # MOSTLY_Q4_K_S: for RWKV the same tensors as Q4_K_M but the head
    "q5_k": ("Q5_K", None, 16),  # MOSTLY_Q5_K_S
    "q6_k": ("Q6_K", "Q6_K", 18),  # MOSTLY_Q6_K
    "q4_k_m": ("Q4_K", "Q6_K", 15),  # MOSTLY_Q4_K_M
    "q5_k_m": ("Q5_K", "Q6_K", 17),  # MOSTLY_Q5_K_M
}

#: llama-quant.cpp's tensor_type_fallback for rows that are not a multiple of 256.
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

#: RWKV tensors llama.cpp never quantizes (tensor_allows_quantization), plus v5.2's decay.
_KEEP = (
    "time_mix_first.weight",
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "time_mix_decay.weight",
)


def quantizes(name: str, shape) -> bool:
    """Whether llama-quantize quantizes the GGUF tensor ``name`` of ``shape`` (PyTorch order)."""
    dims = [int(s) for s in shape]
    while len(dims) > 1 and dims[0] == 1:  # ggml_n_dims ignores ggml's trailing ones
        dims.pop(0)
    if len(dims) < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return False
    return not any(k in name for k in _KEEP)


def _fit(t: str, row: int) -> str:
    """tensor_type_fallback: ``t`` or its fallback for a row length ``row``."""
    from ..quant import get_format

    if row % get_format(t).block_size == 0:
        return t
    t = FALLBACK.get(t, t)
    return t if row % get_format(t).block_size == 0 else "F16"


def tensor_type(mix: str, name: str, shape) -> str | None:
    """The type llama-quantize gives GGUF tensor ``name`` (PyTorch-order ``shape``) under
    ``--type mix`` (a key of :data:`MIXES`), or None for a tensor it leaves as it is."""
    base, head, _ = MIXES[mix]
    if not quantizes(name, shape):
        return None
    row = int(shape[-1])
    if name == "output.weight" and head is not None:
        # llama_tensor_get_type_impl: Q8_0 when the rows do not fill the head type's blocks
        return _fit(head if row % 256 == 0 else "Q8_0", row)
    return _fit(base, row)
