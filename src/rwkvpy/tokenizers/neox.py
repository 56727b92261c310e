"""GPT-NeoX (Pile) tokenizer through Hugging Face's ``tokenizers`` library.

RWKV-4 Pile models use EleutherAI's 20B tokenizer (``20B_tokenizer.json``, 50277 ids; some
models pad their vocabulary to 50304), which rwkvpy ships (``rwkvpy/tokenizers/data/``, the
default). Any ``tokenizer.json`` works, as a file or as its JSON text (a GGUF written by rwkvpy
stores it under ``tokenizer.huggingface.json``).

Byte-level BPE tokenizers (decoder ``ByteLevel``, as the 20B one) decode token by token to exact
bytes, so a token that ends inside a UTF-8 character streams correctly (see ``StreamDecoder``):
each token's text is mapped back through the byte <-> printable-character table of byte-level
BPE; a token with a character outside that table (an added token such as a run of spaces) stands
for its own UTF-8 bytes, which is what ``tokenizers`` does. Special added tokens (such as
``<|endoftext|>``) decode to nothing, as ``tokenizers``' own ``decode`` skips them. For other
decoders, ``decode_bytes`` is ``tokenizers``' ``decode`` as UTF-8.
"""

from __future__ import annotations

from pathlib import Path

from .base import VOCAB_HINT, Tokenizer, TokenizerError, id_list, utf8

NEOX_TOKENIZER_FILE = "20B_tokenizer.json"
DATA_DIR = Path(__file__).resolve().parent / "data"


def default_neox_path() -> Path:
    """Path of the ``20B_tokenizer.json`` rwkvpy ships; a TokenizerError naming ``--vocab`` when
    the installation lacks it."""
    p = DATA_DIR / NEOX_TOKENIZER_FILE
    if not p.is_file():
        raise TokenizerError(
            f"the 20B tokenizer {NEOX_TOKENIZER_FILE} that ships with rwkvpy is missing from "
            f"{DATA_DIR} (a broken installation: reinstall rwkvpy); or {VOCAB_HINT}"
        )
    return p


def _byte_level_chars() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character of each byte -> the byte.

    Bytes that are printable Latin-1 characters ('!'..'~', '\u00a1'..'\u00ac', '\u00ae'..'\u00ff')
    stand for themselves; the other 68 bytes, in increasing order, take the characters
    U+0100, U+0101, ... in turn.
    """
    printable = (
        set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    )
    table: dict[str, int] = {}
    extra = 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(0x100 + extra)] = b
            extra += 1
    return table


class NeoXTokenizer(Tokenizer):
    """A ``tokenizers`` tokenizer from a ``tokenizer.json`` file (None: the 20B one rwkvpy
    ships), or from its JSON text (``json_text``; ``source`` names where it comes from)."""

    name = "neox"

    def __init__(self, path=None, *, json_text: str | None = None, source=None):
        try:
            from tokenizers import Tokenizer as HFTokenizer
            from tokenizers import decoders
        except ImportError:
            raise TokenizerError(
                "NeoXTokenizer needs the 'tokenizers' package: pip install tokenizers"
            ) from None
        if json_text is not None:
            self.path = str(source) if source is not None else "<tokenizer.json text>"
            load = HFTokenizer.from_str
            arg = json_text
        else:
            file = Path(path) if path is not None else default_neox_path()
            self.path = str(file)
            if not file.is_file():
                raise TokenizerError(f"{self.path}: tokenizer file not found; {VOCAB_HINT}")
            load = HFTokenizer.from_file
            arg = str(self.path)
        try:
            self._tok = load(arg)
        except Exception as e:  # the library raises its own Exception type
            raise TokenizerError(
                f"{self.path}: not a tokenizers JSON file: {e}; {VOCAB_HINT}"
            ) from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._table = None
        if isinstance(self._tok.decoder, decoders.ByteLevel):
            self._table = self._byte_table()

    def _byte_table(self) -> list[bytes]:
        chars = _byte_level_chars()
        special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        table = []
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i)
            if piece is None or i in special:
                table.append(b"")
                continue
            try:
                table.append(bytes([chars[c] for c in piece]))
            except KeyError:
                table.append(piece.encode("utf-8"))
        return table

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            utf8(text, "NeoXTokenizer")  # raises the usual TokenizerError
        try:
            return self._tok.encode(text).ids
        except Exception as e:  # lone surrogates, or the library's own failures
            utf8(text, "NeoXTokenizer")
            raise TokenizerError(f"NeoXTokenizer.encode: {e}") from None

    def decode_bytes(self, ids) -> bytes:
        ids = id_list(ids, self.vocab_size, "NeoXTokenizer.decode")
        if self._table is not None:
            table = self._table
            return b"".join([table[i] for i in ids])
        return self._tok.decode(ids).encode("utf-8")

    def vocabulary_bytes(self) -> list[bytes]:
        if self._table is not None:
            return list(self._table)  # special tokens: b""
        special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        return [b"" if i in special else self.decode_bytes([i]) for i in range(self.vocab_size)]

    def decode(self, ids) -> str:
        if self._table is not None:
            return super().decode(ids)
        return self._tok.decode(id_list(ids, self.vocab_size, "NeoXTokenizer.decode"))
