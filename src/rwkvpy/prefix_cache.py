"""A cache of RNN states for token prefixes, so a prompt that starts like an earlier one only
processes what is new.

An RWKV state after ``tokens`` is all the model remembers of them: a prompt that begins with
``tokens`` can start from that state and process only the rest. :class:`PrefixCache` keeps such
states in a trie keyed by token ids (a radix tree: one node per stored state or branch point, the
edges labelled with runs of token ids) and answers "the longest stored prefix of this sequence".

- Memory is bounded: ``nbytes`` (the stored states' tensors, their last logits, and 8 bytes per
  token of trie key) stays at or under ``max_bytes``; inserting past it evicts the least recently
  used states (a lookup that returns a state counts as a use). A state larger than
  ``max_bytes`` on its own is not stored.
- States are immutable values (``Model.forward`` never changes its input state), so the cache
  stores and returns them without copying.
- Thread-safe: one lock guards every operation (lookups and inserts are short: no model work
  is done under the lock). One cache can be shared by the threads of a server.
- ``root``: states are only valid for the model (and starting state) that made them. Every
  operation takes an optional hashable ``root`` naming that starting point; sequences under
  different roots never match. :func:`cache_root` builds the root for a model (its fingerprint,
  file and mode: the same weights quantized differently give different states) and an optional
  starting state. ``generate``/``stream`` do this for you.
- ``every``: when ``generate``/``stream`` process a prompt with the cache, they also store the
  state at every multiple of ``every`` tokens (checkpoints), so that prompts sharing a long
  beginning (a system prompt, a document) reuse it even when they differ later; 0 disables
  checkpoints (only the state after the whole prompt and the state after generation are
  stored).
"""

from __future__ import annotations

import hashlib
import itertools
import operator
import threading
from collections import OrderedDict

from .errors import RwkvpyError

_TOKEN_BYTES = 8  # what one token of trie key is counted as (a pointer in a tuple)


class PrefixCacheError(RwkvpyError):
    """A bad argument to a PrefixCache (sizes, token lists, states)."""


def state_nbytes(state) -> int:
    """Bytes held by a state's tensors (its last logits included)."""
    n = 0
    for name in ("att_x", "ffn_x", "wkv", "last_logits"):
        t = getattr(state, name, None)
        if t is not None:
            n += t.numel() * t.element_size()
    return n


def state_digest(state) -> str:
    """A short hash of a state's contents (not its logits): names a starting state."""
    h = hashlib.sha256(str(getattr(state, "version", "")).encode())
    for name in ("att_x", "ffn_x", "wkv"):
        t = getattr(state, name).detach().to("cpu").contiguous()
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:24]


def cache_root(model, state=None):
    """The cache root for sequences run by ``model`` from ``state`` (None: a fresh state).

    The model part is its fingerprint, file path and mode: the fingerprint alone is shared by
    every quantization of one model, whose states differ.
    """
    info = getattr(model, "info", None)
    key = (
        "model",
        getattr(model, "fingerprint", None),
        getattr(info, "path", None),
        getattr(info, "file_size", None),
        getattr(model, "mode", None),
    )
    if state is not None:
        key += ("state", state_digest(state))
    return key


def _key(tokens) -> tuple:
    if hasattr(tokens, "tolist"):
        tokens = tokens.tolist()
    if isinstance(tokens, (str, bytes)):
        raise PrefixCacheError(f"tokens must be a list of token ids, got {type(tokens).__name__}")
    try:
        return tuple(operator.index(t) for t in tokens)
    except TypeError:
        raise PrefixCacheError(f"tokens must be a list of token ids, got {tokens!r:.80}") from None


class _Node:
    __slots__ = ("children", "depth", "entry", "label", "parent")

    def __init__(self, parent, label: tuple, depth: int):
        self.parent = parent
        self.label = label  # token ids on the edge from the parent
        self.children = {}  # first token of the child's label -> child
        self.entry = None  # (state, nbytes) or None
        self.depth = depth  # tokens from the root to the end of this node's label


