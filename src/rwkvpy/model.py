"""The public model object: load a file, make states, run tokens."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import coldstart, formats, models, runtime
from .config import ModelConfig, Version
from .errors import RwkvpyError, StateError, TokenError
from .state import State

if TYPE_CHECKING:  # imported when a model is built: importing rwkvpy loads no kernel module
    from .kernels.plan import KernelPlan


@dataclass(frozen=True)
class ModelInfo:
    path: str
    format: str
    version: Version
    n_embd: int
    n_layer: int
    n_head: int
    head_size: int
    vocab_size: int
    n_ffn: int
    params: int
    file_size: int
    tensor_types: dict  # type name -> number of tensors stored in it
    tensor_bytes: dict  # type name -> bytes stored in it
    file_meta: dict

    def summary(self) -> dict:
        return {
            "path": self.path,
            "format": self.format,
            "version": self.version.value,
            "architecture": self.version.label,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "head_size": self.head_size,
            "vocab_size": self.vocab_size,
            "n_ffn": self.n_ffn,
            "params": self.params,
            "file_size": self.file_size,
            "tensor_types": dict(self.tensor_types),
            "tensor_bytes": dict(self.tensor_bytes),
            **({"file": self.file_meta} if self.file_meta else {}),
        }


def _nbytes(t) -> int:
    if isinstance(t, formats.QTensor):
        return t.nbytes
    return t.numel() * t.element_size()


def describe(ckpt: formats.Checkpoint, cfg: ModelConfig) -> ModelInfo:
    """What a checkpoint holds, without materializing any weight."""
    types: dict = {}
    sizes: dict = {}
    for name, t in ckpt.tensors.items():
        typ = ckpt.file_types.get(name, formats.type_name(t))
        types[typ] = types.get(typ, 0) + 1
        sizes[typ] = sizes.get(typ, 0) + _nbytes(t)
    params = sum(int(torch.Size(t.shape).numel()) for t in ckpt.tensors.values())
    return ModelInfo(
        path=ckpt.path,
        format=ckpt.format,
        version=cfg.version,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        head_size=cfg.head_size,
        vocab_size=cfg.vocab_size,
        n_ffn=cfg.n_ffn,
        params=params,
        file_size=ckpt.file_size,
        tensor_types=types,
        tensor_bytes=sizes,
        file_meta=dict(ckpt.meta),
    )


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _show(v) -> str:
    try:
        r = repr(v)
    except Exception:  # noqa: BLE001 - a user's object whose repr fails: name its type only
        return f"a {type(v).__name__}"
    return r if len(r) <= 40 else r[:37] + "..."


class Model:
    """An RWKV model ready to run. Build it with :func:`rwkvpy.load`."""

    def __init__(self, ckpt: formats.Checkpoint, cfg: ModelConfig, plan: KernelPlan | None = None):
        """The model of ``ckpt`` (its ``cfg``) with the fast paths of ``plan``
        (kernels.plan.choose; default: mode "fast", every layer on the CPU, no repack
        cache)."""
        if plan is None:
            from .kernels.plan import choose

            plan = choose(cfg.n_layer)
        #: the fast paths chosen for this model (kernels.plan.KernelPlan)
        self.plan = plan
        self.config = cfg
        self.mode = plan.mode
        self.info = describe(ckpt, cfg)
        self.devices = plan.devices
        self.device = plan.devices[-1]  # where the head is: the logits come out here
        self.state_device = plan.state_device
        #: the CPU kernels in force (kernels.cpu.CpuKernels: capability level, host, forced)
        self.cpu_kernels = plan.cpu
        self._net, repack = plan.build(cfg, ckpt.tensors, ckpt.path)
        #: what the repack cache (kernels/cache.py) did: "hit", "written", "none" (nothing to
        #: cache), "not written: ...", or "off"
        self.repack_cache: str = repack
        self._fingerprint: str | None = None
        self._state_shapes: tuple | None = None  # (att_x, wkv) shapes of this model's states
        self._tokenizers: dict = {}
        #: tokens per sequence-mode pass on the CPU (a longer prompt runs in pieces, the state
        #: carried: same result, activations bounded); None: one pass (GPUs)
        self.prompt_chunk = prompt_chunk(cfg.n_embd) if plan.cpu_only else None
        #: the one-token step (kernels' FusedStep or TorchStep); None: models/ code
        self._step: Any = plan.step(self._net)
        #: on a first run, the second process compiling the CPU step's kernels
        #: (rwkvpy.coldstart); single tokens take the sequence path until it is done
        self._warming = (
            coldstart.start(ckpt, cfg, plan.mode, plan.cpu.level)
            if self._step is not None and plan.cpu_only
            else None
        )

    def _one_token_step(self):
        """The one-token step, or None while its kernels compile in a second process."""
        if self._warming is not None:
            if not self._warming.ready():
                return None
            self._warming = None
        return self._step

    def wait_for_kernels(self, timeout: float | None = None) -> bool:
        """On a model's first run on a machine, wait (at most ``timeout`` seconds) for the
        second process that compiles its one-token step (rwkvpy.coldstart); returns whether
        single tokens now take that step (True at once when nothing was compiling). For
        timings that should not include a first run's sequence-path tokens."""
        if self._warming is not None:
            self._warming.wait(timeout)
        return self._one_token_step() is self._step

    @property
    def kernels(self) -> dict:
        """Which kernels run (kernels.plan.KernelPlan.describe): the mode, the CPU capability
        level (kernels.cpu), the product kernel per stored tensor type (e.g. ``{"Q4_0":
        "int8-dot", "F16": "numba-float"}``), the sequence recurrence and the one-token
        step."""
        described = self.plan.describe(self._net, self._step)
        if self._one_token_step() is None and self._step is not None:
            described["step"] += (
                " (compiling in a second process; meanwhile the sequence path: rwkvpy.coldstart)"
            )
        return described

    def synchronize(self) -> None:
        """Wait for the GPU work queued by forward calls (for timing; a no-op on the CPU)."""
        for d in set(self.devices):
            if d.type == "cuda":
                torch.cuda.synchronize(d)

    @property
    def gpu_layers(self) -> int:
        """How many layers run on a GPU."""
        return sum(d.type != "cpu" for d in self.devices)

    # -- states ------------------------------------------------------------------------------
    def new_state(self) -> State:
        return State.zeros(self.config, device=self.state_device)

    @property
    def fingerprint(self) -> str:
        """Identifies the model's weights across file formats and quantizations: a hash of the
        dims and of vectors every format keeps in float (the layer norms), rounded to bf16."""
        if self._fingerprint is None:
            h = hashlib.sha256(
                repr(
                    (
                        self.config.version.value,
                        self.config.n_embd,
                        self.config.n_layer,
                        self.config.vocab_size,
                    )
                ).encode()
            )
            for name in (
                "ln_out.weight",
                "ln_out.bias",
                "blocks.0.ln1.weight",
                "blocks.0.ln2.bias",
            ):
                h.update(
                    self._net.w[name].to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes()
                )
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def check_state(self, state: State, source: str = "state") -> None:
        """Raise StateError unless the state fits this model (and was made by it, if known)."""
        cfg = self.config
        if self._state_shapes is None:
            want = State.zeros(cfg, device="meta")
            self._state_shapes = want.att_x.shape, want.wkv.shape
        att_shape, wkv_shape = self._state_shapes
        tensors = isinstance(state, State) and all(
            isinstance(getattr(state, k), torch.Tensor) for k in ("att_x", "ffn_x", "wkv")
        )
        if (
            not tensors
            or state.version is not cfg.version
            or state.att_x.shape != att_shape
            or state.ffn_x.shape != att_shape
            or state.wkv.shape != wkv_shape
        ):
            got = (
                f"{getattr(state.version, 'label', state.version)}, wkv {tuple(state.wkv.shape)}"
                if tensors
                else type(state).__name__
            )
            raise StateError(
                f"{source} ({got}) does not fit this model ({cfg.version.label}, "
                f"wkv {tuple(wkv_shape)})"
            )
        if state.model_fingerprint and state.model_fingerprint != self.fingerprint:
            raise StateError(
                f"{source} was made by another model (fingerprint "
                f"{state.model_fingerprint}, this model is {self.fingerprint})"
            )

    # -- running ------------------------------------------------------------------------------
    def _own(self, state: State | None) -> State:
        """A fresh state for None; else the given one, checked, on this model's state device
        (a state made on another device, or read from a file, is copied there), its tensors
        float32 and contiguous, its values finite (State.ready)."""
        if state is None:
            return self.new_state()
        self.check_state(state)
        return state.ready(self.state_device, self.config.vocab_size)

    def _tokens(self, tokens) -> torch.Tensor:
        """The token ids as a 1-D int64 CPU tensor. Taken: an int, a list, tuple or range of
        ints, a 1-D integer tensor or numpy array; anything else (floats, bools, complex
        numbers, strings, bytes, None, nested lists, dicts, sets, generators, the meta
        device) and ids outside the vocabulary raise TokenError."""
        V = self.config.vocab_size
        if _is_int(tokens):
            tokens = [tokens]
        if (
            isinstance(tokens, list)
            and len(tokens) == 1
            and type(tokens[0]) is int
            and 0 <= tokens[0] < V
        ):  # the decode step's common case
            return torch.tensor(tokens)
        if isinstance(tokens, (torch.Tensor, np.ndarray)):
            if isinstance(tokens, torch.Tensor) and tokens.device.type == "meta":
                raise TokenError("tokens are on the meta device: they hold no values")
            dtype: Any = tokens.dtype
            integer = (
                dtype.kind in "iu"
                if isinstance(tokens, np.ndarray)
                else not (tokens.is_floating_point() or tokens.is_complex() or dtype == torch.bool)
            )
            if not integer:
                raise TokenError(f"tokens must be ints, got {dtype}")
            if tokens.ndim != 1 or tokens.shape[0] == 0:
                raise TokenError(
                    f"tokens must be a non-empty list of ints, got shape {tuple(tokens.shape)}"
                )
            ids = tokens.tolist()  # exact Python ints, whatever the width
        elif isinstance(tokens, (list, tuple, range)):
            ids = list(tokens)
            if not all(type(x) is int for x in ids):
                for i, x in enumerate(ids):
                    if not _is_int(x):
                        raise TokenError(
                            f"tokens must be ints: the one at position {i} is "
                            f"{_show(x)} ({type(x).__name__})"
                        )
                ids = [int(x) for x in ids]
            if not ids:
                raise TokenError("tokens must be a non-empty list of ints, got an empty list")
        else:
            raise TokenError(
                f"tokens must be an int or a list of ints, got {_show(tokens)} "
                f"({type(tokens).__name__})"
            )
        if min(ids) < 0 or max(ids) >= V:
            i = next(i for i, x in enumerate(ids) if not 0 <= x < V)
            raise TokenError(
                f"token id {ids[i]} at position {i} is out of range: "
                f"the vocabulary has ids 0..{V - 1}"
            )
        return torch.tensor(ids, dtype=torch.long)

    @torch.no_grad()
    def forward(self, tokens, state: State | None = None, all_logits: bool = False):
        """Run tokens from state (None = a fresh state); return (logits, new state).

        logits: float32 (vocab,) for the last token, or (T, vocab) with all_logits=True.
        The given state is never modified.
        """
        runtime.tick()  # torch's thread count for the machine's load (rwkvpy.runtime)
        t = self._tokens(tokens)
        state = self._own(state)
        step = self._one_token_step() if t.shape[0] == 1 else None
        if step is not None:
            logits, new = step(int(t[0]), state)
            if all_logits:
                logits = logits.unsqueeze(0)
        else:
            step = self.prompt_chunk or t.shape[0]
            new, parts = state, []
            for a in range(0, t.shape[0], step):
                x, new = self._net.hidden(t[a : a + step], new)
                parts.append(self._net.head(x) if all_logits else x[-1])
            logits = torch.cat(parts) if all_logits else self._net.head(parts[-1])
        new = dataclasses.replace(
            new,
            model_fingerprint=self.fingerprint,
            last_logits=(logits[-1] if all_logits else logits).clone(),
        )
        new.mark_ready(self.state_device)  # made by the kernels: float32, contiguous, on device
        return logits, new

    @torch.no_grad()
    def forward_batch(self, token_lists, states=None, all_logits: bool = False):
        """Run several independent sequences (ragged lengths), one state each.

        Returns (list of logits, list of new States), each as ``forward`` would return for that
        sequence alone. Sequences of one token (the decode step of a server) go through the
        model together, in one pass over the weights; longer ones run in sequence mode.
        """
        runtime.tick()
        if not isinstance(token_lists, (list, tuple)):
            raise TokenError(
                f"forward_batch takes a list of token lists, got "
                f"{_show(token_lists)} ({type(token_lists).__name__})"
            )
        if states is not None and not isinstance(states, (list, tuple)):
            raise StateError(
                f"forward_batch takes a list of states (or None), got {type(states).__name__}"
            )
        token_lists = list(token_lists)
        n = len(token_lists)
        states = [None] * n if states is None else list(states)
        if len(states) != n:
            raise TokenError(f"forward_batch got {n} token lists but {len(states)} states")
        ts = [self._tokens(t) for t in token_lists]
        states = [self._own(s) for s in states]
        logits: list[Any] = [None] * n
        new: list[Any] = [None] * n
        singles = [i for i, t in enumerate(ts) if t.shape[0] == 1]
        step = self._one_token_step() if len(singles) > 1 else None
        if step is not None:
            lg, outs = step.batch([int(ts[i][0]) for i in singles], [states[i] for i in singles])
            for j, i in enumerate(singles):
                row = lg[j].unsqueeze(0) if all_logits else lg[j]
                logits[i] = row
                new[i] = dataclasses.replace(
                    outs[j], model_fingerprint=self.fingerprint, last_logits=lg[j].clone()
                )
                new[i].mark_ready(self.state_device)
        for i in range(n):
            if logits[i] is None:
                logits[i], new[i] = self.forward(ts[i], states[i], all_logits=all_logits)
        return logits, new

    # -- text ---------------------------------------------------------------------------------
    def tokenizer(self, kind: str | None = None, path=None):
        """The model's tokenizer (rwkvpy.formats.vocabulary.model_tokenizer): ``path`` (a
        vocabulary file, ``--vocab``) when given, else the vocabulary its file holds (GGUF),
        else the one rwkvpy ships for the kind its file names or its vocabulary size. Asking
        for another kind than the file names is an error."""
        from .formats.vocabulary import model_tokenizer

        key = (kind, None if path is None else os.fspath(path))
        if key not in self._tokenizers:
            self._tokenizers[key] = model_tokenizer(
                self.info.path, self.config.vocab_size, kind, path
            )
        return self._tokenizers[key]

    def generate(self, prompt, params=None, state: State | None = None, **kw) -> str:
        """Continue ``prompt`` (text) and return the generated text (see rwkvpy.generate)."""
        from . import generate as gen

        return gen.generate(self, self.tokenizer(), prompt, params, state, **kw).text

    def stream(self, prompt, params=None, state: State | None = None, **kw):
        """Like :meth:`generate`, yielding the text in pieces as it is generated."""
        from . import generate as gen

        return gen.stream(self, self.tokenizer(), prompt, params, state, **kw)

    def __repr__(self) -> str:
        i = self.info
        return (
            f"<rwkvpy.Model {i.version.label} n_embd={i.n_embd} n_layer={i.n_layer} "
            f"vocab={i.vocab_size} from {os.path.basename(i.path)}>"
        )


