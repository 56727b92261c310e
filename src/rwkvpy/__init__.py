"""rwkvpy: fast RWKV inference in Python."""

from . import runtime

# Before anything imports torch, whose OpenMP runtime reads it as it loads (rwkvpy.runtime).
runtime.apply()

from . import errors  # noqa: E402
from .config import ModelConfig, Version  # noqa: E402
from .model import Model, ModelInfo, inspect, load  # noqa: E402
from .sampling import SamplingParams  # noqa: E402
from .state import State  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "Model",
    "ModelConfig",
    "ModelInfo",
    "SamplingParams",
    "State",
    "Version",
    "errors",
    "inspect",
    "load",
]
