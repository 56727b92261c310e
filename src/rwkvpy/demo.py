"""The demo model shipped inside the package, and the text it was trained and evaluated on.

The demo is a tiny byte-level RWKV-7 (vocabulary 256, token = byte) trained by
``tools/train_demo.py`` on text every Python installation carries: the standard library's
``pydoc_data/topics.py`` (the reference documentation that ``help()`` shows), its values
concatenated in sorted key order and encoded as UTF-8. The last part of it (from the first line
start at or after 95 % of the bytes) is held out for evaluation. The split lives here, in one
place, so the training script and any evaluation use the same bytes.

The text differs between Python versions (each release updates its documentation), so a
perplexity is only comparable on the same Python version: :func:`corpus_info` gives a hash.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import RwkvpyError

__all__ = ["HELDOUT_FRACTION", "DATA_DIR", "demo_corpus", "held_out_text", "corpus_info",
           "demo_model_path"]

# Fraction of the corpus (in bytes, at the end) held out for evaluation.
HELDOUT_FRACTION = 0.05

# Where the shipped model file lives: rwkvpy/data/demo-v7-<dims>.<ext>
DATA_DIR = Path(__file__).resolve().parent / "data"


def _corpus_bytes() -> bytes:
    from pydoc_data import topics

    return "".join(topics.topics[k] for k in sorted(topics.topics)).encode("utf-8")


def demo_corpus() -> tuple[bytes, bytes]:
    """(train_bytes, heldout_bytes): the pydoc topics text split for training and evaluation.

    The held-out part starts at the first line start at or after ``1 - HELDOUT_FRACTION`` of
    the bytes, so both parts are whole lines of valid UTF-8. Deterministic for a given Python.
    """
    data = _corpus_bytes()
    cut = int(len(data) * (1.0 - HELDOUT_FRACTION))
    nl = data.find(b"\n", cut)
    cut = len(data) if nl < 0 else nl + 1
    return data[:cut], data[cut:]


def held_out_text() -> str:
    """The evaluation text (the held-out part of :func:`demo_corpus`) as a string."""
    return demo_corpus()[1].decode("utf-8")


def corpus_info() -> dict:
    """Sizes and a SHA-256 of the corpus: what a perplexity was measured on."""
    train, held = demo_corpus()
    return {"train_bytes": len(train), "heldout_bytes": len(held),
            "sha256": hashlib.sha256(train + held).hexdigest()[:16]}


def demo_model_path() -> str:
    """Path of the demo model file shipped in the package (``rwkvpy/data/demo*.gguf``, else
    ``demo*.pth``). Raises :class:`~rwkvpy.errors.RwkvpyError` if the package holds none."""
    for pattern in ("demo*.gguf", "demo*.pth"):
        found = sorted(DATA_DIR.glob(pattern)) if DATA_DIR.is_dir() else []
        if found:
            return str(found[0])
    raise RwkvpyError(f"no demo model file in {DATA_DIR} (looked for demo*.gguf and demo*.pth): "
                      "this installation of rwkvpy does not ship the demo model; train one with "
                      "tools/train_demo.py and load it by path")
