"""One file per RWKV version; :func:`build` picks the class for a config."""

from __future__ import annotations

from ..config import ModelConfig, Version, config_from_shapes, detect_version
from .base import REFERENCE, Backend
from .v4 import RWKV4
from .v5 import RWKV5
from .v6 import RWKV6
from .v7 import RWKV7

CLASSES = {
    Version.V4: RWKV4,
    Version.V5_0: RWKV5,
    Version.V5_2: RWKV5,
    Version.V6: RWKV6,
    Version.V7: RWKV7,
}


def build(
    cfg: ModelConfig, weights: dict, path="<model>", backend: Backend = REFERENCE, devices=None
):
    """The model of cfg's version over ``weights``; ``devices``: one torch device per layer."""
    return CLASSES[cfg.version](cfg, weights, path, backend, devices)


__all__ = ["ModelConfig", "Version", "build", "config_from_shapes", "detect_version"]
