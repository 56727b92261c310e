"""The RWKV World tokenizer: greedy longest match over UTF-8 bytes.

Vocabulary file format (``rwkv_vocab_v20230424.txt``): one token a line,
``<id> <Python str or bytes literal> <length in bytes>``. A str literal stands for its UTF-8
bytes. The literal is read with :func:`ast.literal_eval` (never ``eval``) and must be a str or
bytes whose byte length equals the last field.

Encoding matches BlinkDL's reference tokenizer (``rwkv.rwkv_tokenizer.TRIE_TOKENIZER``): from
the first byte not yet covered, take the longest vocabulary entry that matches there. The
vocabulary is turned once into a flat trie (a 256-entry root table plus a hash table of the
deeper edges, see ``_world_kernels``) walked by a numba-compiled loop; without numba a
pure-Python walk of the same trie gives the same ids, slower. Tries are cached by the
vocabulary's content (files also by path, size and modification time), so every tokenizer of one
vocabulary shares one trie, whether it came from a file or from a model file's token list
(``WorldTokenizer(tokens=...)``, as a GGUF stores it).

Id 0 is not in the vocabulary file: World models use it as end of text. It decodes to no bytes,
as does any other id below ``vocab_size`` that the file does not define.

Text must be valid Unicode: a lone surrogate (``"\\ud800"``) is a TokenizerError naming its
position, where BlinkDL's reference raises Python's UnicodeEncodeError; ``encode_bytes`` takes
any bytes.
"""

from __future__ import annotations

import ast
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import VOCAB_HINT, Tokenizer, TokenizerError, id_list, utf8, with_hint

WORLD_VOCAB_FILE = "rwkv_vocab_v20230424.txt"
DATA_DIR = Path(__file__).resolve().parent / "data"
_MAX_ID = 1 << 24  # ids above this are surely a broken file, not a vocabulary

_kernels = False  # the numba kernels module once looked for; None: numba is not installed


def _get_kernels():
    """The compiled kernels, imported on first use (importing numba takes a while)."""
    global _kernels
    if _kernels is False:
        try:  # numba is optional: without it the same trie is walked in Python
            from . import _world_kernels as k
        except ImportError:  # pragma: no cover - exercised only where numba is missing
            k = None
        _kernels = k
    return _kernels


def default_world_vocab_path() -> Path:
    """Path of the ``rwkv_vocab_v20230424.txt`` rwkvpy ships (``rwkvpy/tokenizers/data/``); a
    TokenizerError naming ``--vocab`` when the installation lacks it."""
    p = DATA_DIR / WORLD_VOCAB_FILE
    if not p.is_file():
        raise TokenizerError(
            f"the RWKV World vocabulary {WORLD_VOCAB_FILE} that ships with rwkvpy is missing "
            f"from {DATA_DIR} (a broken installation: reinstall rwkvpy); or {VOCAB_HINT}"
        )
    return p


