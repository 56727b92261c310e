"""rwkvpy: fast RWKV inference in Python."""

from . import errors
from .model import Model, ModelInfo, inspect, load
from .models.config import ModelConfig, Version
from .sampling import SamplingParams
from .state import State

__version__ = "0.1.0"
__all__ = ["Model", "ModelConfig", "ModelInfo", "SamplingParams", "State", "Version", "errors",
           "inspect", "load"]
