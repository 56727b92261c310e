"""tools/train_demo.py (the demo model's training script) and rwkvpy.demo.

A tiny run of the script (in a subprocess, as a user runs it) must lower the loss, write a
checkpoint rwkvpy loads, and be reproducible; its trainable RWKV-7 must compute what rwkvpy's
reference math computes on the same checkpoint; its chunked recurrence must equal the per-token
recurrence, gradients included.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rwkvpy
import rwkvpy.demo as demo
from rwkvpy.convert import convert
from rwkvpy.errors import RwkvpyError

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "train_demo.py"
sys.path.insert(0, str(SCRIPT.parent))
import train_demo as td  # noqa: E402

TINY = [
    "--n-embd",
    "32",
    "--n-layer",
    "2",
    "--head-size",
    "16",
    "--batch",
    "4",
    "--ctx",
    "64",
    "--steps",
    "8",
    "--warmup",
    "2",
    "--lr",
    "3e-3",
    "--log-every",
    "1",
    "--eval-every",
    "0",
    "--threads",
    "2",
]


def run_script(tmp_path, name, *extra):
    out = tmp_path / f"{name}.pth"
    summary = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, "--out", str(out), "--json", str(summary), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, json.loads(summary.read_text()), proc.stdout


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return run_script(tmp_path_factory.mktemp("train"), "a", "--seed", "3")


def test_tiny_run_lowers_the_loss_and_writes_a_loadable_checkpoint(tiny_run):
    path, summary, stdout = tiny_run
    losses = [p["loss"] for p in summary["loss_curve"]]
    printed = [float(line.split()[3]) for line in stdout.splitlines() if line.startswith("step ")]
    assert printed == pytest.approx(losses, abs=1e-4)
    assert len(losses) == 8
    assert losses[0] == pytest.approx(math.log(256), abs=0.3)  # a fresh model is uniform
    assert losses[-1] < losses[0] - 0.5
    assert summary["steps"] == 8 and summary["params"] > 0

    model = rwkvpy.load(path)
    info = model.info
    assert (info.version, info.n_embd, info.n_layer, info.vocab_size, info.head_size) == (
        rwkvpy.Version.V7,
        32,
        2,
        256,
        16,
    )
    ppl = summary["heldout_ppl"]
    assert math.isfinite(ppl) and 1 < ppl < 256
    assert summary["heldout_tokens"] == len(demo.demo_corpus()[1]) - 1
    assert f"perplexity {ppl:.3f}" in stdout
    # the checkpoint is a plain BlinkDL state dict: the names of a real v7 release
    sd = torch.load(path, weights_only=True)
    assert set(sd) >= {
        "emb.weight",
        "blocks.0.ln0.weight",
        "blocks.1.att.v1",
        "blocks.0.att.x_r",
        "blocks.1.att.r_k",
        "blocks.1.att.ln_x.bias",
        "blocks.1.ffn.key.weight",
        "ln_out.bias",
        "head.weight",
    }
    assert sd["blocks.0.att.x_r"].shape == (1, 1, 32) and sd["blocks.0.att.r_k"].shape == (2, 16)
    assert all(t.dtype == torch.float32 for t in sd.values())


def test_time_budget_plans_the_steps(tmp_path):
    """--minutes: the step count is fixed after the timed warm-up, the run ends in budget."""
    args = [a for a in TINY]
    i = args.index("--steps")
    del args[i : i + 2]
    out, summary = tmp_path / "m.pth", tmp_path / "m.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            *args,
            "--minutes",
            "0.25",
            "--eval-reserve",
            "6",
            "--log-every",
            "50",
            "--no-eval",
            "--out",
            str(out),
            "--json",
            str(summary),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = json.loads(summary.read_text())
    plan = [line for line in proc.stdout.splitlines() if line.startswith("plan: ")]
    assert len(plan) == 1 and f"--steps {int(plan[0].split()[1])}" in plan[0]
    assert s["steps"] > 2 and s["steps"] <= s["planned_steps"]
    assert s["total_seconds"] < 15 + 10  # 15 s budget, generous slack
    assert rwkvpy.load(out).info.n_layer == 2


def _perturbed(path, tmp_path):
    """The checkpoint with every tensor moved randomly: no zero-initialised weight left."""
    g = torch.Generator().manual_seed(1)
    sd = torch.load(path, weights_only=True)
    sd = {k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in sd.items()}
    out = tmp_path / "perturbed.pth"
    torch.save(sd, out)
    return out


@pytest.mark.parametrize("which", ["trained", "perturbed"])
def test_training_module_matches_rwkvpy_reference(tiny_run, tmp_path, which):
    path = tiny_run[0] if which == "trained" else _perturbed(tiny_run[0], tmp_path)
    ref = rwkvpy.load(path, mode="reference")
    net = td.RWKV7LM.from_state_dict(torch.load(path, weights_only=True))
    toks = list(demo.held_out_text().encode()[:150])
    want, want_state = ref.forward(toks, None, all_logits=True)
    with torch.no_grad():
        got, _ = net(torch.tensor([toks]))
        # the same text in two calls with the state carried (57 = not a multiple of the chunk)
        a, st = net(torch.tensor([toks[:57]]))
        b, st = net(torch.tensor([toks[57:]]), st)
    assert (got[0] - want).abs().max() < 1e-4
    assert (torch.cat([a, b], 1)[0] - want).abs().max() < 1e-4
    assert (st[2][:, 0] - want_state.wkv).abs().max() < 1e-4
    assert (st[0][:, 0] - want_state.att_x).abs().max() < 1e-5
    assert (st[1][:, 0] - want_state.ffn_x).abs().max() < 1e-5


def test_same_seed_same_checkpoint(tiny_run, tmp_path):
    again, summary, _ = run_script(tmp_path, "b", "--seed", "3", "--no-eval")
    first = torch.load(tiny_run[0], weights_only=True)
    second = torch.load(again, weights_only=True)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert [p["loss"] for p in summary["loss_curve"]] == [
        p["loss"] for p in tiny_run[1]["loss_curve"]
    ]
    other, _, _ = run_script(tmp_path, "c", "--seed", "4", "--no-eval", "--steps", "1")
    assert not torch.equal(
        torch.load(other, weights_only=True)["head.weight"], first["head.weight"]
    )


def test_init_reads_a_quantized_gguf(tiny_run, tmp_path):
    """--init: a GGUF (flat vectors, Q8_0 matrices, no layer-0 v0/v1/v2) becomes a module that
    computes what rwkvpy computes on that file."""
    gguf = tmp_path / "tiny-q8_0.gguf"
    convert(str(tiny_run[0]), str(gguf), type="q8_0", progress=False)
    net = td.load_init(str(gguf))
    assert (net.n_embd, net.n_layer, net.head_size) == (32, 2, 16)
    ref = rwkvpy.load(str(gguf), mode="reference")
    toks = list(demo.held_out_text().encode()[:100])
    want, _ = ref.forward(toks, None, all_logits=True)
    with torch.no_grad():
        got, _ = net(torch.tensor([toks]))
    assert (got[0] - want).abs().max() < 1e-3
    # a float checkpoint comes back exactly
    pth = td.load_init(str(tiny_run[0])).state_dict()
    sd = torch.load(tiny_run[0], weights_only=True)
    assert all(torch.equal(pth[k], sd[k]) for k in sd)


def test_mix_chat():
    doc = b"".join(b"paragraph %d line\nmore text\n\n" % i for i in range(400))
    turns = [f"User: q{i}?\n\nAssistant: a{i}.\n\n" for i in range(30)]
    mixed = td.mix_chat(doc, turns, 0.3, seed=5)
    assert mixed == td.mix_chat(doc, turns, 0.3, seed=5)
    assert mixed != td.mix_chat(doc, turns, 0.3, seed=6)
    assert td.mix_chat(doc, turns, 0.0, seed=5) == doc
    chat = re.findall(rb"User: q\d+\?\n\nAssistant: a\d+\.\n\n", mixed)
    n_chat = sum(map(len, chat))
    assert n_chat + len(doc) == len(mixed)  # whole turns, nothing else
    assert 0.3 <= n_chat / len(mixed) < 0.3 + 120 / len(mixed)  # the share, to a conversation
    assert re.sub(rb"User: q\d+\?\n\nAssistant: a\d+\.\n\n", b"", mixed) == doc  # doc in order
    counts = [chat.count(t.encode()) for t in turns]
    assert max(counts) - min(counts) <= 1  # each once per pass
    # the replies' bytes: after "Assistant:", the closing blank line included
    mask = td.reply_mask(turns[:2])
    text = "".join(turns[:2]).encode()
    assert bytes(b for b, m in zip(text, mask) if m) == b" a0.\n\n a1.\n\n"


def test_fine_tune_with_chat(tiny_run, tmp_path):
    """--init a model and --chat-fraction: the run starts from its weights, mixes the chat
    turns in and evaluates the held-out chat and the starting model."""
    out, summary, stdout = run_script(
        tmp_path, "ft", "--init", str(tiny_run[0]), "--chat-fraction", "0.5", "--steps", "2"
    )
    assert "init: " in stdout and "chat: " in stdout
    info = summary["corpus"]
    assert info["chat"] == demo.chat_info()
    assert info["mixed_train_bytes"] > 1.9 * info["train_bytes"]
    assert summary["init_eval"]["heldout_ppl"] == pytest.approx(
        tiny_run[1]["heldout_ppl"], rel=1e-9
    )
    for ev in (summary, summary["init_eval"]):
        assert 1 < ev["chat_ppl"] < 256 and 1 < ev["chat_reply_ppl"] < 256
        assert ev["chat_tokens"] == len(demo.held_out_chat_text().encode()) - 1
    # the first step starts from the trained model, not from a fresh (uniform) one
    assert summary["loss_curve"][0]["loss"] < tiny_run[1]["loss_curve"][0]["loss"] - 0.3


def _wkv7_loop(r, lw, k, v, kk, a, S):
    outs = []
    for t in range(r.shape[1]):
        S = (
            S * lw[:, t].exp().unsqueeze(-2)
            + (S @ -kk[:, t].unsqueeze(-1)) @ (kk[:, t] * a[:, t]).unsqueeze(-2)
            + v[:, t].unsqueeze(-1) * k[:, t].unsqueeze(-2)
        )
        outs.append((S @ r[:, t].unsqueeze(-1)).squeeze(-1))
    return torch.stack(outs, 1), S


@pytest.mark.parametrize("T,chunk", [(37, 8), (16, 16), (5, 16)])
def test_chunked_recurrence_equals_per_token_recurrence(T, chunk):
    g = torch.Generator().manual_seed(T)
    B, H, N = 2, 2, 8

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    kk = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
    lw = -math.exp(-0.5) * torch.rand(B, T, H, N, generator=g, dtype=torch.float64)
    a = torch.rand(B, T, H, N, generator=g, dtype=torch.float64)
    xs = [
        x.requires_grad_()
        for x in (rnd(B, T, H, N), lw, rnd(B, T, H, N), rnd(B, T, H, N), kk, a, rnd(B, H, N, N))
    ]
    out, S = td.wkv7_train(*xs, chunk=chunk)
    ref_out, ref_S = _wkv7_loop(*xs)
    assert (out - ref_out).abs().max() < 1e-10 and (S - ref_S).abs().max() < 1e-10
    go, gs = rnd(*out.shape), rnd(*S.shape)
    grads = torch.autograd.grad((out * go).sum() + (S * gs).sum(), xs)
    ref_grads = torch.autograd.grad((ref_out * go).sum() + (ref_S * gs).sum(), xs)
    for got, want in zip(grads, ref_grads):
        assert (got - want).abs().max() < 1e-9


def test_init_follows_blinkdl_layout():
    torch.manual_seed(0)
    net = td.RWKV7LM(64, 3, 32)
    sd = net.state_dict()
    assert sd["blocks.0.att.w1"].shape == (64, 32) and sd["blocks.0.att.g2"].shape == (32, 64)
    assert not sd["blocks.2.att.output.weight"].any() and not sd["blocks.2.ffn.value.weight"].any()
    assert sd["blocks.2.att.ln_x.weight"][0] == pytest.approx(1.0)
    assert sd["emb.weight"].abs().max() <= 1e-4
    assert "blocks.1.ln0.weight" not in sd and "blocks.0.ln0.weight" in sd
    # w0 = -6 + 6 (n / (C - 1))^(...) + 0.5 + 2.5 zigzag: from -8 (slowest decay) to 3
    w0 = sd["blocks.0.att.w0"].flatten()
    assert w0[0] == pytest.approx(-8.0) and w0[-1] == pytest.approx(3.0)
    assert sd["blocks.1.att.k_a"].flatten()[0] == pytest.approx(1.02)


# -- rwkvpy.demo ---------------------------------------------------------------------------------


def test_demo_corpus_split():
    train, held = demo.demo_corpus()
    total = len(train) + len(held)
    assert total > 100_000
    assert 0.04 * total < len(held) <= 0.05 * total
    assert train.endswith(b"\n")
    assert demo.held_out_text().encode() == held
    assert demo.demo_corpus() == (train, held)
    info = demo.corpus_info()
    assert (info["train_bytes"], info["heldout_bytes"]) == (len(train), len(held))


def test_demo_model_path(tmp_path, monkeypatch, tiny_run):
    monkeypatch.setattr(demo, "DATA_DIR", tmp_path / "data")
    with pytest.raises(RwkvpyError, match="no demo model file"):
        demo.demo_model_path()
    with pytest.raises(RwkvpyError, match="no demo model file"):
        rwkvpy.load("demo")
    (tmp_path / "data").mkdir()
    pth = tmp_path / "data" / "demo-v7-32x2.pth"
    pth.write_bytes(tiny_run[0].read_bytes())
    assert demo.demo_model_path() == str(pth)
    model = rwkvpy.load("demo")
    assert model.info.path == str(pth) and model.info.n_layer == 2
    (tmp_path / "data" / "demo-v7-32x2.gguf").write_bytes(b"")
    assert demo.demo_model_path().endswith(".gguf")  # GGUF first
