"""The RNN state of one sequence.

A :class:`State` is a value: ``Model.forward`` returns a new one and never changes the one it is
given. Layout (L layers, C = n_embd, H heads of size N):

- ``att_x`` (L, C): the last token's ln1 output, for the time-mix token shift;
- ``ffn_x`` (L, C): the last token's ln2 output, for the channel-mix token shift;
- ``wkv``: v4 (L, 3, n_att) = numerator ``aa``, denominator ``bb``, exponent ``pp``;
  v5/v6 (L, H, N_k, N_v); v7 (L, H, N_v, N_k) (each version's own orientation of the matrix).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch

from .errors import StateError
from .models.config import ModelConfig, Version

MAGIC = b"RWKVSTAT"
FILE_VERSION = 1


@dataclass(frozen=True)
class State:
    version: Version
    att_x: torch.Tensor
    ffn_x: torch.Tensor
    wkv: torch.Tensor
    n_tokens: int = 0
    model_fingerprint: str = ""  # of the model that made it (see Model.fingerprint)
    last_logits: torch.Tensor | None = None  # logits after the last token consumed

    @classmethod
    def zeros(cls, cfg: ModelConfig, device="cpu") -> "State":
        L, C = cfg.n_layer, cfg.n_embd
        if cfg.version is Version.V4:
            wkv = torch.zeros(L, 3, cfg.n_att, dtype=torch.float32, device=device)
            wkv[:, 2] = -1e30  # pp: log-scale exponent of the empty sum
        else:
            N = cfg.head_size
            wkv = torch.zeros(L, cfg.n_head, N, N, dtype=torch.float32, device=device)
        z = torch.zeros(L, C, dtype=torch.float32, device=device)
        return cls(cfg.version, z, z.clone(), wkv, 0)

    def to(self, device) -> "State":
        """This state on ``device`` (itself if it is there already)."""
        device = torch.device(device)
        if self.wkv.device == device:
            return self
        last = None if self.last_logits is None else self.last_logits.to(device)
        return State(self.version, self.att_x.to(device), self.ffn_x.to(device),
                     self.wkv.to(device), self.n_tokens, self.model_fingerprint, last)

    def copy(self) -> "State":
        return State(self.version, self.att_x.clone(), self.ffn_x.clone(), self.wkv.clone(),
                     self.n_tokens, self.model_fingerprint,
                     None if self.last_logits is None else self.last_logits.clone())

    # -- files ------------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the state to a file (atomically), with its metadata and a SHA-256 checksum.

        Layout: b"RWKVSTAT", uint32 file version, uint64 header length, JSON header, then the
        float32 tensors att_x, ffn_x, wkv and (if present) last_logits, little-endian.
        """
        from .formats.atomic import atomic_write

        arrays = {"att_x": self.att_x, "ffn_x": self.ffn_x, "wkv": self.wkv}
        if self.last_logits is not None:
            arrays["last_logits"] = self.last_logits
        payload, tensors, off = [], {}, 0
        for name, t in arrays.items():
            b = t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()
            tensors[name] = {"shape": list(t.shape), "offset": off, "nbytes": len(b)}
            payload.append(b)
            off += len(b)
        data = b"".join(payload)
        header = {
            "architecture": self.version.value, "n_layer": int(self.att_x.shape[0]),
            "n_embd": int(self.att_x.shape[1]), "wkv_shape": list(self.wkv.shape),
            "model_fingerprint": self.model_fingerprint, "n_tokens": self.n_tokens,
            "tensors": tensors, "sha256": hashlib.sha256(data).hexdigest(),
        }
        hb = json.dumps(header, sort_keys=True).encode()
        with atomic_write(path) as f:
            f.write(MAGIC + struct.pack("<IQ", FILE_VERSION, len(hb)) + hb + data)

    @classmethod
    def load(cls, path, model=None) -> "State":
        """Read a state file; with ``model``, check that the state belongs to it."""
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise StateError(f"{path}: cannot read: {e.strerror}") from None
        if raw[:8] != MAGIC:
            raise StateError(f"{path}: not an rwkvpy state file (starts with {raw[:8]!r}, "
                             f"expected {MAGIC!r})")
        if len(raw) < 20:
            raise StateError(f"{path}: truncated state file ({len(raw)} bytes)")
        version, hlen = struct.unpack_from("<IQ", raw, 8)
        if version != FILE_VERSION:
            raise StateError(f"{path}: state file version {version}, expected {FILE_VERSION}")
        try:
            header = json.loads(raw[20:20 + hlen])
            data = raw[20 + hlen:]
            tensors = header["tensors"]
            want = sum(t["nbytes"] for t in tensors.values())
        except (ValueError, KeyError, TypeError):
            raise StateError(f"{path}: corrupt state header") from None
        if len(data) != want:
            raise StateError(f"{path}: truncated or padded: {len(data)} data bytes, expected {want}")
        if hashlib.sha256(data).hexdigest() != header.get("sha256"):
            raise StateError(f"{path}: checksum mismatch: the file is corrupt")

        def get(name):
            t = tensors[name]
            a = np.frombuffer(data, "<f4", t["nbytes"] // 4, t["offset"]).reshape(t["shape"])
            return torch.from_numpy(a.astype(np.float32))

        try:
            arch = Version(header["architecture"])
        except ValueError:
            raise StateError(f"{path}: unknown architecture {header['architecture']!r}") from None
        state = cls(arch, get("att_x"), get("ffn_x"), get("wkv"), int(header["n_tokens"]),
                    header.get("model_fingerprint", ""),
                    get("last_logits") if "last_logits" in tensors else None)
        if model is not None:
            model.check_state(state, source=path)
        return state

    @classmethod
    def from_time_state(cls, path, model) -> "State":
        """A starting state from BlinkDL's state tuning: a .pth with blocks.N.att.time_state."""
        from .formats import read, to_float32

        ckpt = read(path)
        cfg = model.config
        if cfg.version not in (Version.V5_2, Version.V6):
            raise StateError(f"{path}: state-tuned files are supported for RWKV v5.2 and v6 "
                             f"models, this model is {cfg.version.label}")
        zero = cls.zeros(cfg)
        layers = []
        for i in range(cfg.n_layer):
            name = f"blocks.{i}.att.time_state"
            if name not in ckpt.tensors:
                raise StateError(f"{path}: tensor '{name}' not found: not a state-tuning file "
                                 f"for this {cfg.n_layer}-layer model")
            t = to_float32(ckpt.tensors[name])
            if tuple(t.shape) != tuple(zero.wkv.shape[1:]):
                raise StateError(f"{path}: '{name}' has shape {tuple(t.shape)}, expected "
                                 f"{tuple(zero.wkv.shape[1:])}")
            layers.append(t.transpose(1, 2))  # stored (H, N_v, N_k); the recurrence uses (H, N_k, N_v)
        return cls(cfg.version, zero.att_x, zero.ffn_x, torch.stack(layers).contiguous(), 0,
                   model.fingerprint)

    @property
    def device(self) -> torch.device:
        return self.wkv.device
