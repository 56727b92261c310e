"""Model configuration and version detection (the one place that tells RWKV versions apart)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .errors import MissingTensorError, TensorShapeError, UnsupportedVersionError


class Version(enum.Enum):
    """RWKV architecture versions. Compare members, never numbers."""

    V4 = "4"
    V5_0 = "5.0"  # v5 without gate; rwkv.cpp calls it 5.1
    V5_2 = "5.2"
    V6 = "6"
    V7 = "7"

    @property
    def label(self) -> str:
        return {
            Version.V4: "RWKV v4",
            Version.V5_0: "RWKV v5.0 (no gate; rwkv.cpp's 5.1)",
            Version.V5_2: "RWKV v5.2",
            Version.V6: "RWKV v6",
            Version.V7: "RWKV v7",
        }[self]

    @property
    def has_heads(self) -> bool:
        return self is not Version.V4


@dataclass(frozen=True)
class ModelConfig:
    version: Version
    n_embd: int
    n_layer: int
    vocab_size: int
    n_att: int  # width of the time-mix projections (= n_embd in released models)
    n_ffn: int
    n_head: int = 0  # 0 for v4
    head_size: int = 0  # 0 for v4
    # eps of the per-head group norm (ln_x): BlinkDL's code uses 64e-5 (1e-5 on x / 8);
    # rwkv.cpp computes v5 with 1e-5, which is what its files were validated against.
    ln_x_eps: float = 64e-5
    layer_norm_eps: float = 1e-5
    extra: dict = field(default_factory=dict, compare=False)


def _squeezed(shape) -> tuple:
    return tuple(int(s) for s in shape if s != 1)


def detect_version(shapes: dict, path="<model>") -> Version:
    """Tell the RWKV version from tensor names (and shapes, for v5.x).

    Accepts BlinkDL's names and rwkv.cpp's (which differ only in v7's ``att.x_rwkvag``).
    """
    if "emb.weight" not in shapes:
        raise MissingTensorError(
            path,
            "tensor 'emb.weight' not found: this is not an RWKV checkpoint "
            f"(it holds {len(shapes)} tensors, e.g. {sorted(shapes)[:3]})",
        )
    if "blocks.0.att.k_k" in shapes or "blocks.0.att.x_rwkvag" in shapes:
        return Version.V7
    if "blocks.0.att.time_maa_x" in shapes:
        return Version.V6
    if "blocks.0.att.ln_x.weight" in shapes:
        if "blocks.0.att.gate.weight" not in shapes:
            return Version.V5_0
        if "blocks.0.att.time_faaaa" in shapes:
            return Version.V5_2
        raise UnsupportedVersionError(
            path,
            "RWKV v5.1 (gate with per-head time_first) is not supported; "
            "expected v4, v5.0, v5.2, v6 or v7",
        )
    if "blocks.0.att.time_decay" in shapes and "blocks.0.att.time_first" in shapes:
        return Version.V4
    raise UnsupportedVersionError(
        path,
        "no RWKV version matches these tensor names: expected 'blocks.0.att.time_decay' "
        "(v4/v5), 'blocks.0.att.time_maa_x' (v6) or 'blocks.0.att.k_k' (v7)",
    )


def _shape(shapes, name, path):
    if name not in shapes:
        raise MissingTensorError(path, f"tensor '{name}' not found")
    return tuple(int(s) for s in shapes[name])


def config_from_shapes(
    shapes: dict, path="<model>", version: Version | None = None, ln_x_eps: float | None = None
) -> ModelConfig:
    """Derive a ModelConfig from canonical tensor names and shapes."""
    version = version or detect_version(shapes, path)
    emb = _shape(shapes, "emb.weight", path)
    if len(emb) != 2:
        raise TensorShapeError(
            path, f"tensor 'emb.weight' has shape {emb}, expected (vocab, n_embd)"
        )
    vocab, n_embd = emb
    n_layer = 0
    while f"blocks.{n_layer}.ln1.weight" in shapes:
        n_layer += 1
    if n_layer == 0:
        raise MissingTensorError(path, "tensor 'blocks.0.ln1.weight' not found")
    key = _shape(shapes, "blocks.0.att.key.weight", path)
    ffn = _shape(shapes, "blocks.0.ffn.key.weight", path)
    n_att, n_ffn = key[0], ffn[0]
    for what, n in (
        ("vocab size", vocab),
        ("n_embd", n_embd),
        ("attention width", n_att),
        ("n_ffn", n_ffn),
    ):
        if n <= 0:  # an empty dimension (a corrupt header): nothing to run, and divisions by it
            raise TensorShapeError(path, f"the tensors give a {what} of {n}, expected > 0")
    n_head = head_size = 0
    if version is Version.V5_0:
        td = _squeezed(_shape(shapes, "blocks.0.att.time_decay", path))
        n_head = td[0] if td else 1
    elif version in (Version.V5_2, Version.V6):
        tf = _squeezed(_shape(shapes, "blocks.0.att.time_faaaa", path))
        n_head = tf[0] if len(tf) == 2 else 1
    elif version is Version.V7:
        rk = _squeezed(_shape(shapes, "blocks.0.att.r_k", path))
        n_head = rk[0] if len(rk) == 2 else 1
    if version.has_heads:
        if n_head <= 0 or n_att % n_head:
            raise TensorShapeError(
                path, f"{n_head} heads do not divide the attention width {n_att}"
            )
        head_size = n_att // n_head
    return ModelConfig(
        version=version,
        n_embd=n_embd,
        n_layer=n_layer,
        vocab_size=vocab,
        n_att=n_att,
        n_ffn=n_ffn,
        n_head=n_head,
        head_size=head_size,
        ln_x_eps=64e-5 if ln_x_eps is None else ln_x_eps,
    )