class PrefixCache:
    """States at token prefixes, longest-prefix lookup, LRU eviction under ``max_bytes``.

    ``lookup(tokens) -> (n, state, last_logits)``: the longest stored prefix ``tokens[:n]`` and
    the state after it (``(0, None, None)`` when nothing matches). ``insert(tokens, state)``
    stores ``state`` as the state after ``tokens``.
    """

    def __init__(self, max_bytes: int = 1 << 30, every: int = 256):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise PrefixCacheError(f"max_bytes must be a positive int, got {max_bytes!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise PrefixCacheError(f"every must be an int >= 0 (0: no checkpoints), got {every!r}")
        self.max_bytes = max_bytes
        self.every = every
        self._lock = threading.Lock()
        self._roots: dict = {}  # root key -> _Node
        self._lru: OrderedDict = OrderedDict()  # node -> root key, least recently used first
        self._state_bytes = 0
        self._key_tokens = 0
        self.hits = self.misses = self.evictions = 0
        self.tokens_saved = 0  # prompt tokens served from the cache, in all

    # -- inspection ---------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes counted against ``max_bytes``: states (with logits) plus the trie's keys."""
        return self._state_bytes + _TOKEN_BYTES * self._key_tokens

    def __len__(self) -> int:
        return len(self._lru)

    def stats(self) -> dict:
        with self._lock:
            return {
                "entries": len(self._lru),
                "nbytes": self.nbytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "tokens_saved": self.tokens_saved,
            }

    def keys(self, root=None) -> list:
        """The stored token sequences under ``root``, least recently used first."""
        with self._lock:
            return [self._path(n) for n, r in self._lru.items() if r == root]

    def checkpoints(self, start: int, end: int) -> list:
        """Positions in (start, end) where a prompt processed from ``start`` to ``end`` stores a
        checkpoint state: the multiples of ``every``."""
        if self.every <= 0:
            return []
        first = (start // self.every + 1) * self.every
        return list(range(first, end, self.every))

    def __repr__(self) -> str:
        return (
            f"<rwkvpy.PrefixCache {len(self)} states, {self.nbytes} / {self.max_bytes} bytes, "
            f"every={self.every}>"
        )

    # -- operations ---------------------------------------------------------------------------
    def lookup(self, tokens, root=None):
        """``(n, state, last_logits)`` for the longest stored prefix ``tokens[:n]``, n >= 1, or
        ``(0, None, None)``. The state is the stored object itself (states are immutable)."""
        key = _key(tokens)
        with self._lock:
            node = self._roots.get(root)
            best = None
            i = 0
            while node is not None:
                if node.entry is not None and node.depth > 0:
                    best = node
                if i == len(key):
                    break
                child = node.children.get(key[i])
                if child is None:
                    break
                lab = child.label
                if key[i : i + len(lab)] != lab:
                    break
                i += len(lab)
                node = child
            if best is None:
                self.misses += 1
                return 0, None, None
            self._lru.move_to_end(best)
            self.hits += 1
            self.tokens_saved += best.depth
            state = best.entry[0]
            return best.depth, state, getattr(state, "last_logits", None)

    def insert(self, tokens, state, root=None) -> bool:
        """Store ``state`` as the state after ``tokens`` (replacing one stored there); evict the
        least recently used states past ``max_bytes``. Returns False (nothing stored) when the
        state alone is larger than ``max_bytes``."""
        key = _key(tokens)
        if not key:
            raise PrefixCacheError("cannot store a state for an empty token sequence")
        if state is None or not hasattr(state, "wkv"):
            raise PrefixCacheError(f"state must be an rwkvpy State, got {type(state).__name__}")
        n = state_nbytes(state)
        if n + _TOKEN_BYTES * len(key) > self.max_bytes:
            return False
        with self._lock:
            node = self._roots.get(root)
            if node is None:
                node = self._roots[root] = _Node(None, (), 0)
            i = 0
            while i < len(key):
                child = node.children.get(key[i])
                if child is None:
                    leaf = _Node(node, key[i:], len(key))
                    node.children[key[i]] = leaf
                    self._key_tokens += len(leaf.label)
                    node = leaf
                    i = len(key)
                    break
                lab = child.label
                common = 0
                for a, b in zip(lab, key[i:]):
                    if a != b:
                        break
                    common += 1
                if common < len(lab):  # split the edge at the divergence
                    mid = _Node(node, lab[:common], node.depth + common)
                    node.children[key[i]] = mid
                    child.label = lab[common:]
                    child.parent = mid
                    mid.children[child.label[0]] = child
                    child = mid
                i += common
                node = child
            if node.entry is not None:
                self._state_bytes -= node.entry[1]
            node.entry = (state, n)
            self._state_bytes += n
            self._lru[node] = root
            self._lru.move_to_end(node)
            while self.nbytes > self.max_bytes and len(self._lru) > 1:
                old, old_root = next(iter(self._lru.items()))
                if old is node:  # pragma: no cover - the newest entry is never the oldest
                    break
                self._remove(old, old_root)
                self.evictions += 1
            return True

    def discard(self, tokens, root=None) -> bool:
        """Drop the state stored for exactly ``tokens``; False if there is none."""
        key = _key(tokens)
        with self._lock:
            node = self._roots.get(root)
            i = 0
            while node is not None and i < len(key):
                node = node.children.get(key[i])
                if node is None or key[i : i + len(node.label)] != node.label:
                    return False
                i += len(node.label)
            if node is None or node.entry is None or node.depth == 0:
                return False
            self._remove(node, root)
            return True

    def clear(self) -> None:
        with self._lock:
            self._roots.clear()
            self._lru.clear()
            self._state_bytes = self._key_tokens = 0

    # -- internals (called with the lock held) --------------------------------------------------
    def _path(self, node) -> list:
        parts = []
        while node is not None:
            parts.append(node.label)
            node = node.parent
        return list(itertools.chain.from_iterable(reversed(parts)))

    def _remove(self, node, root) -> None:
        self._state_bytes -= node.entry[1]
        node.entry = None
        del self._lru[node]
        # prune: a node without a state and without children goes; one with a single child
        # merges into it
        while node.parent is not None and node.entry is None:
            parent = node.parent
            if not node.children:
                del parent.children[node.label[0]]
                self._key_tokens -= len(node.label)
                node = parent
                continue
            if len(node.children) == 1:
                (child,) = node.children.values()
                child.label = node.label + child.label
                child.parent = parent
                parent.children[child.label[0]] = child
            break
        if node.parent is None and not node.children:
            self._roots.pop(root, None)
