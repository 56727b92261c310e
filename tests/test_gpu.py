"""The model on a GPU: device placement, layer split, CUDA graphs, batched decode.

Tests marked ``gpu`` need CUDA and show as skipped without it; the device-generic pieces they
rely on (the vmapped decode step, DeviceLinear, the errors) are tested here on the CPU too.
Tolerances (max abs difference of logits, measured on an H200 with the fixtures):
- float32 weights on the GPU (mode "exact", or an F32 file) against the CPU float32 path: 1e-3
  (the issue's bound; observed ~1e-5);
- F16 files on the GPU (float16 weights and activations in the products) against the CPU
  float32 path: :data:`F16_TOL`; BF16 files: :data:`BF16_TOL`; Q5_1 files expanded to float16
  against the CPU's exact Q5_1: :data:`F16_TOL`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REF_MODELS, TINY_V7, fixture_path
from conftest import serial_logits as serial

import rwkvpy
from rwkvpy.errors import RwkvpyError
from rwkvpy.kernels.gpu import DeviceLinear, TorchStep, group_products
from rwkvpy.models.base import Float32Linear

F32_TOL = 1e-3
F16_TOL = 2e-2
BF16_TOL = 1e-1
CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def ref_path(name):
    return fixture_path("reference-pth", f"{name}.pth")


def ref_target(name):
    d = np.load(fixture_path("reference-pth", f"{name}.npz"))
    key = "logits_serial_bf16upcast" if "logits_serial_bf16upcast" in d.files else "logits_serial"
    return d["tokens"].tolist(), d[key]


def err(a, b) -> float:
    return float((torch.as_tensor(a).float().cpu() - torch.as_tensor(b).float().cpu()).abs().max())


# -- on every machine ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", REF_MODELS)
def test_vmapped_step_matches_forward_on_cpu(name):
    """The decode step that CUDA graphs capture, run eagerly on the CPU: B sequences in one
    vectorized call give what forward gives for each alone."""
    model = rwkvpy.load(ref_path(name), mode="reference")
    step = TorchStep(model._net, "cpu", graphs=False)
    tokens, _ = ref_target(name)
    states = []
    s = None
    for tok in tokens[:3]:
        _, s = model.forward([tok], s)
        states.append(s)
    nxt = [11, 22, 33]
    logits, news = step.batch(nxt, states)
    assert logits.shape == (3, model.config.vocab_size)
    for b in range(3):
        ref, rs = model.forward([nxt[b]], states[b])
        assert err(logits[b], ref) < 1e-5
        assert err(news[b].wkv, rs.wkv) < 1e-5 and err(news[b].att_x, rs.att_x) < 1e-5
        assert news[b].n_tokens == states[b].n_tokens + 1
    one, new1 = step(nxt[0], states[0])
    assert err(one, logits[0]) < 1e-5 and err(new1.ffn_x, news[0].ffn_x) < 1e-5


@pytest.mark.parametrize("name", REF_MODELS)
def test_grouped_products_equal_separate_on_cpu(name):
    """The products a GPU runs as one batched call (r/k/v(/g) stacked, v7's four LoRAs as two
    products) give the separate products' results: prompts, one token, and the vmapped batch."""
    tokens, _ = ref_target(name)
    plain = rwkvpy.load(ref_path(name), mode="reference")
    grouped = rwkvpy.load(ref_path(name), mode="reference")
    n = group_products(grouped._net, range(grouped.config.n_layer))
    assert n == len(grouped._net.groups) == (4 if name.startswith("v7") else 2)
    key = grouped._net.lin["blocks.1.att.key.weight"].weight
    assert key.untyped_storage().nbytes() > key.numel() * key.element_size()  # a view: held once
    a, _ = plain.forward(tokens, None, all_logits=True)
    b, _ = grouped.forward(tokens, None, all_logits=True)
    assert err(a, b) < 1e-5
    steps = TorchStep(plain._net, "cpu"), TorchStep(grouped._net, "cpu")
    # the vmapped (batched) step keeps no stacked weights: vmap would copy them per sequence
    assert all(g.vmaps for g in steps[1]._vnet.groups.values())
    assert len(steps[1]._vnet.groups) == (2 if name.startswith("v7") else 0)
    sa = sb = plain.new_state()
    for tok in tokens[:8]:
        la, sa = steps[0](tok, sa)
        lb, sb = steps[1](tok, sb)
        assert err(la, lb) < 1e-5
    assert err(sa.wkv, sb.wkv) < 1e-5
    la, _ = steps[0].batch([5, 6, 7], [sa, sb, plain.new_state()])
    lb, _ = steps[1].batch([5, 6, 7], [sa, sb, plain.new_state()])
    assert err(la, lb) < 1e-4  # batched matmuls sum in another order (seen: 1.2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_device_linear_types_on_cpu(dtype, mode):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(48, 64, generator=g) * 0.1).to(dtype)
    x = torch.randn(3, 64, generator=g)
    lin = DeviceLinear(w, torch.device("cpu"), mode)
    want_dtype = dtype if mode == "fast" else torch.float32
    assert lin.weight.dtype == want_dtype and lin.exact == (want_dtype == torch.float32)
    assert lin.nbytes == 48 * 64 * lin.weight.element_size() and lin.fmt
    y = lin(x)
    assert y.dtype == torch.float32 and y.shape == (3, 48)
    ref = Float32Linear(w)(x)
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}[want_dtype]
    assert err(y, ref) < tol


