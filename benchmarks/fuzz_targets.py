"""The fuzz targets of rwkvpy's readers (issue 23, docs/reliability.md): one per kind of input
a user may get from a stranger, each taking the bytes of one file, reading it with rwkvpy's
public API and using what it read (a forward, an encode and a decode).

A target returns normally when the input loaded, and raises whatever rwkvpy raised otherwise:
the driver (benchmarks/fuzz.py) counts a ``rwkvpy.errors.RwkvpyError`` as typed and anything
else as a finding. Inputs that need other files (a state needs its model, a LoRA its base, a
chat transcript its state) find them in a context folder made once from the files under
``tests/fuzz_corpus/_context`` (committed, small).

The seed corpus (``tests/fuzz_corpus/TARGET/``) is made by ``make_corpus`` from rwkvpy.synth and
the converters, kept small, and committed; every input that once failed is kept under
``tests/fuzz_corpus/regressions/TARGET/`` and replayed by tests/test_fuzz.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import struct
import tempfile
import warnings
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "fuzz_corpus"
CONTEXT = CORPUS / "_context"
REGRESSIONS = CORPUS / "regressions"

#: text every tokenizer target encodes: ASCII, CJK, an emoji, a combining mark, controls
SAMPLE = "Hello, world! 你好 😀 e\u0301 \t\n\x00 end"


class Context:
    """The files targets read besides their input, in a temporary folder, and the models
    loaded once (loading the base model for every input would dominate the time)."""

    def __init__(self):
        import rwkvpy

        self.dir = Path(tempfile.mkdtemp(prefix="rwkvpy-fuzz-"))
        self.base = str(CONTEXT / "base.pth")  # v7, 32 wide, 1 layer, vocab 256, float16
        self.model = rwkvpy.load(self.base, cache=False)
        self.state = str(CONTEXT / "chat.state")  # the state the chat seeds belong to
        self.weights = str(CONTEXT / "model.safetensors")  # the HF folder's weights
        self.n = 0

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def write(self, name: str, data: bytes) -> str:
        p = self.path(name)
        with open(p, "wb") as f:
            f.write(data)
        return p


def _forward(model):
    import torch

    lg, state = model.forward([1])
    lg2, _ = model.forward([0, 1], state)
    assert lg.shape == lg2.shape and lg.dtype == torch.float32


def _use_tokenizer(tok):
    ids = tok.encode(SAMPLE)
    tok.decode(ids)
    if tok.vocab_size:
        tok.decode(list(range(min(tok.vocab_size, 4096))))
    from rwkvpy.tokenizers import StreamDecoder

    dec = StreamDecoder(tok)
    "".join(dec.feed([i]) for i in ids[:64]) + dec.flush()


# -- targets: bytes of one file -> loaded (return) or an exception -----------------------------


def model_file(ext):
    def run(data: bytes, ctx: Context):
        import rwkvpy

        path = ctx.write("input" + ext, data)
        _forward(rwkvpy.load(path, cache=False))

    return run


def hf_config(data: bytes, ctx: Context):
    import rwkvpy

    folder = Path(ctx.path("hf"))
    folder.mkdir(exist_ok=True)
    if not (folder / "model.safetensors").exists():
        os.symlink(ctx.weights, folder / "model.safetensors")
    (folder / "config.json").write_bytes(data)
    _forward(rwkvpy.load(folder, cache=False))


def state_file(data: bytes, ctx: Context):
    from rwkvpy import State

    s = State.load(ctx.write("input.state", data), ctx.model)
    ctx.model.forward([1], s)


def chat_file(data: bytes, ctx: Context):
    import shutil

    from rwkvpy.chat import SIDECAR_SUFFIX, ChatSession
    from rwkvpy.tokenizers import ByteTokenizer

    if data[:8] == b"RWKVSTAT":  # a chat saved as one file: the state holding the transcript
        path = ctx.write("chat-one.state", data)
    else:  # the older layout's transcript, beside the state it records
        path = ctx.path("chat.state")
        if not os.path.exists(path):
            shutil.copyfile(ctx.state, path)
        ctx.write("chat.state" + SIDECAR_SUFFIX, data)
    session = ChatSession(ctx.model, ByteTokenizer())
    session.load(path)
    ctx.model.forward([1], session.state)
    session.tokenizer.decode(session.tokens)


def lora_file(data: bytes, ctx: Context):
    import rwkvpy
    from rwkvpy.lora import merge_lora

    lora = ctx.write("lora.pth", data)
    out = ctx.path("merged.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tensors that match nothing: warned, not used
        merge_lora(ctx.base, lora, out, alpha=16, force=True, progress=False)
    _forward(rwkvpy.load(out, cache=False))


def world_vocab(data: bytes, ctx: Context):
    from rwkvpy.tokenizers import WorldTokenizer

    _use_tokenizer(WorldTokenizer(ctx.write(f"vocab{ctx.n}.txt", data)))


def tokenizer_json(data: bytes, ctx: Context):
    from rwkvpy.tokenizers import NeoXTokenizer

    _use_tokenizer(NeoXTokenizer(ctx.write("tokenizer.json", data)))


def gguf_vocab(data: bytes, ctx: Context):
    from rwkvpy.formats.vocabulary import model_tokenizer

    _use_tokenizer(model_tokenizer(ctx.write("vocab.gguf", data), 512))


# -- structure-aware fix-ups: what a mutation broke that is not the point of the test ----------


def fix_state(data: bytes) -> bytes:
    """A state file's trailing SHA-256 recomputed (else every mutant is a checksum mismatch)."""
    if len(data) > 52 and data[:8] == b"RWKVSTAT":
        body = data[:-32]
        return body + hashlib.sha256(body).digest()
    return data


