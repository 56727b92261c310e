"""kernels/plan.py: the one chooser of a model's fast paths, and what rwkvpy.load changes in the
process (only what its docstring lists)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import rwkvpy
from rwkvpy.errors import CpuCapabilityError, RwkvpyError
from rwkvpy.kernels.plan import KernelPlan, choose

CPU = torch.device("cpu")


def test_choose_checks_every_argument():
    for kw, match in (
        ({"mode": "lossy"}, "mode 'lossy' is not one of"),
        ({"cache": "elsewhere"}, "cache must be True, False or 'beside'"),
        ({"device": "meta"}, "runs on 'cpu' or 'cuda'"),
        ({"gpu_layers": 1}, "gpu_layers needs a GPU"),
        ({"compile": True}, "compile=True fuses the GPU decode step"),
    ):
        with pytest.raises(RwkvpyError, match=match):
            choose(2, **kw)
    with pytest.raises(CpuCapabilityError):
        choose(2, cpu_capability="sse9")


def test_plan_choices_on_the_cpu():
    fast = choose(3, cache=True)
    assert isinstance(fast, KernelPlan)
    assert fast.devices == (CPU,) * 3 and fast.cpu_only and fast.state_device == CPU
    assert fast.repacks  # mode fast, a layer on the CPU, asked for
    assert not choose(3, cache=False).repacks
    assert not choose(3, mode="exact", cache=True).repacks
    ref = choose(3, mode="reference", cache=True)
    assert not ref.repacks and ref.backend().name == "reference"
    assert choose(3, mode="exact").backend().name == "exact"
    forced = choose(3, cpu_capability="generic")
    assert forced.cpu.level == "generic" and forced.cpu.forced


def test_model_runs_what_its_plan_chose():
    ref = rwkvpy.load("demo", mode="reference", threads=1)
    assert ref.plan.mode == "reference" and ref._step is None
    assert ref.kernels["step"] == "reference (models/)" == ref.kernels["recurrence"]
    fast = rwkvpy.load("demo", threads=1, cache=False, cpu_capability="generic")
    assert type(fast._step).__name__ == "FusedStep"
    assert fast.kernels == fast.plan.describe(fast._net, fast._step)
    assert fast.kernels["cpu_capability"]["level"] == "generic"
    assert fast.kernels["recurrence"] == "numba serial"
    assert fast.repack_cache == "off" and fast.prompt_chunk is not None


def test_a_failed_load_leaves_the_thread_count():
    """Every argument is checked before load sets torch's thread count."""
    before = torch.get_num_threads()
    other = 1 if before > 1 else 2
    for kw in ({"mode": "lossy"}, {"cpu_capability": "sse9"}, {"compile": True}):
        with pytest.raises(RwkvpyError):
            rwkvpy.load("demo", threads=other, **kw)
        assert torch.get_num_threads() == before, kw


CHILD = """
import json, os, numba
before = (numba.config.THREADING_LAYER, list(numba.config.THREADING_LAYER_PRIORITY))
import rwkvpy
rwkvpy.load("demo", threads=1, cache=False)
after = (numba.config.THREADING_LAYER, list(numba.config.THREADING_LAYER_PRIORITY))
print(json.dumps([before, after]))
"""


@pytest.mark.parametrize("env", [{}, {"NUMBA_THREADING_LAYER": "workqueue"}])
def test_numba_threading_layer_a_user_chose_stays(env):
    """Without a user's choice, load puts OpenMP first (kernels/linear/threads.py); a layer
    the user chose in the environment is left as it is."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_THREADING_LAYER")}
    r = subprocess.run(
        [sys.executable, "-c", CHILD],
        env={**keep, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    before, after = json.loads(r.stdout.strip().splitlines()[-1])
    if env:
        assert after == before == ["workqueue", ["tbb", "omp", "workqueue"]]
    else:
        assert after == ["default", ["omp", "workqueue", "tbb"]]
