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
import math
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch

from .config import ModelConfig, Version
from .errors import StateError

MAGIC = b"RWKVSTAT"
FILE_VERSION = 2  # 1: the checksum (in the header) covers the data only; still read
_TENSORS = ("att_x", "ffn_x", "wkv", "last_logits")


def _show(v) -> str:
    try:
        r = repr(v)
    except (ValueError, RecursionError):  # an int of too many digits, a value nested too deep
        return f"a {type(v).__name__}"
    return r if len(r) <= 60 else r[:57] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _float_tensor(t, name, device, source) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise StateError(f"{source}: {name} is a {type(t).__name__}, expected a torch tensor")
    if t.device.type == "meta":
        raise StateError(f"{source}: {name} is on the meta device: it holds no values")
    if not t.is_floating_point():
        raise StateError(
            f"{source}: {name} has dtype {t.dtype}, expected float32 (float16, "
            "bfloat16 and float64 are converted)"
        )
    t = t.detach().to(device=device, dtype=torch.float32).contiguous()
    if not bool(torch.isfinite(t).all()):
        raise StateError(f"{source}: {name} holds NaN or infinite values")
    return t


def _check_header(header, path, version) -> tuple:
    """(tensors, Version, n_tokens) of a state file's header, every field checked for its type,
    its range and its agreement with the others; StateError naming the field otherwise."""

    def fail(what):
        return StateError(f"{path}: corrupt state header: {what}")

    if not isinstance(header, dict):
        raise fail(f"a {type(header).__name__}, expected an object")
    for key in ("architecture", "n_layer", "n_embd", "wkv_shape", "n_tokens", "tensors"):
        if key not in header:
            raise fail(f"field '{key}' is missing")
    try:
        arch = Version(header["architecture"])
    except (ValueError, TypeError):
        raise StateError(f"{path}: unknown architecture {_show(header['architecture'])}") from None
    L, C, n_tokens = header["n_layer"], header["n_embd"], header["n_tokens"]
    for key, v in (("n_layer", L), ("n_embd", C)):
        if not _is_int(v) or not 0 < v <= 1 << 20:
            raise fail(f"'{key}' is {_show(v)}, expected an int from 1 to {1 << 20}")
    if not _is_int(n_tokens) or n_tokens < 0:
        raise fail(f"'n_tokens' is {_show(n_tokens)}, expected an int >= 0")
    if not isinstance(header.get("model_fingerprint", ""), str):
        raise fail(
            f"'model_fingerprint' is {_show(header['model_fingerprint'])}, expected a string"
        )
    if version < 2 and not isinstance(header.get("sha256"), str):
        raise fail("field 'sha256' is missing")
    if not isinstance(header.get("extra", {}), dict):
        raise fail(f"'extra' is {_show(header['extra'])}, expected an object")
    tensors = header["tensors"]
    if not isinstance(tensors, dict):
        raise fail(f"'tensors' is {_show(tensors)}, expected an object")
    for key in tensors:
        if key not in _TENSORS:
            raise fail(f"unknown tensor {_show(key)}")
    for key in _TENSORS[:3]:
        if key not in tensors:
            raise fail(f"tensor '{key}' is missing")
    for key, t in tensors.items():
        if not isinstance(t, dict) or set(t) != {"shape", "offset", "nbytes"}:
            raise fail(f"tensor '{key}' is {_show(t)}, expected shape, offset and nbytes")
        shape, nbytes = t["shape"], t["nbytes"]
        if (
            not isinstance(shape, list)
            or not 1 <= len(shape) <= 4
            or not all(_is_int(d) and 0 < d <= 1 << 31 for d in shape)
        ):
            raise fail(f"tensor '{key}' has shape {_show(shape)}, expected 1 to 4 sizes > 0")
        if not _is_int(nbytes) or nbytes != 4 * math.prod(shape):
            raise fail(
                f"tensor '{key}' has nbytes {_show(nbytes)}, its shape {shape} needs "
                f"{4 * math.prod(shape)}"
            )
        if not _is_int(t["offset"]):
            raise fail(f"tensor '{key}' has offset {_show(t['offset'])}, expected an int")
    end = 0
    for key in sorted(tensors, key=lambda k: tensors[k]["offset"]):
        if tensors[key]["offset"] != end:  # packed one after another from offset 0
            raise fail(f"tensor '{key}' at offset {tensors[key]['offset']}, expected {end}")
        end += tensors[key]["nbytes"]
    wkv_shape = header["wkv_shape"]
    if tensors["wkv"]["shape"] != wkv_shape:
        raise fail(
            f"'wkv_shape' {_show(wkv_shape)} is not the wkv tensor's shape "
            f"{tensors['wkv']['shape']}"
        )
    for key in ("att_x", "ffn_x"):
        if tensors[key]["shape"] != [L, C]:
            raise fail(
                f"tensor '{key}' has shape {tensors[key]['shape']}, expected [{L}, {C}] "
                "(n_layer, n_embd)"
            )
    dims = 3 if arch is Version.V4 else 4
    if len(wkv_shape) != dims or wkv_shape[0] != L or (arch is Version.V4 and wkv_shape[1] != 3):
        raise fail(f"wkv shape {wkv_shape} does not fit {arch.label} with {L} layers")
    if "last_logits" in tensors and len(tensors["last_logits"]["shape"]) != 1:
        raise fail(
            f"tensor 'last_logits' has shape {tensors['last_logits']['shape']}, "
            "expected one dimension"
        )
    return tensors, arch, n_tokens


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
    def zeros(cls, cfg: ModelConfig, device="cpu") -> State:
        L, C = cfg.n_layer, cfg.n_embd
        if cfg.version is Version.V4:
            wkv = torch.zeros(L, 3, cfg.n_att, dtype=torch.float32, device=device)
            wkv[:, 2] = -1e30  # pp: log-scale exponent of the empty sum
        else:
            N = cfg.head_size
            wkv = torch.zeros(L, cfg.n_head, N, N, dtype=torch.float32, device=device)
        z = torch.zeros(L, C, dtype=torch.float32, device=device)
        return cls(cfg.version, z, z.clone(), wkv, 0)

    def to(self, device) -> State:
        """This state on ``device`` (itself if it is there already)."""
        device = torch.device(device)
        if self.wkv.device == device:
            return self
        last = None if self.last_logits is None else self.last_logits.to(device)
        return State(
            self.version,
            self.att_x.to(device),
            self.ffn_x.to(device),
            self.wkv.to(device),
            self.n_tokens,
            self.model_fingerprint,
            last,
        )

    def copy(self) -> State:
        return State(
            self.version,
            self.att_x.clone(),
            self.ffn_x.clone(),
            self.wkv.clone(),
            self.n_tokens,
            self.model_fingerprint,
            None if self.last_logits is None else self.last_logits.clone(),
        )

    # -- checks ---------------------------------------------------------------------------------
    def ready(self, device="cpu", vocab_size: int | None = None, source: str = "state") -> State:
        """This state as the kernels take it: att_x, ffn_x, wkv (and last_logits) float32,
        contiguous and on ``device``, every value finite, ``n_tokens`` an int >= 0. Float16,
        bfloat16 and float64 tensors, other devices and other layouts are converted (the kernels
        are compiled for float32 only); integer, bool or complex tensors, the meta device, NaN
        or infinity raise StateError. The result is marked, so that a state that passed (and
        the states ``Model.forward`` returns) is not checked again."""
        device = torch.device(device)
        if self.__dict__.get("_ready_on") == device:
            return self
        if not isinstance(self.version, Version):
            raise StateError(f"{source}: version is {_show(self.version)}, expected a Version")
        n = self.n_tokens
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise StateError(f"{source}: n_tokens is {_show(n)}, expected an int >= 0")
        if not isinstance(self.model_fingerprint, str):
            raise StateError(
                f"{source}: model_fingerprint is {_show(self.model_fingerprint)}, expected a string"
            )
        att_x, ffn_x, wkv = (
            _float_tensor(getattr(self, k), k, device, source) for k in ("att_x", "ffn_x", "wkv")
        )
        last = self.last_logits
        if last is not None:
            last = _float_tensor(last, "last_logits", device, source)
            if last.dim() != 1 or (vocab_size is not None and last.shape[0] != vocab_size):
                raise StateError(
                    f"{source}: last_logits has shape {tuple(last.shape)}, expected "
                    f"({vocab_size if vocab_size is not None else 'vocab'},)"
                )
        out = State(self.version, att_x, ffn_x, wkv, int(n), self.model_fingerprint, last)
        out.mark_ready(device)
        return out

    def mark_ready(self, device) -> None:
        """Mark this state as checked for ``device`` (see :meth:`ready`): for the states the
        model's own kernels make."""
        object.__setattr__(self, "_ready_on", torch.device(device))

    # -- files ------------------------------------------------------------------------------------
    def save(self, path, extra: dict | None = None) -> None:
        """Write the state to a file (atomically), with its metadata and a SHA-256 checksum.

        Layout (file version 2): b"RWKVSTAT", uint32 file version, uint64 header length, JSON
        header, the float32 tensors att_x, ffn_x, wkv and (if present) last_logits,
        little-endian, then the 32-byte SHA-256 of every byte before it (header included).
        ``extra``, a JSON object, is kept in the header (under ``"extra"``, so covered by the
        checksum) and given back by :meth:`load_with_extra`: what belongs with the state in
        the same single file (a chat's transcript). A folder that is missing or not writable,
        or a destination that is not a regular file, raise FileWriteError naming the file.
        """
        from .formats.atomic import atomic_write

        if extra is not None and not isinstance(extra, dict):
            raise StateError(f"{path}: extra is a {type(extra).__name__}, expected a dict")
        arrays = {"att_x": self.att_x, "ffn_x": self.ffn_x, "wkv": self.wkv}
        if self.last_logits is not None:
            arrays["last_logits"] = self.last_logits
        payload, tensors, off = [], {}, 0
        for name, t in arrays.items():
            b = t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()
            tensors[name] = {"shape": list(t.shape), "offset": off, "nbytes": len(b)}
            payload.append(b)
            off += len(b)
        header = {
            "architecture": self.version.value,
            "n_layer": int(self.att_x.shape[0]),
            "n_embd": int(self.att_x.shape[1]),
            "wkv_shape": list(self.wkv.shape),
            "model_fingerprint": self.model_fingerprint,
            "n_tokens": int(self.n_tokens),
            "tensors": tensors,
        }
        if extra is not None:
            header["extra"] = extra
        try:
            hb = json.dumps(header, sort_keys=True, allow_nan=False).encode()
        except (TypeError, ValueError, RecursionError) as e:
            raise StateError(f"{path}: extra cannot be stored as JSON: {e}") from None
        body = MAGIC + struct.pack("<IQ", FILE_VERSION, len(hb)) + hb + b"".join(payload)
        with atomic_write(path) as f:
            f.write(body + hashlib.sha256(body).digest())

    @classmethod
    def load(cls, path, model=None) -> State:
        """Read a state file; with ``model``, check that the state belongs to it. Every way a
        file can be wrong (not a regular file, truncated, a header field missing, of the wrong
        type or inconsistent, a checksum mismatch, NaN values) raises StateError."""
        return cls.load_with_extra(path, model)[0]

    @classmethod
    def load_with_extra(cls, path, model=None) -> tuple:
        """(state, extra) of a state file: :meth:`load`, and the ``extra`` object given to
        :meth:`save` (None when it was given none)."""
        from .formats.atomic import require_regular

        path = os.fspath(path)
        require_regular(path, StateError)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise StateError(f"{path}: cannot read: {e.strerror}") from None
        if raw[:8] != MAGIC:
            raise StateError(
                f"{path}: not an rwkvpy state file (starts with {raw[:8]!r}, expected {MAGIC!r})"
            )
        if len(raw) < 20:
            raise StateError(f"{path}: truncated state file ({len(raw)} bytes)")
        version, hlen = struct.unpack_from("<IQ", raw, 8)
        if version not in (1, FILE_VERSION):
            raise StateError(f"{path}: state file version {version}, expected {FILE_VERSION}")
        digest = 32 if version >= 2 else 0
        if hlen > len(raw) - 20 - digest:
            raise StateError(
                f"{path}: truncated state file: a {hlen}-byte header announced, "
                f"{len(raw) - 20} bytes follow"
            )
        try:
            header = json.loads(raw[20 : 20 + hlen])
        except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deep
            raise StateError(f"{path}: corrupt state header (not JSON)") from None
        tensors, arch, n_tokens = _check_header(header, path, version)
        data = raw[20 + hlen : len(raw) - digest]
        want = sum(t["nbytes"] for t in tensors.values())
        if len(data) != want:
            raise StateError(
                f"{path}: truncated or padded: {len(data)} data bytes, expected {want}"
            )
        if version >= 2:
            ok = hashlib.sha256(raw[:-32]).digest() == raw[-32:]
        else:  # version 1: the checksum in the header covers the data only
            ok = hashlib.sha256(data).hexdigest() == header.get("sha256")
        if not ok:
            raise StateError(f"{path}: checksum mismatch: the file is corrupt")

        def get(name):
            t = tensors[name]
            a = np.frombuffer(data, "<f4", t["nbytes"] // 4, t["offset"]).reshape(t["shape"])
            return torch.from_numpy(a.astype(np.float32))

        state = cls(
            arch,
            get("att_x"),
            get("ffn_x"),
            get("wkv"),
            n_tokens,
            header.get("model_fingerprint", ""),
            get("last_logits") if "last_logits" in tensors else None,
        )
        state = state.ready("cpu", source=path)
        if model is not None:
            model.check_state(state, source=path)
        return state, header.get("extra")

    @classmethod
    def from_file(cls, path, model) -> State:
        """A starting state from a file, whichever kind it is: an rwkvpy state file
        (:meth:`save`, told by its magic) or a BlinkDL state-tuned ``.pth``
        (:meth:`from_time_state`). A missing, unreadable or non-regular file is a StateError."""
        from .formats.atomic import require_regular

        require_regular(path, StateError)  # a FIFO would block the open below
        try:
            with open(path, "rb") as f:
                head = f.read(len(MAGIC))
        except FileNotFoundError:
            raise StateError(f"{path}: no such state file") from None
        except OSError as e:
            raise StateError(f"{path}: cannot read: {e.strerror}") from None
        return cls.load(path, model) if head == MAGIC else cls.from_time_state(path, model)

    @classmethod
    def from_time_state(cls, path, model) -> State:
        """A starting state from BlinkDL's state tuning: a .pth with blocks.N.att.time_state."""
        from .formats import read, to_float32

        ckpt = read(path)
        cfg = model.config
        if cfg.version not in (Version.V5_2, Version.V6):
            raise StateError(
                f"{path}: state-tuned files are supported for RWKV v5.2 and v6 "
                f"models, this model is {cfg.version.label}"
            )
        zero = cls.zeros(cfg)
        layers = []
        for i in range(cfg.n_layer):
            name = f"blocks.{i}.att.time_state"
            if name not in ckpt.tensors:
                raise StateError(
                    f"{path}: tensor '{name}' not found: not a state-tuning file "
                    f"for this {cfg.n_layer}-layer model"
                )
            t = to_float32(ckpt.tensors[name])
            if tuple(t.shape) != tuple(zero.wkv.shape[1:]):
                raise StateError(
                    f"{path}: '{name}' has shape {tuple(t.shape)}, expected "
                    f"{tuple(zero.wkv.shape[1:])}"
                )
            layers.append(
                t.transpose(1, 2)
            )  # stored (H, N_v, N_k); the recurrence uses (H, N_k, N_v)
        return cls(
            cfg.version,
            zero.att_x,
            zero.ffn_x,
            torch.stack(layers).contiguous(),
            0,
            model.fingerprint,
        )

    @property
    def device(self) -> torch.device:
        return self.wkv.device