def fix_zip(data: bytes, rng: random.Random, mutate) -> bytes:
    """A member of a zip archive (a .pth) mutated and the archive rewritten with valid CRCs
    (else most mutants fail the CRC check before reaching the pickle or the data)."""
    try:
        zin = zipfile.ZipFile(io.BytesIO(data))
        infos = zin.infolist()
        pick = rng.randrange(len(infos))
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
            for i, info in enumerate(infos):
                raw = zin.read(info)
                zout.writestr(info, mutate(raw) if i == pick else raw)
        return out.getvalue()
    except Exception:  # noqa: BLE001 - not a zip (any more): the plain mutant
        return data


def fix_safetensors(data: bytes, rng: random.Random, mutate) -> bytes:
    """The JSON header of a safetensors file mutated as JSON, its length prefix kept right."""
    if len(data) < 8:
        return data
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        return data
    head = mutate_json(data[8 : 8 + n], rng)
    return len(head).to_bytes(8, "little") + head + data[8 + n :]


# -- mutations from a seeded RNG (the CI tier: no atheris needed) -------------------------------

INTERESTING = [
    0,
    1,
    2,
    7,
    0x7F,
    0x80,
    0xFF,
    0x7FFF,
    0xFFFF,
    0x7FFFFFFF,
    0x80000000,
    0xFFFFFFFF,
    1 << 40,
    (1 << 63) - 1,
    1 << 63,
    (1 << 64) - 1,
]