def test_device_linear_expands_quantized_to_fp16():
    from rwkvpy.formats.base import QTensor
    from rwkvpy.quant import dequantize, quantize

    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=g).numpy()
    q = QTensor("Q5_1", (32, 64), quantize("Q5_1", w))
    exact = torch.from_numpy(dequantize("Q5_1", q.data, (32, 64)))
    fast = DeviceLinear(q, torch.device("cpu"), "fast")
    assert fast.weight.dtype == torch.float16 and fast.fmt == "Q5_1"
    assert err(fast.weight, exact) <= float(exact.abs().max()) * 2**-11
    full = DeviceLinear(q, torch.device("cpu"), "exact")
    assert full.weight.dtype == torch.float32 and err(full.weight, exact) == 0.0


def test_device_choice_errors():
    path = ref_path("v7_c192_l2")
    with pytest.raises(RwkvpyError, match="not a torch device"):
        rwkvpy.load(path, device="nonsense")
    with pytest.raises(RwkvpyError, match="runs on 'cpu' or 'cuda'"):
        rwkvpy.load(path, device="meta")
    with pytest.raises(RwkvpyError, match="gpu_layers needs a GPU"):
        rwkvpy.load(path, gpu_layers=1)
    with pytest.raises(RwkvpyError, match="compile=True fuses the GPU decode step"):
        rwkvpy.load(path, compile=True)
    if not CUDA:
        with pytest.raises(RwkvpyError, match="CUDA is not available"):
            rwkvpy.load(path, device="cuda")


@pytest.mark.skipif(CUDA, reason="checks the message on a machine without CUDA")
def test_cli_device_cuda_without_gpu_is_one_line():
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "rwkvpy",
            "generate",
            "-m",
            str(ref_path("v7_c192_l2")),
            "--tokenizer",
            "bytes",
            "--device",
            "cuda",
            "hello",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "CUDA is not available" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# -- on a GPU ------------------------------------------------------------------------------------
@gpu
@needs_cuda
@pytest.mark.parametrize("name", REF_MODELS)
def test_gpu_fp32_matches_reference(name):
    tokens, target = ref_target(name)
    model = rwkvpy.load(ref_path(name), device="cuda", mode="exact")
    assert model.device.type == "cuda" and model.new_state().device.type == "cuda"
    assert len(model._net.groups) == (4 if name.startswith("v7") else 2)  # batched products
    lg, _ = serial(model, tokens)
    e = err(lg, target)
    print(f"{name} exact on GPU vs reference: {e:.2e}")
    assert e < F32_TOL
    seq, _ = model.forward(tokens, None, all_logits=True)  # chunked recurrence on the GPU
    assert seq.device.type == "cuda" and err(seq, target) < F32_TOL


