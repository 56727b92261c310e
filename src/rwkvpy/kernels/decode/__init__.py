"""The one-token decode step on the CPU: :class:`FusedStep` (step.py) runs a token through every
layer with each version's fused kernels, one module per RWKV version (v4.py, v5.py, v6.py,
v7.py: the layer's weights as a record of views, its whole-block numba kernel, the same block
step by step), on the shared numba glue of glue.py. The math is that of models/v4.py ... v7.py;
tests/test_fast_paths.py holds each path to the float32 reference.
"""

from .step import FusedStep

__all__ = ["FusedStep"]
