"""The second process of a first run (rwkvpy.coldstart): compiles a model's kernels into numba's
cache by running a small model with the same kinds of tensors.

    python -m rwkvpy.warm SPEC MARKER LOCK

SPEC: the JSON file coldstart.spec wrote (version, mode, CPU level, the storage type and shape
of each tensor of the layers kept); MARKER: the file written once every kernel is compiled;
LOCK: held (exclusively) while compiling, so that one such process runs per kind of model
(and ``running.lock`` beside it, so that one runs at a time).
The small model's block-format weights are zeros and its float weights small random values:
what it computes does not matter, only which kernels its calls compile. It runs what a model
runs: prompts of a few lengths (the sequence path), one token (the fused step), several
sequences at once (the batched step), each on two numba threads and on one (the parallel and the
serial kernels). It runs at a lower priority than the model it prepares (nice 10, in the
same scheduling group).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch

#: Prompt lengths run: the sequence path's products and recurrences at short and long T.
PROMPTS = (2, 5, 17, 70)
#: Sequences in one batched step.
BATCH = 3


def small_checkpoint(s: dict):
    """The small model's checkpoint and config from a spec (coldstart.spec)."""
    from .config import Version, config_from_shapes
    from .formats.base import Checkpoint, QTensor
    from .quant import get_format

    g = torch.Generator().manual_seed(0)
    floats = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    types = s["kinds"]["types"]
    other = s["kinds"]["other"]
    tensors: dict = {}
    for name, shape in s["shapes"].items():
        if name.startswith("blocks."):
            i, suffix = name[len("blocks.") :].split(".", 1)
            real = str(s["kinds"]["layers"][int(i)])
            typ = types[real][suffix]
        else:
            typ = other[name]
        if typ in floats:
            tensors[name] = (torch.rand(shape, generator=g) * 0.1).to(floats[typ])
        else:
            fmt = get_format(typ)
            tensors[name] = QTensor(typ, tuple(shape), np.zeros(fmt.nbytes(shape), np.uint8))
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    cfg = config_from_shapes(
        shapes, "<warm-up model>", version=Version(s["version"]), ln_x_eps=s["ln_x_eps"]
    )
    ckpt = Checkpoint("<warm-up model>", "warm-up", tensors, {}, 0, ln_x_eps=s["ln_x_eps"])
    return ckpt, cfg


def run(s: dict) -> int:
    """Build the small model of spec ``s`` and run every path once per thread count; returns
    the number of kernels compiled."""
    from . import compiling
    from .kernels.linear import start_numba_pool
    from .kernels.plan import choose
    from .model import Model

    compiling.set_quiet(True)
    ckpt, cfg = small_checkpoint(s)
    plan = choose(cfg.n_layer, mode=s["mode"], cache=False, cpu_capability=s["cpu_capability"])
    start_numba_pool()
    model = Model(ckpt, cfg, plan)
    V = cfg.vocab_size
    for threads in (2, 1):
        torch.set_num_threads(threads)
        state = None
        for T in PROMPTS:
            _, state = model.forward([(7 * j) % V for j in range(T)], state)
        _, one = model.forward([1], state)
        model.forward([2], one)
        model.forward_batch([[j + 1] for j in range(BATCH)], [one] * BATCH)
    return compiling.kernels_compiled()


def main(argv=None) -> int:
    from .coldstart import RUNNING, _try_lock
    from .formats.atomic import atomic_write

    spec_path, marker, lock_path = (sys.argv[1:] if argv is None else argv)[:3]
    try:
        os.nice(10)
    except OSError:
        pass
    held = _try_lock(lock_path)
    if held is None or os.path.exists(marker):
        return 0  # another one is compiling, or has
    running = _try_lock(os.path.join(os.path.dirname(lock_path), RUNNING))
    if running is None:  # another kind's: its caller compiles (it sees this one end)
        held.close()
        return 1
    try:
        with open(spec_path) as f:
            s = json.load(f)
        t0, c0 = time.perf_counter(), time.process_time()
        n = run(s)
        record = {
            "kernels": n,
            "seconds": round(time.perf_counter() - t0, 2),
            "cpu_seconds": round(time.process_time() - c0, 2),
            "spec": os.path.basename(spec_path),
        }
        with atomic_write(marker, "w") as f:
            json.dump(record, f)
    finally:
        running.close()
        held.close()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # the kernels are in the cache and the marker is written: end now, without the interpreter's
    # teardown (about a second of one core, torch's and numba's modules unloaded, while the
    # model it prepared runs its first tokens beside it)
    os._exit(code)