@gpu
@needs_cuda
@pytest.mark.parametrize("name", REF_MODELS)
def test_gpu_bf16_weights(name):
    """The .pth fixtures are BF16: mode fast keeps them so, with bf16 activations in products."""
    tokens, target = ref_target(name)
    model = rwkvpy.load(ref_path(name), device="cuda")
    assert model._net.lin["blocks.0.att.key.weight"].weight.dtype == torch.bfloat16
    lg, _ = serial(model, tokens)
    seq, _ = model.forward(tokens, None, all_logits=True)
    e, es = err(lg, target), err(seq, target)
    print(f"{name} bf16 on GPU vs reference: serial {e:.2e}, sequence {es:.2e}")
    assert e < BF16_TOL and es < BF16_TOL


@gpu
@needs_cuda
@pytest.mark.parametrize("model_name", ["4v0-660K", "5v2-730K", "7v0-834K"])
def test_gpu_rwkvcpp_files(model_name):
    text = np.load(fixture_path("rwkv-cpp-tiny", f"rwkvcpp-logits-{model_name}-FP32.npz"))
    tokens = text["tokens"].tolist()[:32]
    f32 = fixture_path("rwkv-cpp-tiny", f"tiny-rwkv-{model_name}-FP32.bin")
    cpu_ref, _ = serial(rwkvpy.load(f32, mode="reference"), tokens)
    gpu32, _ = serial(rwkvpy.load(f32, device="cuda"), tokens)
    assert err(gpu32, cpu_ref) < F32_TOL
    f16 = fixture_path("rwkv-cpp-tiny", f"tiny-rwkv-{model_name}-FP16.bin")
    cpu16, _ = serial(rwkvpy.load(f16, mode="reference"), tokens)
    gpu16, _ = serial(rwkvpy.load(f16, device="cuda"), tokens)
    q = fixture_path("rwkv-cpp-tiny", f"tiny-rwkv-{model_name}-Q5_1.bin")
    cpuq, _ = serial(rwkvpy.load(q, mode="exact"), tokens)
    gpuq_model = rwkvpy.load(q, device="cuda")
    assert gpuq_model._net.lin["blocks.0.att.key.weight"].weight.dtype == torch.float16
    gpuq, _ = serial(gpuq_model, tokens)
    e16, eq = err(gpu16, cpu16), err(gpuq, cpuq)
    print(f"{model_name}: F32 {err(gpu32, cpu_ref):.2e}, F16 {e16:.2e}, Q5_1 {eq:.2e}")
    assert e16 < F16_TOL and eq < F16_TOL


@gpu
@needs_cuda
@pytest.mark.parametrize("name", ["v5_2_c192_l2", "v7_c192_l2", "v4_c192_l2"])
def test_gpu_layer_split_equals_all_gpu(name):
    tokens, _ = ref_target(name)
    full = rwkvpy.load(ref_path(name), device="cuda", mode="exact")
    split = rwkvpy.load(ref_path(name), device="cuda", mode="exact", gpu_layers=1)
    assert split.gpu_layers == 1 and split.device.type == "cpu"
    assert split.state_device.type == "cpu"
    assert full._net.lin["blocks.0.att.key.weight"].weight.device.type == "cuda"
    assert split._net.lin["blocks.1.att.key.weight"].weight.device.type == "cpu"
    a, sa = serial(full, tokens)
    b, sb = serial(split, tokens)
    assert err(a, b) < 1e-4 and err(sa.wkv, sb.wkv) < 1e-4
    sq, _ = split.forward(tokens, None, all_logits=True)
    assert err(sq, a) < 1e-4
    none = rwkvpy.load(ref_path(name), device="cuda", mode="exact", gpu_layers=0)
    c, _ = serial(none, tokens[:4])
    assert none.gpu_layers == 0 and err(c, a[:4]) < 1e-4
    with pytest.raises(RwkvpyError, match="gpu_layers must be an int from 0 to 2"):
        rwkvpy.load(ref_path(name), device="cuda", gpu_layers=3)


@gpu
@needs_cuda
@pytest.mark.parametrize("name", REF_MODELS)
def test_cuda_graph_equals_eager(name):
    tokens, _ = ref_target(name)
    model = rwkvpy.load(ref_path(name), device="cuda", mode="exact")
    step = model._step
    assert isinstance(step, TorchStep) and step.graphs
    graphed, gs = serial(model, tokens)
    assert not step.graph_errors and 1 in step._graphs
    eager = TorchStep(model._net, model.state_device, graphs=False)
    model._step = eager
    plain, es = serial(model, tokens)
    assert err(graphed, plain) < 1e-5 and err(gs.wkv, es.wkv) < 1e-5