def mutate_bytes(data: bytes, rng: random.Random, header: int = 4096) -> bytes:
    """1-4 byte-level mutations, most of them in the first ``header`` bytes."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not b:
            b += bytes([rng.randrange(256)])
        n = len(b)
        pos = rng.randrange(min(n, header)) if rng.random() < 0.7 else rng.randrange(n)
        op = rng.randrange(8)
        if op == 0:
            b[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[pos] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        elif op in (2, 3):
            size = rng.choice([1, 2, 4, 8])
            v = rng.choice(INTERESTING) & ((1 << (8 * size)) - 1)
            b[pos : pos + size] = v.to_bytes(size, rng.choice(["little", "big"]))
        elif op == 4:
            del b[rng.randrange(n) :]  # truncate
        elif op == 5:
            del b[pos : pos + rng.randint(1, 64)]
        elif op == 6:
            src = rng.randrange(n)
            b[pos:pos] = b[src : src + rng.randint(1, 64)]
        else:
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(b)


def _json_values(rng):
    return rng.choice(
        [
            None,
            True,
            False,
            0,
            -1,
            1,
            2**31,
            2**64,
            -(2**63),
            1.5,
            1e308,
            float("nan"),
            float("inf"),
            "",
            "x",
            "\ud800",
            "a" * 300,
            "../../x",
            [],
            [1],
            {},
            {"a": 1},
            [[[[[]]]]],
            "7",
            "rwkv7",
        ]
    )


def mutate_json(data: bytes, rng: random.Random) -> bytes:
    """A JSON document with one value replaced, a key removed or a list emptied; plain byte
    mutations when it is not JSON."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return mutate_bytes(data, rng)
    nodes = []

    def walk(x, depth=0):
        if depth > 20:
            return
        if isinstance(x, dict):
            for k in list(x):
                nodes.append((x, k))
                walk(x[k], depth + 1)
        elif isinstance(x, list):
            for i in range(min(len(x), 50)):
                nodes.append((x, i))
                walk(x[i], depth + 1)

    walk(doc)
    if not nodes:
        return json.dumps(_json_values(rng)).encode()
    for _ in range(rng.randint(1, 3)):
        parent, key = nodes[rng.randrange(len(nodes))]
        op = rng.randrange(4)
        try:
            if op == 0 and isinstance(parent, dict):
                del parent[key]
            elif op == 1 and isinstance(parent[key], int) and not isinstance(parent[key], bool):
                parent[key] = rng.choice(
                    [0, -1, parent[key] + 1, parent[key] * 2**32, -parent[key]]
                )
            else:
                parent[key] = _json_values(rng)
        except (KeyError, IndexError, TypeError):
            pass
    try:
        return json.dumps(doc, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
    except (ValueError, RecursionError):
        return data


def mutator(kind):
    """The seeded mutation of a target's inputs: byte mutations, plus JSON-aware ones and
    fix-ups for formats whose checksums or length prefixes would stop most mutants early."""

    def mutate(data: bytes, rng: random.Random) -> bytes:
        r = rng.random()
        k = kind
        if k == "chat":  # a chat is a state file (one-file saves) or a JSON transcript
            k = "state" if data[:8] == b"RWKVSTAT" else "json"
        if k == "json" and r < 0.6:
            return mutate_json(data, rng)
        if k == "state":
            if r < 0.3 and len(data) > 20:
                n = int.from_bytes(data[12:20], "little")
                head = mutate_json(data[20 : 20 + n], rng)
                data = data[:12] + struct.pack("<Q", len(head)) + head + data[20 + n :]
                return fix_state(data)
            out = mutate_bytes(data, rng)
            return fix_state(out) if r < 0.8 else out
        if k == "zip" and r < 0.7:
            return fix_zip(data, rng, lambda raw: mutate_bytes(raw, rng))
        if k == "safetensors" and r < 0.5:
            return fix_safetensors(data, rng, None)
        return mutate_bytes(data, rng)

    return mutate


class Target:
    def __init__(self, run, kind="bytes", ext=""):
        self.run, self.kind, self.ext = run, kind, ext
        self.mutate = mutator(kind)


TARGETS = {
    "gguf": Target(model_file(".gguf")),
    "bin": Target(model_file(".bin")),
    "pth": Target(model_file(".pth"), "zip"),
    "safetensors": Target(model_file(".safetensors"), "safetensors"),
    "hf-config": Target(hf_config, "json"),
    "state": Target(state_file, "state"),
    "chat": Target(chat_file, "chat"),
    "lora": Target(lora_file, "zip"),
    "world-vocab": Target(world_vocab),
    "tokenizer-json": Target(tokenizer_json, "json"),
    "gguf-vocab": Target(gguf_vocab),
}


def seeds(name: str) -> list[Path]:
    return sorted(p for p in (CORPUS / name).iterdir() if p.is_file())


def regressions(name: str) -> list[Path]:
    folder = REGRESSIONS / name
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