#: Bytes of activations one sequence-mode pass may hold on the CPU, counted at 512 bytes per
#: token and channel: more than a pass holds, since models/base.hidden keeps only each layer's
#: last rows (docs/performance.md, "Speed", has the measured figure).
PROMPT_BYTES = 512 << 20


def prompt_chunk(n_embd: int) -> int:
    """Tokens per sequence-mode pass: the largest power of two whose activations fit
    :data:`PROMPT_BYTES` (512 for n_embd 2048, 1024 for 768), at least 64."""
    fit = PROMPT_BYTES // (512 * max(1, n_embd))
    return max(64, 1 << (max(1, fit).bit_length() - 1))


def _read(path):
    ckpt = formats.read(path)
    return ckpt, models.config_from_shapes(ckpt.shapes, ckpt.path, ln_x_eps=ckpt.ln_x_eps)


def physical_cores() -> int:
    """Physical CPU cores available to this process (hyper-threads not counted)."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
    cores = set()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = phys = core = None
            for line in f:
                key, _, val = line.partition(":")
                key, val = key.strip(), val.strip()
                if key == "processor":
                    cpu = int(val)
                elif key == "physical id":
                    phys = val
                elif key == "core id":
                    core = val
                elif not key and cpu is not None:
                    if cpu in allowed:
                        cores.add((phys, core if core is not None else cpu))
                    cpu = phys = core = None
            if cpu is not None and cpu in allowed:
                cores.add((phys, core if core is not None else cpu))
    except OSError:  # pragma: no cover
        pass
    return max(1, len(cores) if cores else len(allowed))


def load(
    path,
    *,
    mode: str = "fast",
    threads: int | None = None,
    device="cpu",
    gpu_layers: int | None = None,
    compile: bool = False,
    cache: bool | str = True,
    cpu_capability: str | None = None,
) -> Model:
    """Load an RWKV model from an rwkv.cpp ``.bin``, a BlinkDL ``.pth``, GGUF or safetensors
    (the format is detected from the content).

    ``path``: a model reference (rwkvpy.hub): a file or folder, ``"demo"`` (the demo model
    shipped in the package) or ``hf:OWNER/REPO/FILE`` (downloaded into the Hugging Face cache).
    mode: "fast" (default), "exact" or "reference" (see rwkvpy.kernels.plan).
    threads: torch's intra-op thread count for this process, fixed (default: the physical
    cores, fewer while other processes keep them busy: rwkvpy.runtime).
    device: "cpu" (default) or a GPU, "cuda" / "cuda:N" (see rwkvpy.kernels.gpu).
    gpu_layers: with a GPU device, only the first N layers there and the rest on the CPU (the
    head goes to the GPU when every layer does), for models larger than the GPU's memory.
    compile: on a GPU, fuse the one-token step with torch.compile before capturing it in a CUDA
    graph (faster decoding; the first token waits for the compilation).
    cache: keep the weights that mode "fast" repacks for the CPU (the integer kernels'
    interleaved groups) in the user cache folder (rwkvpy.paths; a size limit, least recently
    used first out) and reuse them while the model file is unchanged (kernels/cache.py);
    ``"beside"``: as ``PATH.rwkvpy-cache`` next to the model instead; False: repack each time.
    cpu_capability: the CPU kernels' level, "generic", "avx2", "avx512", "avx512_bf16" or
    "amx" (kernels/cpu.py: what each selects); default: ``$RWKVPY_CPU_CAPABILITY`` if set,
    else this CPU's own level. A level above this CPU's runs with the same numbers where its
    kernels can run here; one that cannot (avx2 and up without AVX2) raises CpuCapabilityError.
    The kernels for these choices are chosen in one place, kernels.plan.choose
    (``model.kernels`` says what it chose).

    What it changes in the process, once the file is read and every argument checked (a bad
    one raises before any of it): torch's thread count (``torch.set_num_threads``: ``threads``,
    or rwkvpy's own count, which later forward calls lower and raise with the machine's load:
    rwkvpy.runtime); numba's thread pool, started (OpenMP first, unless the user chose a
    threading layer: kernels/linear/threads.py); and, during forward calls, numba's thread
    count in the calling thread, which follows torch's. Environment variables (but the one
    ``import rwkvpy`` sets: rwkvpy.runtime) and torch's other settings are left as they are.
    It writes only into its caches: the repack cache (``cache``) and numba's compiled kernels
    (rwkvpy.numba_cache).
    """
    from .hub import resolve_model
    from .kernels.plan import choose

    path = resolve_model(path)
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise RwkvpyError(f"threads must be a positive int, got {threads!r}")
    ckpt, cfg = _read(path)
    plan = choose(
        cfg.n_layer,
        mode=mode,
        device=device,
        gpu_layers=gpu_layers,
        compile=compile,
        cache=cache,
        cpu_capability=cpu_capability,
    )
    from .kernels.linear import start_numba_pool

    start_numba_pool()  # before torch's count is set: starting it later would reset that
    runtime.start_threads(threads, physical_cores())  # None: fewer while others hold the cores
    return Model(ckpt, cfg, plan)


def inspect(path) -> ModelInfo:
    """Describe a model file (version, dims, tensor types) without loading its weights;
    ``path`` is a model reference as for :func:`load`."""
    from .hub import resolve_model

    return describe(*_read(resolve_model(path)))