@gpu
@needs_cuda
@pytest.mark.parametrize("name", ["v6_c192_l2", "v7_c192_l2"])
def test_gpu_forward_batch(name):
    model = rwkvpy.load(ref_path(name), device="cuda", mode="exact")
    tokens, _ = ref_target(name)
    states = [None]
    s = None
    for tok in tokens[:4]:
        _, s = model.forward([tok], s)
        states.append(s)
    lists = [[5], [6], [7, 8, 9], [10], [11]]
    logits, news = model.forward_batch(lists, states)
    assert 4 in model._step._graphs and not model._step.graph_errors  # the 4 single tokens
    for lg, ns, toks, st in zip(logits, news, lists, states):
        ref, rs = model.forward(toks, st)
        assert err(lg, ref) < 1e-5 and err(ns.wkv, rs.wkv) < 1e-5
        assert ns.n_tokens == (0 if st is None else st.n_tokens) + len(toks)


@gpu
@needs_cuda
@pytest.mark.parametrize("name", ["v5_2_c192_l2", "v6_c192_l2", "v7_c192_l2"])
def test_gpu_long_prompt_chunked_equals_serial(name):
    """300 tokens: chunks of 64 with the chunk starts by the parallel scan."""
    model = rwkvpy.load(ref_path(name), device="cuda", mode="exact")
    ids = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(3)).tolist()
    seq, ss = model.forward(ids, None, all_logits=True)
    ser, sr = serial(model, ids)
    assert err(seq, ser) < 1e-3 and err(ss.wkv, sr.wkv) < 1e-3


@gpu
@needs_cuda
def test_gpu_state_moves_between_devices(tmp_path):
    name = "v5_2_c192_l2"
    tokens, _ = ref_target(name)
    g = rwkvpy.load(ref_path(name), device="cuda", mode="exact")
    c = rwkvpy.load(ref_path(name), mode="exact")
    _, s = g.forward(tokens[:10])
    s.save(tmp_path / "s.state")
    loaded = rwkvpy.State.load(tmp_path / "s.state", g)
    a, _ = g.forward(tokens[10:], loaded)  # a CPU state given to a GPU model
    b, _ = c.forward(tokens[10:], s)  # a GPU state given to a CPU model
    assert a.device.type == "cuda" and b.device.type == "cpu" and err(a, b) < 1e-4


@gpu
@needs_cuda
def test_cli_bench_and_generate_on_gpu():
    path = str(ref_path("v7_c192_l2"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "rwkvpy",
            "bench",
            path,
            "--device",
            "cuda",
            "--tokens",
            "8",
            "--prompt",
            "64",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["device"].startswith("cuda") and out["cuda_graphs"] is True
    assert out["bandwidth_gbs"] > 100 and out["gpu_layers"] == 2
    tiny = str(fixture_path(*TINY_V7))  # byte-level
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "rwkvpy",
            "generate",
            "-m",
            tiny,
            "--tokenizer",
            "bytes",
            "--device",
            "cuda",
            "--gpu-layers",
            "1",
            "--max-tokens",
            "8",
            "--seed",
            "1",
            "hello",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr


@gpu
@needs_cuda
@pytest.mark.parametrize("name", ["v4_c192_l2", "v6_c192_l2", "v7_c192_l2"])
def test_compiled_step_equals_eager(name):
    tokens, target = ref_target(name)
    model = rwkvpy.load(ref_path(name), device="cuda", mode="exact", compile=True)
    fused, fs = serial(model, tokens)
    assert not model._step.graph_errors and model._step.compile_error is None
    plain, ps = serial(rwkvpy.load(ref_path(name), device="cuda", mode="exact"), tokens)
    e = err(fused, plain)
    print(f"{name} compiled vs eager: {e:.2e}")
    assert e < 1e-4 and err(fs.wkv, ps.wkv) < 1e-4 and err(fused, target) < F32_TOL