def read_world_vocab(path) -> dict[int, bytes]:
    """Parse a World vocabulary file into ``{id: token bytes}`` (file order)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:  # universal newlines, as the reference reads it
            lines = f.read().split("\n")
    except FileNotFoundError:
        raise TokenizerError(f"{path}: World vocabulary file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read the World vocabulary: {e}") from None
    vocab: dict[int, bytes] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        a, b = line.find(" "), line.rfind(" ")
        if a <= 0 or b <= a:
            raise TokenizerError(
                f"{where}: expected '<id> <str or bytes literal> <length>', got {line!r:.80}"
            )
        try:
            idx, length = int(line[:a]), int(line[b + 1 :])
        except ValueError:
            raise TokenizerError(
                f"{where}: the id and the length must be integers, got {line!r:.80}"
            ) from None
        try:
            value = _literal(line[a + 1 : b].strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise TokenizerError(
                f"{where}: the token is not a Python str or bytes literal: {line[a + 1 : b]!r:.80}"
            ) from None
        if isinstance(value, str):
            try:
                value = value.encode("utf-8")
            except UnicodeEncodeError:
                raise TokenizerError(f"{where}: the token is not valid Unicode") from None
        elif not isinstance(value, bytes):
            raise TokenizerError(
                f"{where}: the token must be a str or bytes literal, got {type(value).__name__}"
            )
        if not value:
            raise TokenizerError(f"{where}: empty tokens are not allowed")
        if len(value) != length:
            raise TokenizerError(
                f"{where}: the token has {len(value)} bytes, the line says {length}"
            )
        if not 0 <= idx < _MAX_ID:
            raise TokenizerError(f"{where}: token id {idx} is out of range 0..{_MAX_ID - 1}")
        if idx in vocab:
            raise TokenizerError(f"{where}: token id {idx} is defined twice")
        vocab[idx] = value
    if not vocab:
        raise TokenizerError(f"{path}: the World vocabulary file has no tokens")
    return vocab


def _literal(lit: str):
    """``ast.literal_eval(lit)``, with a shortcut for the common plain quoted string with no
    backslash and no inner quote of its kind, whose value is the text between the quotes."""
    q = lit[:1]
    if (
        q in ("'", '"')
        and len(lit) >= 2
        and lit[-1] == q
        and "\\" not in lit
        and q not in lit[1:-1]
    ):
        return lit[1:-1]
    return ast.literal_eval(lit)


@dataclass(frozen=True)
class _Trie:
    id_to_bytes: list  # id -> bytes (b"" where the file defines none)
    root: np.ndarray  # int32 (256,): node of each one-byte prefix, -1 if none
    node_token: np.ndarray  # int32 (nodes,): token id ending at the node, -1 if none
    keys: np.ndarray  # uint64 (cap,): parent << 8 | byte, EMPTY where free
    vals: np.ndarray  # int32 (cap,): child node
    shift: np.uint64  # 64 - log2(cap)
    edges: dict  # the same deeper edges as a dict, for the pure-Python walk


def _build_trie(vocab: dict[int, bytes]) -> _Trie:
    # With equal byte strings under two ids the later one wins, as in the reference.
    token_to_id = {tok: i for i, tok in vocab.items()}
    prefix_node: dict[bytes, int] = {}
    node_token: list[int] = []
    parent: list[int] = []
    last_byte: list[int] = []
    for tok, tid in token_to_id.items():
        node = -1
        for k in range(1, len(tok) + 1):
            p = tok[:k]
            nid = prefix_node.get(p)
            if nid is None:
                nid = prefix_node[p] = len(node_token)
                node_token.append(-1)
                parent.append(node)
                last_byte.append(tok[k - 1])
            node = nid
        node_token[node] = tid
    n = len(node_token)
    parent_a = np.asarray(parent, dtype=np.int64)
    byte_a = np.asarray(last_byte, dtype=np.int64)
    child_a = np.arange(n, dtype=np.int32)
    root = np.full(256, -1, dtype=np.int32)
    top = parent_a < 0
    root[byte_a[top]] = child_a[top]
    deep = ~top
    ekeys = ((parent_a[deep] << 8) | byte_a[deep]).astype(np.uint64)
    evals = child_a[deep]
    bits = max(8, int(2 * max(len(ekeys), 1) - 1).bit_length())  # load factor <= 1/2
    shift = np.uint64(64 - bits)
    edges = dict(zip(ekeys.tolist(), evals.tolist(), strict=True))
    keys, vals = _hash_table(edges, bits)
    id_to_bytes = [b""] * (max(vocab) + 1)
    for i, tok in vocab.items():
        id_to_bytes[i] = tok
    return _Trie(
        id_to_bytes, root, np.asarray(node_token, dtype=np.int32), keys, vals, shift, edges
    )


def _hash_table(edges: dict, bits: int):
    """The open-addressing table the numba kernel probes (layout in ``_world_kernels``), built
    in plain Python: one pass over ~116k edges costs less than loading another compiled kernel."""
    cap = 1 << bits
    mask, shift, full = cap - 1, 64 - bits, (1 << 64) - 1
    keys = [_EMPTY] * cap
    vals = [-1] * cap
    for k, v in edges.items():
        h = ((k * _MUL) & full) >> shift
        while keys[h] != _EMPTY:
            h = (h + 1) & mask
        keys[h] = k
        vals[h] = v
    return np.array(keys, dtype=np.uint64), np.array(vals, dtype=np.int32)


_EMPTY = 0xFFFFFFFFFFFFFFFF
_MUL = 0x9E3779B97F4A7C15  # the same constants as _world_kernels
_cache: dict = {}
_cache_lock = threading.Lock()


def _digest(vocab: dict[int, bytes]) -> str:
    h = hashlib.sha256()
    for i in sorted(vocab):
        tok = vocab[i]
        h.update(b"%d %d " % (i, len(tok)))
        h.update(tok)
    return h.hexdigest()


def _trie_of(vocab: dict[int, bytes]) -> _Trie:
    key = _digest(vocab)
    with _cache_lock:
        trie = _cache.get(key)
        if trie is None:
            trie = _cache[key] = _build_trie(vocab)
    return trie


def _load(path: Path) -> _Trie:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise TokenizerError(f"{path}: World vocabulary file not found") from None
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read the World vocabulary: {e}") from None
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    with _cache_lock:
        trie = _cache.get(key)
    if trie is None:
        trie = _trie_of(read_world_vocab(path))
        with _cache_lock:
            _cache[key] = trie
    return trie


def _vocab_of(tokens) -> dict[int, bytes]:
    """``{id: bytes}`` of a token list (index = id, ``b""`` = undefined) or dict."""
    items = tokens.items() if isinstance(tokens, dict) else enumerate(tokens)
    vocab = {}
    for i, t in items:
        if not isinstance(t, (bytes, bytearray)):
            raise TokenizerError(f"token {i} must be bytes, got {type(t).__name__}")
        if t:
            vocab[int(i)] = bytes(t)
    if not vocab:
        raise TokenizerError("the World vocabulary has no tokens")
    return vocab


class WorldTokenizer(Tokenizer):
    """The RWKV World tokenizer (vocabulary ``rwkv_vocab_v20230424.txt``, 65529 tokens, ids
    1..65529; World models have 65536 logits).

    ``vocab_path``: a vocabulary file (None: the one rwkvpy ships,
    :func:`default_world_vocab_path`).
    ``tokens``: instead of a file, the vocabulary itself: a list of bytes per id (``b""`` for ids
    it does not define, such as 0 and padding) or a dict id -> bytes; ``source`` then names where
    it comes from in error messages (for example a GGUF file).
    """

    name = "world"

    def __init__(self, vocab_path=None, *, tokens=None, source=None):
        try:
            if tokens is not None:
                if vocab_path is not None:
                    raise TokenizerError("give a vocabulary file or tokens, not both")
                self.path = str(source) if source is not None else "<tokens>"
                self._trie = _trie_of(_vocab_of(tokens))
            else:
                self.path = (
                    Path(vocab_path) if vocab_path is not None else default_world_vocab_path()
                )
                self._trie = _load(self.path)
        except TokenizerError as e:
            raise with_hint(e) from None
        self._id_to_bytes = self._trie.id_to_bytes
        self.vocab_size = len(self._id_to_bytes)

    # -- encoding --------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.encode_bytes(utf8(text, "WorldTokenizer"))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of raw bytes (any bytes, not only UTF-8)."""
        if not data:
            return []
        kernels = _get_kernels()
        if kernels is None:  # pragma: no cover
            return self._encode_python(data)
        t = self._trie
        buf = np.frombuffer(data, dtype=np.uint8)
        out = np.empty(len(data), dtype=np.int32)
        n = kernels.encode(buf, t.root, t.node_token, t.keys, t.vals, t.shift, out)
        if n < 0:
            self._no_token_at(data, -n - 1)
        return out[:n].tolist()

    def _encode_python(self, data: bytes) -> list[int]:
        """The same greedy longest match in plain Python (used without numba; tests compare)."""
        t = self._trie
        edges = t.edges
        root = t.root.tolist()
        node_token = t.node_token.tolist()
        n = len(data)
        out = []
        i = 0
        while i < n:
            node = root[data[i]]
            if node < 0:
                self._no_token_at(data, i)
            best_tok, best_end = node_token[node], i + 1
            j = i + 1
            while j < n:
                node = edges.get((node << 8) | data[j], -1)
                if node < 0:
                    break
                j += 1
                if node_token[node] >= 0:
                    best_tok, best_end = node_token[node], j
            if best_tok < 0:
                self._no_token_at(data, i)
            out.append(best_tok)
            i = best_end
        return out

    def _no_token_at(self, data: bytes, i: int):
        raise TokenizerError(
            f"{self.path}: no token of the vocabulary starts with byte "
            f"0x{data[i]:02x} (at byte offset {i}): the vocabulary must hold "
            f"every single byte; {VOCAB_HINT}"
        )

    # -- decoding --------------------------------------------------------------------------
    def decode_bytes(self, ids) -> bytes:
        table = self._id_to_bytes
        return b"".join([table[i] for i in id_list(ids, self.vocab_size, "WorldTokenizer.decode")])

    def vocabulary_bytes(self) -> list[bytes]:
        return list(self._id_to_bytes)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (b"" for ids the vocabulary does not define, such as 0)."""
        return self.decode_bytes([token_id])
