"""The one place that chooses a model's fast paths: :func:`choose` makes a :class:`KernelPlan`
from the mode, the devices and the CPU's capability level; ``rwkvpy.load`` hands the plan to
``Model``, which builds its network with it and asks it for the one-token step.

Modes:

- ``"reference"``: the float32 model code as written in models/ (the oracle of every test).
- ``"exact"``: the same numbers up to float32 rounding (summation order, the last bit of an
  exp): weights exactly as stored (dequantized exactly), float32 activations, compiled
  recurrences for sequences, fused glue for single tokens.
- ``"fast"`` (default): like exact, but block formats (Q4_0..Q8_0, the K-quants) multiply their
  weights by activations rounded to integers (int8, int16 for Q8_0) where the CPU level allows
  it (kernels/cpu.py), as ggml does; F32/F16/BF16 weights are multiplied exactly on every CPU.

What a plan chooses, for the layers on the CPU and on a GPU (mode "reference" replaces none of
them: models/' float32 code runs as written):

==============  ====================================  ====================================
piece           CPU                                   GPU
==============  ====================================  ====================================
products        kernels.linear.make_linear, per       kernels.gpu.DeviceLinear (the
                tensor (its format, the mode, the     weights' type on the GPU by mode)
                CPU level)
recurrences     kernels.wkv's ``*_serial`` (numba,    the same functions, which run their
                token by token)                       chunked torch form on a GPU tensor
one token       kernels.decode.FusedStep (every       kernels.gpu.TorchStep over grouped
                layer on the CPU)                     products (any layer on a GPU; CUDA
                                                      graphs when the state lives there)
repack cache    kernels.cache.RepackCache (mode       none
                "fast", a model file, asked for)
==============  ====================================  ====================================

Importing this module loads no kernel: each piece is imported when the plan first builds it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import RwkvpyError
from ..models.base import REFERENCE, Backend
from .cpu import CpuKernels, resolve

MODES = ("fast", "exact", "reference")
CACHE_CHOICES = (True, False, "beside")
CPU = torch.device("cpu")


def layer_devices(n_layer: int, device="cpu", gpu_layers: int | None = None) -> tuple:
    """The device of each layer: all on ``device``, or with ``gpu_layers=N`` the first N on the
    GPU ``device`` and the rest on the CPU. Raises RwkvpyError for an unusable choice."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise RwkvpyError(
            f"device {device!r} is not a torch device name (cpu, cuda, cuda:1)"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this torch build has no CUDA"
                if torch.version.cuda is None and torch.version.hip is None
                else "no GPU is visible to torch"
            )
            raise RwkvpyError(
                f"device {device!r}: CUDA is not available ({why}; torch {torch.__version__})"
            )
        index = 0 if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise RwkvpyError(
                f"device {device!r}: there are {torch.cuda.device_count()} GPUs "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
        dev = torch.device("cuda", index)
    elif dev.type != "cpu":
        raise RwkvpyError(f"device {device!r}: rwkvpy runs on 'cpu' or 'cuda' devices")
    if gpu_layers is None:
        return (dev,) * n_layer
    if dev.type == "cpu":
        raise RwkvpyError("gpu_layers needs a GPU device (device='cuda')")
    if (
        isinstance(gpu_layers, bool)
        or not isinstance(gpu_layers, int)
        or not 0 <= gpu_layers <= n_layer
    ):
        raise RwkvpyError(
            f"gpu_layers must be an int from 0 to {n_layer} (the model's layers), "
            f"got {gpu_layers!r}"
        )
    return (dev,) * gpu_layers + (CPU,) * (n_layer - gpu_layers)


@dataclass(frozen=True)
class KernelPlan:
    """The fast paths of one model (the table in the module docstring): ``mode``, the device
    of each layer (``devices``), the CPU kernels (``cpu``: kernels.cpu.CpuKernels), the repack
    cache asked for (``cache``: True, False or "beside") and ``compile`` (fuse the GPU step).
    Made by :func:`choose`; a value: building with it changes nothing in it."""

    mode: str
    devices: tuple
    cpu: CpuKernels
    cache: bool | str = False
    compile: bool = False

    @property
    def state_device(self) -> torch.device:
        """Where a state lives: the model's device, or the CPU when layers are split."""
        return self.devices[0] if len(set(self.devices)) == 1 else CPU

    @property
    def cpu_only(self) -> bool:
        """Every layer on the CPU."""
        return set(self.devices) == {CPU}

    @property
    def repacks(self) -> bool:
        """Whether the repack cache is used: asked for, mode "fast", some layer on the CPU."""
        return bool(self.cache) and self.mode == "fast" and CPU in self.devices

    # -- building ---------------------------------------------------------------------------------
    def backend(self, repack=None) -> Backend:
        """The products and recurrences of the mode (models.base.Backend); ``repack``: a
        kernels.cache.RepackCache the CPU's repacked weights are read from and recorded in."""
        if self.mode == "reference":
            return REFERENCE
        from .gpu import DeviceLinear
        from .linear import make_linear
        from .wkv import wkv4_serial, wkv5_serial, wkv7_serial

        mode, cpu = self.mode, self.cpu

        def linear(w, device, name=None):
            if device.type != "cpu":
                return DeviceLinear(w, device, mode)
            if repack is None or name is None:
                return make_linear(w, policy=mode, cpu=cpu)
            cached = repack.get(name)
            lin = make_linear(w, policy=mode, repacked=cached, cpu=cpu)
            if hasattr(lin, "repacked"):  # a repacking kernel was chosen
                if cached is None:
                    repack.put(name, lin.repacked())
                else:
                    repack.used()
            return lin

        return Backend(
            name=mode, make_linear=linear, wkv4=wkv4_serial, wkv5=wkv5_serial, wkv7=wkv7_serial
        )

    def build(self, cfg, tensors: dict, path: str) -> tuple:
        """The network (models.build) over ``tensors`` read from ``path``, with this plan's
        products and recurrences, the GPU layers' products grouped for the GPU step; and what
        the repack cache did: "hit", "written", "none" (nothing to cache), "not written: ...",
        or "off"."""
        from .. import models

        repack = None
        if self.repacks and os.path.isfile(path):
            from .cache import RepackCache

            repack = RepackCache(path, self.mode, beside=self.cache == "beside")
        net = models.build(cfg, tensors, path, self.backend(repack), self.devices)
        if repack is not None:
            repack.save()
        if self.mode != "reference" and not self.cpu_only:
            from .gpu import group_products

            group_products(net, [i for i, d in enumerate(self.devices) if d.type != "cpu"])
        return net, "off" if repack is None else repack.status

    def step(self, net):
        """The one-token step over ``net`` (built by :meth:`build`): FusedStep with every
        layer on the CPU, TorchStep with any on a GPU, None in mode "reference" (models/ code
        runs one token as a sequence of one)."""
        if self.mode == "reference":
            return None
        if self.cpu_only:
            from .decode import FusedStep

            return FusedStep(net)
        from .gpu import TorchStep

        graphs = self.state_device.type == "cuda"
        return TorchStep(net, self.state_device, graphs=graphs, compile=self.compile)

    # -- reporting --------------------------------------------------------------------------------
    def describe(self, net, step) -> dict:
        """Which kernels run (``Model.kernels``): the mode, the CPU capability level, the
        product kernel per stored tensor type (e.g. ``{"Q4_0": "int8-dot", "F16":
        "numba-float"}``, read from the built ``net``), the sequence recurrence and the
        one-token ``step``."""
        products: dict = {}
        for lin in net.lin.values():
            name = getattr(lin, "strategy", "") or type(lin).__name__
            products.setdefault(lin.fmt, set()).add(name)
        if step is None:
            one = "reference (models/)"
        elif hasattr(step, "blocks"):
            one = "numba whole-layer blocks" if step.blocks else "numba glue + products"
        else:
            one = type(step).__name__
        devs = sorted({d.type for d in self.devices})
        recurrence = (
            "reference (models/)"
            if self.mode == "reference"
            else "+".join({"cpu": "numba serial", "cuda": "torch chunked"}.get(d, d) for d in devs)
        )
        return {
            "mode": self.mode,
            "cpu_capability": self.cpu.to_dict(),
            "products": {k: "+".join(sorted(v)) for k, v in sorted(products.items())},
            "recurrence": recurrence,
            "step": one,
        }


def choose(
    n_layer: int,
    *,
    mode: str = "fast",
    device="cpu",
    gpu_layers: int | None = None,
    compile: bool = False,
    cache: bool | str = False,
    cpu_capability: str | None = None,
) -> KernelPlan:
    """The plan of a model of ``n_layer`` layers for :func:`rwkvpy.load`'s arguments of the
    same names (``cpu_capability`` None: ``$RWKVPY_CPU_CAPABILITY``, else this CPU's level;
    kernels/cpu.py). Checks them all and raises RwkvpyError (CpuCapabilityError for a level)
    for a bad one; changes nothing in the process."""
    if mode not in MODES:
        raise RwkvpyError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if cache not in CACHE_CHOICES:
        raise RwkvpyError(f"cache must be True, False or 'beside', got {cache!r}")
    cpu = resolve(cpu_capability)
    devices = layer_devices(n_layer, device, gpu_layers)
    plan = KernelPlan(mode=mode, devices=devices, cpu=cpu, cache=cache, compile=bool(compile))
    if compile and (plan.state_device.type != "cuda" or mode == "reference"):
        raise RwkvpyError(
            "compile=True fuses the GPU decode step: it needs every layer on a "
            "GPU (device='cuda', no gpu_layers) and mode fast or exact"
        )
    return plan
